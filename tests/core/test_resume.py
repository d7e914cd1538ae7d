"""`clbench fit --resume`: a run killed with SIGKILL (during a task, during an evaluation, around the
save of its state) goes on from its last finished task and ends with the uninterrupted run's matrix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.errors import ConfigError
from clbench.strategy import CLStrategy

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STRATEGIES = {
    "seqft": "seqft",
    "ewc": {"class_path": "ewc", "init_args": {"ewc_lambda": 1000.0}},
    "attribution": {
        "class_path": "attribution",
        "init_args": {"correct_threshold": 0.0, "max_prior_samples": 6},
    },
}


def config(trace_dir: Path, model_dir: Path, out: Path, strategy: object) -> dict:
    cfg = toy_config(trace_dir, model_dir, out)
    cfg["strategy"] = strategy
    cfg["run"]["checkpoints"] = "none"
    for t in cfg["stream"]["tasks"]:
        t.update(epochs=6, max_prompt_tokens=64, max_answer_tokens=16)
    return cfg


# `clbench fit` whose resume-state writer pauses after each file, so that a kill can land inside a save
SLOW_SAVE = """
import sys, time
import clbench.resume as r
real = r.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(0.3)
r.save_file = slow
from clbench.cli import main
from clbench.errors import ConfigError
from clbench.strategy import CLStrategy
sys.exit(main(sys.argv[1:]))
"""


def start(cfg_path: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_SAVE, "fit", "--config", str(cfg_path)]
    return subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    """SIGKILL the run as soon as `ready()` holds (no clean-up runs: as a crash or the OOM killer)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def resume(run: Path, log: Path) -> None:
    cmd = [sys.executable, "-m", "clbench", "fit", "--resume", str(run)]
    done = subprocess.run(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, log.read_text()[-3000:]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


KILL_POINTS = {
    # while task 2 trains (its TensorBoard folder exists, row 2 not yet evaluated)
    "during a task": lambda run: (run / "tensorboard" / "task2-reverse").is_dir(),
    # while row 2 is evaluated (its first predictions are written, the row is not finished)
    "during an evaluation": lambda run: (run / "predictions" / "after_2").is_dir(),
    # inside the save of the state after task 2 (the state after task 1 is complete beside it)
    "during a save": lambda run: (
        (run / "resume" / "complete").is_file() and (run / "resume.tmp" / "model.safetensors").is_file()
    ),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_runs_resume_to_the_uninterrupted_matrix(strategy, trace_dir, tiny_model_dir, tmp_path):
    cfg = config(trace_dir, tiny_model_dir, tmp_path / "runs", STRATEGIES[strategy])
    path = write_config(tmp_path / "c.yaml", cfg)
    subprocess.run([sys.executable, "-m", "clbench", "fit", "--config", str(path), "--run.name", "whole"],
                   env=ENV, check=True, capture_output=True, timeout=300)  # fmt: skip
    whole = results(tmp_path / "runs" / "whole")
    for point, ready in KILL_POINTS.items():
        name = point.replace(" ", "-")
        cfg["run"]["name"] = name
        run = tmp_path / "runs" / name
        proc = start(write_config(tmp_path / f"{name}.yaml", cfg), tmp_path / f"{name}.log")
        kill_when(proc, lambda ready=ready, run=run: ready(run))
        assert results(run)["status"] == "running"  # killed: nothing could write otherwise
        assert (run / "resume" / "complete").is_file()
        assert not (run / "resume.tmp" / "complete").exists()  # a save cut short is never taken
        if point == "during an evaluation":  # as if killed between the two renames of the next save
            (run / "resume").rename(run / "resume.old")
            shutil.rmtree(run / "resume.tmp", ignore_errors=True)
            (run / "resume.tmp").mkdir()
            (run / "resume.tmp" / "model.safetensors").write_bytes(b"half")
        resume(run, tmp_path / f"{name}-resume.log")
        got = results(run)
        assert got["status"] == "complete", point
        assert got["matrix"] == whole["matrix"], point
        for task in whole["tasks"]:
            assert got["per_task"][task]["train_loss"] == whole["per_task"][task]["train_loss"], (point, task)
        assert not (run / "resume").exists()  # removed once complete


def interrupted_after_one_task(trace_dir: Path, model_dir: Path, tmp_path: Path) -> Path:
    """A run that stopped after its first task, as a kill leaves it: its state after task 1 saved
    (a strategy stops it at the start of task 2 with SystemExit, as SIGTERM does)."""
    cfg = config(trace_dir, model_dir, tmp_path / "runs", "test_resume.StopAtTask2")
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 1
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))])
    run = tmp_path / "runs" / "run"
    assert results(run)["status"] == "interrupted" and (run / "resume" / "complete").is_file()
    return run


class StopAtTask2(CLStrategy):
    def on_task_start(self, ctx) -> None:
        if ctx.task_index == 1 and not os.environ.get("CLBENCH_TEST_GO_ON"):
            raise SystemExit(143)


def test_resume_refuses_finished_runs_and_other_arguments(trace_dir, tiny_model_dir, tmp_path, capsys):
    cfg = config(trace_dir, tiny_model_dir, tmp_path / "runs", "seqft")
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 1
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = tmp_path / "runs" / "run"
    assert main(["fit", "--resume", str(run)]) == 2
    assert "is complete; nothing to resume" in capsys.readouterr().err
    state = results(run)
    state["status"] = "interrupted"
    (run / "results.json").write_text(json.dumps(state))
    shutil.copy(run / "results.json", tmp_path / "before.json")
    for extra in (["--model.lr", "0.5"], ["--run.name", "other"]):
        assert main(["fit", "--resume", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"takes no other argument (got {' '.join(extra)})" in err
    assert main(["fit", "--resume"]) == 2
    assert "expects the run folder" in capsys.readouterr().err
    assert (run / "results.json").read_text() == (tmp_path / "before.json").read_text()
    assert not (tmp_path / "runs" / "other").exists()


def test_resume_refuses_changed_data_an_edited_config_and_damaged_state(
    trace_dir, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    run = interrupted_after_one_task(trace_dir, tiny_model_dir, tmp_path)
    monkeypatch.setenv("CLBENCH_TEST_GO_ON", "1")
    before = results(run)

    def refused(expected: str) -> str:
        capsys.readouterr()
        assert main(["fit", "--resume", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert results(run) == before  # nothing trained, nothing rewritten
        return err

    train = trace_dir / "reverse" / "train.json"
    original = train.read_text()
    rows = json.loads(original)
    rows[0]["answer"] += "x"
    train.write_text(json.dumps(rows))  # a task not yet trained: its rows would mix with the old ones
    refused("changed since: the data of task reverse (train)")
    train.write_text(original)

    config_file = run / "config.yaml"
    text = config_file.read_text()
    config_file.write_text(text.replace("lr: 0.003", "lr: 0.03"))
    refused("config.yaml was edited after the run started")
    config_file.write_text(text)

    model = run / "resume" / "model.safetensors"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])  # truncated, as a full disk leaves it
    assert "no earlier state is kept: start the run again" in refused(f"{model} is damaged")
    model.write_bytes(good)

    assert main(["fit", "--resume", str(run)]) == 0  # all restored: it goes on
    assert results(run)["status"] == "complete"


def test_a_run_that_kept_no_state_says_why_it_cannot_resume(tmp_path, capsys):
    from clbench import resume

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(
        json.dumps({"status": "interrupted", "resumable": "no: run.resumable is false"})
    )
    with pytest.raises(ConfigError, match=r"cannot be resumed \(run.resumable is false\)"):
        resume.load(run)


def test_a_sharded_resume_state_refuses_what_it_could_not_give_back():
    import torch

    from clbench.resume import _check_shardable

    _check_shardable({"model::w": torch.ones(2), "optimizer::w::step": torch.tensor(3.0)})
    with pytest.raises(RuntimeError, match="optimizer::w::lr is not a tensor"):
        _check_shardable({"model::w": torch.ones(2), "optimizer::w::lr": 0.1})


def test_the_state_is_kept_until_results_say_complete(trace_dir, tiny_model_dir, tmp_path, monkeypatch):
    """A kill (a scheduler's time limit) between the last task and results.json's "complete" must
    leave a run that resumes: SLURM's requeue found one with neither and trained it all again."""
    from clbench.resume import has_state
    from clbench.runner import Runner

    seen = []
    real = Runner._write

    def write(self, status, error=None):
        seen.append((status, has_state(self.run_dir)))
        real(self, status, error)

    monkeypatch.setattr(Runner, "_write", write)
    cfg = config(trace_dir, tiny_model_dir, tmp_path / "runs", "seqft")
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 1
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    assert ("complete", True) in seen  # the state of the task before the last, still there
    assert (
        not has_state(tmp_path / "runs" / "run")
        and results(tmp_path / "runs" / "run")["status"] == "complete"
    )


def test_a_signal_after_complete_leaves_it_complete(trace_dir, tiny_model_dir, tmp_path, monkeypatch):
    """SLURM's time-limit signal (submitit exits the job) during the clean-up after results.json
    said "complete": the run stays complete, not "interrupted" with its state half removed."""
    import clbench.runner

    real = clbench.runner.shutil.rmtree

    def stopped(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if Path(path).name == "resume":
            raise SystemExit(143)

    monkeypatch.setattr(clbench.runner.shutil, "rmtree", stopped)
    cfg = config(trace_dir, tiny_model_dir, tmp_path / "runs", "seqft")
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 1
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert results(tmp_path / "runs" / "run")["status"] == "complete"
