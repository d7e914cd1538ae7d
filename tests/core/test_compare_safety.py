"""`clbench compare` guarantees: finished runs are reused only under the same config, one compare per
folder, no fit outlives its compare, and fits never import modules from the working directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_compare import fake_run
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.compare import parse_args
from clbench.compare.plan import (
    LOCK,
    _comparable,
    changed_fields,
    expected_identity,
    folder_lock,
    planned_runs,
    resolved_config,
)
from clbench.identity import sha256_text


def toy(tmp_path: Path, trace_dir: Path, model_dir: Path, epochs: int = 1) -> dict:
    """The toy stream with small token budgets (the tiny model's context is 256 tokens)."""
    cfg = toy_config(trace_dir, model_dir, tmp_path / "runs")
    for task in cfg["stream"]["tasks"]:
        task.update(epochs=epochs, max_prompt_tokens=64, max_answer_tokens=16)
    return cfg


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def one_finished_run(tmp_path: Path, trace_dir: Path, model_dir: Path) -> tuple[dict, Path, list[str], Path]:
    """A comparison of one seqft run, finished: its config, config file, compare argv and run folder."""
    cfg = toy(tmp_path, trace_dir, model_dir)
    path = write_config(tmp_path / "toy.yaml", cfg)
    argv = ["compare", "--config", str(path), "--strategies", "seqft", "--seeds", "1"]
    argv += ["--run.checkpoints", "none", "--run.evaluate", "needed"]
    assert main(argv) == 0
    return cfg, path, argv, tmp_path / "runs" / "compare-toy" / "runs" / "seqft-seed1"


def test_a_finished_run_of_another_config_is_refused_until_rerun_changed(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    cfg, path, argv, run = one_finished_run(tmp_path, trace_dir, tiny_model_dir)
    stamp = (run / "results.json").stat().st_mtime_ns

    capsys.readouterr()
    assert main([*argv, "--model.lr", "0.01"]) == 2  # another pass-through override
    err = one_line_error(capsys)
    assert f"{run}: finished with other inputs" in err and "differing in model.lr;" in err
    cfg["stream"]["tasks"][0]["max_new_tokens"] = 3  # and another config file
    write_config(path, cfg)
    assert main([*argv, "--model.lr", "0.01"]) == 2
    assert "differing in model.lr, stream.tasks;" in one_line_error(capsys)
    assert sorted(p.name for p in run.parent.iterdir()) == ["seqft-seed1"]  # nothing moved or run
    assert (run / "results.json").stat().st_mtime_ns == stamp

    # --finished_only tabulates it as it ran, names the difference, and refuses nothing.
    assert main([*argv, "--model.lr", "0.01", "--finished_only"]) == 0
    md = (run.parent.parent / "comparison.md").read_text()
    assert "Config or inputs differ from this invocation's: seqft-seed1 (model.lr, stream.tasks)." in md
    assert (run / "results.json").stat().st_mtime_ns == stamp

    assert main([*argv, "--model.lr", "0.01", "--rerun_changed"]) == 0
    (aside,) = (run.parent.parent / "superseded").glob("seqft-seed1.changed-*")  # kept, never deleted
    assert sorted(p.name for p in run.parent.iterdir()) == ["seqft-seed1"]  # analyze sees one run
    assert json.loads((aside / "results.json").read_text())["status"] == "complete"
    rerun = yaml.safe_load((run / "config.yaml").read_text())
    assert rerun["model"]["lr"] == 0.01 and rerun["stream"]["tasks"][0]["max_new_tokens"] == 3
    assert (
        "overrides `--run.checkpoints none --run.evaluate needed --model.lr 0.01`"
        in (run.parent.parent / "comparison.md").read_text()
    )
    capsys.readouterr()
    assert main([*argv, "--model.lr", "0.01"]) == 0  # the same invocation again: reused, not refused
    assert "reusing finished run" in capsys.readouterr().out


def test_a_finished_run_on_changed_data_is_refused_then_really_retrained(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    _, _, argv, run = one_finished_run(tmp_path, trace_dir, tiny_model_dir)
    first = json.loads((run / "results.json").read_text())
    test_file = trace_dir / "parity" / "test.json"
    rows = json.loads(test_file.read_text())
    test_file.write_text(json.dumps(rows[:-1]))  # the test data changed; the config did not
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"{run}: finished with other inputs" in err and "the data of task parity (test)" in err
    assert json.loads((run / "results.json").read_text()) == first  # not reused, not touched
    test_file.write_text(json.dumps(rows))
    config = run / "config.yaml"
    config.write_text(config.read_text() + "# edited\n")  # the same fields, but not the file it ran with
    assert main(argv) == 2
    assert "its config.yaml was edited after it ran" in one_line_error(capsys)
    test_file.write_text(json.dumps(rows[:-1]))
    assert main([*argv, "--rerun_changed"]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["per_task"]["parity"]["n_test"] == len(rows) - 1  # really retrained on the new data
    assert again["identity"]["data"]["parity"]["test"] != first["identity"]["data"]["parity"]["test"]
    assert [p.name for p in run.parent.iterdir()] == ["seqft-seed1"]
    (aside,) = (run.parent.parent / "superseded").iterdir()
    assert json.loads((aside / "results.json").read_text()) == first  # kept as it was


def test_placement_only_arguments_do_not_make_a_run_another_config():
    """A run made when attribution's offload default was "memory" is reused under "auto" (the same
    numbers); a budget that differs is a difference."""

    def cfg(**args):
        base = {"gate_target": "update", "budget": 0.2, "offload": "memory", "prior_dir": None}
        init = base | args
        return {"strategy": {"class_path": "strategies.attribution.Attribution", "init_args": init}}

    assert changed_fields(_comparable(cfg()), _comparable(cfg(offload="auto", prior_dir="/p"))) == []
    assert changed_fields(_comparable(cfg()), _comparable(cfg(budget=0.5))) == ["strategy.init_args"]


def test_one_compare_per_folder_and_a_stale_lock_is_taken_over(trace_dir, tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "toy.yaml", toy(tmp_path, trace_dir, tiny_model_dir))
    argv = ["compare", "--config", str(cfg), "--strategies", "seqft", "--seeds", "1"]
    (run,) = planned_runs(*parse_args(argv[1:]))  # finished, this config: nothing to train
    run.dir.mkdir(parents=True)
    resolved = resolved_config(run.argv)
    config_text = yaml.safe_dump(resolved)
    identity = expected_identity(resolved) | {"config_sha256": sha256_text(config_text)}
    finished = fake_run(1, 0.5, -0.1, -0.2, 0.0, 0.4, 10, 5, 100) | {"identity": identity}
    (run.dir / "results.json").write_text(json.dumps(finished))
    (run.dir / "config.yaml").write_text(config_text)
    lock = run.dir.parent.parent / LOCK

    with folder_lock(lock.parent):  # another compare holds the folder
        assert main(argv) == 2
    assert f"{lock}: held by process {os.getpid()}, another clbench compare" in one_line_error(capsys)

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(str(gone.pid))  # left by a compare that died
    assert main(argv) == 0
    assert f"took over the stale lock {lock} of process {gone.pid}" in capsys.readouterr().out
    assert lock.read_text() == ""  # released


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("jobs", [1, 2])
def test_stopping_compare_stops_its_fits(trace_dir, tiny_model_dir, tmp_path, capsys, jobs):
    """`jobs` fits run when compare is stopped and one more waits: the running ones stop, and the
    waiting one never starts (not even in a slot a stopped fit just freed)."""
    cfg = write_config(tmp_path / "toy.yaml", toy(tmp_path, trace_dir, tiny_model_dir, epochs=200))
    seeds = ",".join(str(seed) for seed in range(1, jobs + 2))
    argv = ["compare", "--config", str(cfg), "--strategies", "seqft", "--seeds", seeds]
    argv += ["--run.checkpoints", "none", "--jobs", str(jobs)]
    with open(tmp_path / "compare.log", "w") as log:
        compare = subprocess.Popen([sys.executable, "-m", "clbench", *argv], stdout=log, stderr=log)
    runs = tmp_path / "runs" / "compare-toy" / "runs"
    results = [runs / f"seqft-seed{seed}" / "results.json" for seed in (1, 2)[:jobs]]
    fits: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not all(r.is_file() for r in results) and compare.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "compare.log").read_text()
            time.sleep(0.5)
        assert all(r.is_file() for r in results), (tmp_path / "compare.log").read_text()
        fits = [json.loads(r.read_text())["pid"] for r in results]
        assert all(alive(fit) and fit != compare.pid for fit in fits)  # side by side with --jobs 2

        # A second compare on the folder is refused; the first one's live runs are left alone.
        assert main(argv) == 2
        lock = runs.parent / LOCK
        assert f"{lock}: held by process {compare.pid}" in one_line_error(capsys)
        assert sorted(p.name for p in runs.iterdir()) == [r.parent.name for r in results]

        compare.send_signal(signal.SIGTERM)
        assert compare.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 5
        while any(alive(fit) for fit in fits) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(fit) for fit in fits)
        log = (tmp_path / "compare.log").read_text()
        assert all(f"stopping clbench fit (process {fit})" in log for fit in fits)
        assert f"started seqft-seed{jobs + 1}" not in log and not (runs / f"seqft-seed{jobs + 1}").exists()
        assert lock.read_text() == ""  # released on the way out
    finally:  # whatever failed above, leave no process behind
        compare.kill()
        for fit in fits:
            if alive(fit):
                os.kill(fit, signal.SIGKILL)


def test_a_failed_fit_under_jobs_lets_the_running_one_finish_and_starts_no_other(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    """`bad` fails at once, beside a seqft fit; the queued freeze run must not take the freed slot."""
    cfg = write_config(tmp_path / "toy.yaml", toy(tmp_path, trace_dir, tiny_model_dir))
    presets = tmp_path / "presets"
    presets.mkdir()
    write_config(
        presets / "bad.yaml", {"strategy": {"class_path": "attribution", "init_args": {"budget": 1.5}}}
    )
    argv = ["compare", "--config", str(cfg), "--presets", str(presets), "--strategies", "bad,seqft,freeze"]
    argv += ["--seeds", "1", "--run.checkpoints", "none", "--jobs", "2"]
    assert main(argv) == 2
    assert (
        "attribution.budget must be in (0, 1]"
        in (tmp_path / "runs" / "compare-toy" / "logs" / "bad-seed1.log").read_text()
    )
    runs = tmp_path / "runs" / "compare-toy" / "runs"
    assert json.loads((runs / "seqft-seed1" / "results.json").read_text())["status"] == "complete"
    assert not (runs / "freeze-seed1").exists()
    assert "started freeze-seed1" not in capsys.readouterr().out


def test_fits_do_not_import_modules_of_the_working_directory(
    trace_dir, tiny_model_dir, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    for stray in ("strategies", "clbench"):  # named like clbench's own packages
        (work / f"{stray}.py").write_text(f"raise RuntimeError('imported the stray {stray}.py')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    trap = subprocess.run(
        [sys.executable, "-m", "clbench"], cwd=work, env=env, capture_output=True, text=True
    )
    assert "imported the stray clbench.py" in trap.stderr  # what `python -m clbench` does here
    cfg = write_config(tmp_path / "toy.yaml", toy(tmp_path, trace_dir, tiny_model_dir))
    monkeypatch.chdir(work)
    argv = ["compare", "--config", str(cfg), "--strategies", "seqft", "--seeds", "1"]
    assert main([*argv, "--run.checkpoints", "none", "--run.evaluate", "needed"]) == 0
    results = tmp_path / "runs" / "compare-toy" / "runs" / "seqft-seed1" / "results.json"
    assert json.loads(results.read_text())["status"] == "complete"


def test_a_collapsed_run_is_marked_not_averaged_and_compare_goes_on(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    presets = tmp_path / "presets"
    presets.mkdir()
    write_config(presets / "hot.yaml", {"strategy": "seqft", "model": {"lr": 1e6}})  # collapses at once
    path = write_config(tmp_path / "toy.yaml", toy(tmp_path, trace_dir, tiny_model_dir))
    argv = ["compare", "--config", str(path), "--strategies", "seqft,hot", "--seeds", "1", "--presets"]
    argv += [str(presets), "--baseline", "seqft", "--run.checkpoints", "none", "--run.evaluate", "needed"]
    assert main(argv) == 0
    folder = tmp_path / "runs" / "compare-toy"
    hot = json.loads((folder / "runs" / "hot-seed1" / "results.json").read_text())
    assert hot["status"] == "diverged" and "training collapsed" in hot["error"]
    md = (folder / "comparison.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| hot")]
    assert row.startswith("| hot (**1 diverged**) | 0 |") and "**diverged** [seed 1]" in row
    assert "| seqft | 1 | " in md
    csv_row = [
        line for line in (folder / "comparison.csv").read_text().splitlines() if line.startswith("hot")
    ]
    assert csv_row[0].endswith(",,runs/hot-seed1")  # no completed run, one diverged run
    capsys.readouterr()
    assert main(argv) == 0  # the same inputs: the collapsed run is reused as it is, not retrained
    assert f"reusing finished run {folder / 'runs' / 'hot-seed1'}" in capsys.readouterr().out
