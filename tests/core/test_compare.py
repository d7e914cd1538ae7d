"""`clbench compare`: aggregation by hand, reuse of finished runs, and a tiny end-to-end comparison."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.compare import plan as planning
from clbench.compare.plan import Run, fit_arguments
from clbench.compare.report import aggregate, csv_text, markdown_table, mean_std
from clbench.records import read_record


def fake_run(seed, op, bwt_trace, bwt_gem, fwt, final_a, train_s, eval_s, mem):
    return {
        "status": "complete",
        "stream": "toy",
        "seed": seed,
        "tasks": ["a"],
        "summary": {"OP": op, "BWT_TRACE": bwt_trace, "BWT_GEM": bwt_gem, "FWT": fwt},
        "per_task": {"a": {"final": final_a}},
        "timings": {"train_s": train_s, "eval_s": eval_s, "peak_memory_mb": mem, "steps": {"a": 4}},
    }


def test_mean_std_by_hand():
    assert mean_std([]) == (None, None)
    assert mean_std([None, None]) == (None, None)
    assert mean_std([0.25, None]) == (0.25, None)  # one value: no std
    mean, std = mean_std([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt((4 + 1 + 9) / 2))  # sample std, ddof=1


def test_aggregate_and_tables():
    runs = {
        "seqft": [
            fake_run(1, 0.5, -0.2, None, None, 0.4, 10.0, 2.0, 100.0),
            fake_run(2, 0.7, -0.4, -0.1, None, 0.8, 14.0, 4.0, 200.0),
        ],
        "replay": [fake_run(1, 0.9, 0.0, 0.0, None, 0.9, 20.0, 2.0, 150.0)],
    }
    seqft, replay = aggregate(runs)
    assert seqft["strategy"] == "seqft" and seqft["n_seeds"] == 2 and seqft["seeds"] == [1, 2]
    assert seqft["OP"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert seqft["BWT (TRACE)"] == pytest.approx((-0.3, math.sqrt(0.02)))
    assert seqft["BWT (GEM)"] == pytest.approx((-0.1, None))  # None on one seed: the other alone
    assert seqft["FWT"] == (None, None)
    assert seqft["final a"] == pytest.approx((0.6, math.sqrt(0.08)))
    assert seqft["wall time s"] == pytest.approx((15.0, math.sqrt(18.0)))  # 12 and 18
    assert seqft["peak memory MB"] == pytest.approx((150.0, math.sqrt(5000.0)))
    assert seqft["step time s"] == pytest.approx((3.0, math.sqrt(0.5)))  # 10 and 14 s over 4 steps
    assert seqft["eval time s"] == pytest.approx((3.0, math.sqrt(2.0)))
    assert replay["OP"] == (0.9, None) and replay["n_seeds"] == 1

    md = markdown_table([seqft, replay]).splitlines()
    assert md[0].startswith(
        "| strategy | n seeds | OP | BWT (TRACE) | BWT (GEM) | FWT | own-task score | final a |"
    )
    assert md[2].startswith(
        "| seqft | 2 | 0.600 ± 0.141 | -0.300 ± 0.141 | -0.100 |  |  | 0.600 ± 0.283 | 15 ± 4 |"
    )
    assert "[seed 2](runs/seqft-seed2/results.md)" in md[2]
    assert md[3].startswith("| replay | 1 | 0.900 | 0.000 | 0.000 |  |  | 0.900 | 22 | 5.000 | 2 | 150 |")

    rows = list(csv.DictReader(csv_text([seqft, replay]).splitlines()))
    assert [r["strategy"] for r in rows] == ["seqft", "replay"]
    assert float(rows[0]["OP mean"]) == pytest.approx(0.6)
    assert float(rows[0]["OP std"]) == pytest.approx(math.sqrt(0.02))
    assert rows[0]["FWT mean"] == "" and rows[1]["OP std"] == ""
    assert rows[0]["runs"] == "runs/seqft-seed1 runs/seqft-seed2"


def test_a_job_decides_from_the_run_folder_and_nothing_is_deleted(tmp_path, monkeypatch, capsys):
    """What a run's job does when it starts (or restarts after a requeue), from what its folder holds."""
    runs = tmp_path / "runs"  # a comparison's runs/ folder
    runs.mkdir()
    for name, status in (("crashed", "running"), ("changed", "complete"), ("done", "complete")):
        (runs / name).mkdir()
        (runs / name / "results.json").write_text(json.dumps({"status": status, "seed": 1}))
    (runs / "empty").mkdir()
    monkeypatch.setattr(planning, "run_change", lambda run: "model.lr" if run.dir.name == "changed" else None)

    def start(name, decides=True):
        return fit_arguments(Run("seqft", runs / name, [name]), decides)

    assert start("done") is None and (runs / "done").is_dir()  # finished as asked: nothing to do
    assert start("crashed", decides=False) == ["crashed"] and (runs / "crashed").is_dir()  # not rank 0
    assert start("crashed") == ["crashed"] and not (runs / "crashed").exists()
    assert start("changed") == ["changed"] and not (runs / "changed").exists()
    assert start("empty") == ["empty"] and (runs / "empty").is_dir()  # nothing to keep
    assert start("missing") == ["missing"]
    for name in ("crashed.incomplete-*", "changed.changed-*"):
        (aside,) = (tmp_path / "superseded").glob(name)  # moved out of runs/, never deleted
        assert json.loads((aside / "results.json").read_text())["seed"] == 1
    assert "(incomplete) to " in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config", "nosuch.yaml", "--strategies", "seqft"], "nosuch.yaml: config file not found"),
        (["--config", "CFG", "--strategies", "seqft,nosuch"], "unknown strategy 'nosuch'"),
        (["--config", "CFG", "--strategies", "seqft", "--seeds", "1,x"], "--seeds: expected"),
        (["--config", "CFG"], "required: --strategies"),
        (["--config", "CFG", "--strategies", "seqft", "--strategy", "ewc"], "--strategy: set by compare"),
        (["--config", "CFG", "--strategies", "ewc", "--baseline", "seqft"], "--baseline: 'seqft' is not one"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, expected):
    cfg = write_config(tmp_path / "toy.yaml", {"stream": {"name": "toy"}})
    args = [str(cfg) if a == "CFG" else a for a in args]
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_compare_end_to_end_then_reuse(trace_dir, tiny_model_dir, tmp_path, capsys):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    for task in cfg["stream"]["tasks"]:
        task.update(epochs=1, max_prompt_tokens=64, max_answer_tokens=16)  # the tiny model's context: 256
    path = write_config(tmp_path / "toy.yaml", cfg)
    argv = ["compare", "--config", str(path), "--strategies", "seqft,replay", "--seeds", "1,2"]
    argv += ["--run.checkpoints", "none"]  # passed through to every fit
    assert main(argv) == 0
    # --jobs 1: each fit's console shows in compare's own, once, as well as in its log
    shown = capsys.readouterr().out
    assert shown.count("clbench: seqft on toy: OP") == 2 and shown.count("clbench: replay on toy: OP") == 2
    out = tmp_path / "runs" / "compare-toy"
    names = ["replay-seed1", "replay-seed2", "seqft-seed1", "seqft-seed2"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == names
    assert not (out / "runs" / "seqft-seed1" / "checkpoints").exists()
    for name in names:  # each run records its entry, which the studies group by
        assert read_record(out / "runs" / name).entry == name.rsplit("-seed", 1)[0]
        assert yaml.safe_load((out / "runs" / name / "config.yaml").read_text())["run"]["entry"] in name
    md = (out / "comparison.md").read_text()
    table = [ln.split(" | ")[0] for ln in md.splitlines() if ln.startswith("| ") and "seed 1]" in ln]
    assert table == ["| seqft", "| replay"]  # one row per strategy
    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    assert [r["strategy"] for r in rows] == ["seqft", "replay"] and {r["n_seeds"] for r in rows} == {"2"}
    for r in rows:
        assert 0.0 <= float(r["OP mean"]) <= 1.0 and float(r["OP std"]) >= 0.0
        assert {"final parity mean", "final upper std", "wall time s mean"} <= set(r)
    assert (out / "comparison.png").stat().st_size > 1000
    assert (out / "comparison-pareto.png").stat().st_size > 1000  # OP against BWT
    assert not list(out.glob("*.tmp")) and not list(out.glob("tmp-*"))

    mtimes = {n: (out / "runs" / n / "results.json").stat().st_mtime_ns for n in names}
    capsys.readouterr()
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("reusing finished run") == 4 and "OP" not in stdout  # fit prints OP; none ran
    assert mtimes == {n: (out / "runs" / n / "results.json").stat().st_mtime_ns for n in names}
    assert (out / "comparison.md").read_text() == md


def test_finished_only_tabulates_what_finished_and_touches_nothing(tmp_path, capsys):
    cfg = write_config(
        tmp_path / "toy.yaml", {"stream": {"name": "toy"}, "run": {"output_dir": str(tmp_path)}}
    )
    runs = tmp_path / "compare-toy" / "runs"
    for name, results in (("seqft-seed1", fake_run(1, 0.5, -0.1, -0.2, 0.0, 0.4, 10, 5, 100)),
                          ("seqft-seed2", {"status": "running"})):  # fmt: skip
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(results))
    argv = ["compare", "--config", str(cfg), "--strategies", "seqft,replay", "--seeds", "1,2"]
    assert main([*argv, "--finished_only"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["seqft-seed1", "seqft-seed2"]  # nothing ran or moved
    md = (tmp_path / "compare-toy" / "comparison.md").read_text()
    assert "| seqft | 1 | 0.500 |" in md and "| replay" not in md
    assert "Not finished or not run: seqft-seed2, replay-seed1, replay-seed2." in md
    capsys.readouterr()
    assert main(["compare", "--config", str(cfg), "--strategies", "replay", "--finished_only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished run among replay-seed1234" in err


def test_paired_differences_to_a_baseline_use_the_seeds_both_ran():
    runs = {
        "seqft": [
            fake_run(1, 0.5, -0.2, None, None, 0.4, 1, 1, 1),
            fake_run(2, 0.3, -0.4, None, None, 0.4, 1, 1, 1),
        ],
        "gate": [
            fake_run(1, 0.6, -0.1, None, None, 0.4, 1, 1, 1),  # +0.1 OP, +0.1 BWT against seqft seed 1
            fake_run(2, 0.5, -0.1, None, None, 0.4, 1, 1, 1),  # +0.2, +0.3 against seed 2
            fake_run(3, 0.9, 0.0, None, None, 0.4, 1, 1, 1),  # no seqft seed 3: not paired
        ],
    }
    seqft, gate = aggregate(runs, baseline="seqft")
    assert gate["ΔOP vs seqft"] == pytest.approx((0.15, math.sqrt(0.005)))
    assert gate["ΔBWT (TRACE) vs seqft"] == pytest.approx((0.2, math.sqrt(0.02)))
    assert seqft["ΔOP vs seqft"] == (None, None)
    assert gate["OP"] == pytest.approx(
        (2.0 / 3, math.sqrt(((0.6 - 2 / 3) ** 2 + (0.5 - 2 / 3) ** 2 + (0.9 - 2 / 3) ** 2) / 2))
    )
    header = markdown_table([seqft, gate]).splitlines()[0]
    assert header.startswith(
        "| strategy | n seeds | OP | BWT (TRACE) | BWT (GEM) | FWT | own-task score | ΔOP vs seqft |"
    )
    assert "| +0.150 ± 0.071 | +0.200 ± 0.141 |  |" in markdown_table([seqft, gate])
    assert "Δ" not in markdown_table(aggregate(runs))  # no baseline, no paired columns


def test_own_task_score_is_the_diagonal_mean_and_is_paired_like_op():
    def with_matrix(seed, diagonal):
        run = fake_run(seed, 0.5, -0.1, None, None, 0.4, 1, 1, 1)
        run["matrix"] = [[0.0, 0.0], [diagonal[0], 0.1], [0.2, diagonal[1]]]  # row 2's first cell: not own
        return run

    runs = {
        "seqft": [with_matrix(1, (0.8, 0.6)), with_matrix(2, (0.6, 0.6))],
        "gate": [with_matrix(1, (0.6, 0.4)), with_matrix(2, (0.6, 0.5))],
    }
    seqft, gate = aggregate(runs, baseline="seqft")
    assert seqft["own-task score"] == pytest.approx((0.65, math.sqrt(0.005)))  # 0.7 and 0.6
    assert gate["own-task score"] == pytest.approx((0.525, math.sqrt(0.00125)))  # 0.5 and 0.55
    assert gate["Δown-task score vs seqft"] == pytest.approx((-0.125, math.sqrt(0.01125)))  # -0.2, -0.05


def test_an_interrupted_run_with_its_saved_state_is_resumed_not_rerun(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setattr(planning, "run_change", lambda run: None)  # its config.yaml is this invocation's
    (runs / "killed" / "resume").mkdir(parents=True)
    (runs / "killed" / "resume" / "complete").write_text("")
    (runs / "killed" / "results.json").write_text(json.dumps({"status": "interrupted", "seed": 1}))
    run = Run("seqft", runs / "killed", ["fresh"])
    assert fit_arguments(run) == ["--resume", str(runs / "killed")]
    assert fit_arguments(run) == ["--resume", str(runs / "killed")]  # a requeued job: the same again
    monkeypatch.setattr(planning, "run_change", lambda run: "model.lr")  # another config: rerun it
    assert fit_arguments(run) == ["fresh"]
    assert list((tmp_path / "superseded").glob("killed.incomplete-*"))


def test_jobs_train_side_by_side_with_the_numbers_of_one_at_a_time(
    trace_dir, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Two attribution runs that need the same LRP priors (random permutes LRP's), side by side:
    each prior is computed once, each run's results land under its own strategy, and they are those
    of the same runs trained one after the other. (Waiting for a prior another run is computing:
    tests/strategies/test_attribution.py.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads either way: the same rounding
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    for task in cfg["stream"]["tasks"]:
        task.update(epochs=1, max_prompt_tokens=64, max_answer_tokens=16)
    cfg["run"].update(evaluate="needed", checkpoints="none")
    presets = tmp_path / "presets"
    presets.mkdir()
    for name, estimator in (("lrp-q50", "lrp"), ("random-q50", "random")):
        args = {"gate_target": "update", "estimator": estimator, "budget": 0.5}
        args |= {"correct_threshold": 0.0, "max_prior_samples": 4, "top_k": 2}
        write_config(presets / f"{name}.yaml", {"strategy": {"class_path": "attribution", "init_args": args}})
    argv = ["compare", "--config", str(write_config(tmp_path / "toy.yaml", cfg)), "--presets", str(presets)]
    argv += ["--strategies", "lrp-q50,random-q50", "--seeds", "1"]
    assert main([*argv, "--name", "side", "--jobs", "2"]) == 0
    assert main([*argv, "--name", "serial"]) == 0
    out = capsys.readouterr().out
    assert out.count("clbench compare: started") == 4 and out.count("clbench compare: finished") == 4

    def run(folder: str, name: str) -> tuple[dict, list[dict]]:
        d = tmp_path / "runs" / folder / "runs" / f"{name}-seed1"
        used = json.loads((d / "importance" / "used.json").read_text())["maps"]
        return json.loads((d / "results.json").read_text()), used

    for name in ("lrp-q50", "random-q50"):
        (side, _), (serial, _) = run("side", name), run("serial", name)
        assert side["status"] == "complete" and side["matrix"] == serial["matrix"], name
        log = tmp_path / "runs" / "side" / "logs" / f"{name}-seed1.log"
        assert "clbench: task 3/3 upper" in log.read_text()  # the fit's console, in its log
    lrp, random = run("side", "lrp-q50")[1], run("side", "random-q50")[1]
    assert [m["task"] for m in lrp] == [m["task"] for m in random] == ["parity", "reverse"]
    for a, b in zip(lrp, random):
        assert sorted([a["reused"], b["reused"]]) == [False, True], (a, b)  # computed once
    assert run("side", "lrp-q50")[0]["matrix"] != run("side", "random-q50")[0]["matrix"]


def test_compare_keeps_its_own_options_and_passes_every_other_argument_to_each_fit(tmp_path):
    from clbench.compare import parse_args

    cfg = write_config(tmp_path / "toy.yaml", {"stream": {"name": "toy"}})
    argv = ["--strategy.ewc_lambda", "-1", "--finished_only", f"--config={cfg}", "--trainer.fast_dev_run"]
    argv += [
        "--strategies",
        "ewc",
        "--model.lora",
        "{r: 4}",
        "--jobs",
        "2",
        "--slurm.time=5",
        "--run.checkpoints",
    ]
    argv += ["none"]
    args, passthrough = parse_args(argv)
    expected = ["--strategy.ewc_lambda", "-1", "--trainer.fast_dev_run", "--model.lora", "{r: 4}"]
    assert passthrough == [*expected, "--run.checkpoints", "none"]
    assert args.finished_only and args.jobs == 2 and args.slurm.time == 5 and args.strategies == ["ewc"]
    assert args.config == str(cfg)


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--strategies", "seqft,ewc", "--run.chekpoints", "none", "--jobs", "2"],
            "the fit arguments of seqft: command line: --run.chekpoints: not an option of clbench fit",
        ),
        (
            ["--strategies", "seqft,ewc-x", "--presets", "PRESETS"],
            "the fit arguments of ewc-x: PRESETS/ewc-x.yaml: strategy.ewc_lambd: not an option of ewc",
        ),
        (["--strategies", "seqft,ewc-x", "--presets", "nosuch"], "--presets: nosuch: no such folder"),
    ],
)
def test_fit_arguments_and_presets_are_checked_before_anything_starts(
    args, expected, trace_dir, tiny_model_dir, tmp_path, capsys
):
    """A misspelt option reaches no fit (under --jobs it would fail in every fit's log, after they all
    started); a presets folder that does not exist is named, not blamed on the strategy."""
    presets = tmp_path / "presets"
    presets.mkdir()
    write_config(presets / "ewc-x.yaml", {"strategy": {"class_path": "ewc", "init_args": {"ewc_lambd": 3}}})
    cfg = write_config(tmp_path / "toy.yaml", toy_config(trace_dir, tiny_model_dir, tmp_path / "runs"))
    args = [str(presets) if a == "PRESETS" else a for a in args]
    assert main(["compare", "--config", str(cfg), "--seeds", "1,2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.replace("PRESETS", str(presets)) in err, err
    assert not (tmp_path / "runs").exists()


def test_two_entries_that_used_the_same_settings_are_named_as_one_run():
    from clbench.compare.report import same_runs

    def run(seed: int, demonstrations: int, score: float = 0.5) -> dict:
        used = {"parity": {"demonstrations": demonstrations, "shots": 3}}
        return {"seed": seed, "strategy": "ssr", "strategy_used": used, "matrix": [[score]]}

    runs = {
        "ssr-d16": [run(1, 10), run(2, 10)],
        "ssr-d32": [run(1, 10), run(2, 10)],  # both capped to the task's 10 examples
        "ssr-d8": [run(1, 8), run(2, 8)],
        "seqft": [{"seed": 1, "strategy": "seqft", "strategy_used": {}, "matrix": [[0.5]]}],
    }
    assert same_runs(runs) == [
        "ssr-d16 and ssr-d32 used the same settings on every task (strategy_used in results.json) and got "
        "the same numbers: one run under two names."
    ]


def test_a_comparison_folder_that_cannot_be_made_is_one_line(trace_dir, tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "toy.yaml", toy_config(trace_dir, tiny_model_dir, tmp_path / "runs"))
    argv = ["compare", "--config", str(cfg), "--strategies", "seqft", "--output_dir", f"{cfg}/x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"clbench compare: error: {cfg}/x/compare-toy: cannot create the comparison folder " + (
        "(Not a directory)"
    )


def test_general_ability_change_is_a_column_paired_to_the_baseline_and_plotted(tmp_path):
    from clbench.compare.report import write_comparison

    def with_general(seed, op, gsm_before, gsm_after, mc_before, mc_after):
        run = fake_run(seed, op, -0.1, None, None, 0.4, 1, 1, 1)
        run["timings"]["general_s"] = 3
        row = lambda gsm, mc: {  # noqa: E731
            "gsm": {"exact_match,flex": {"value": gsm, "stderr": 0.05, "higher_is_better": True}},
            "mc": {
                "acc,none": {"value": mc, "stderr": 0.05, "higher_is_better": True},
                "acc_norm,none": {"value": 0.0, "stderr": 0.0, "higher_is_better": True},
            },
        }
        change = {
            "gsm": {"exact_match,flex": gsm_after - gsm_before},
            "mc": {"acc,none": mc_after - mc_before},
        }
        mean = ((gsm_after - gsm_before) + (mc_after - mc_before)) / 2
        run["general"] = {"rows": {"0": row(gsm_before, mc_before), "1": row(gsm_after, mc_after)}}
        run["general"] |= {"change": change, "mean_change": mean}
        return run

    runs = {
        "seqft": [with_general(1, 0.5, 0.4, 0.1, 0.6, 0.4), with_general(2, 0.4, 0.4, 0.2, 0.6, 0.6)],
        "replay": [with_general(1, 0.6, 0.4, 0.3, 0.6, 0.5), with_general(2, 0.5, 0.4, 0.4, 0.6, 0.6)],
    }
    seqft, replay = aggregate(runs, baseline="seqft")
    assert seqft["general change"] == pytest.approx((-0.175, math.sqrt(0.01125)))  # -0.25 and -0.1 (ddof 1)
    assert replay["general change"] == pytest.approx((-0.05, math.sqrt(0.005)))  # -0.1 and 0.0
    assert replay["Δgeneral change vs seqft"] == pytest.approx((0.125, math.sqrt(0.00125)))  # +0.15, +0.1
    assert seqft["general Δ gsm exact_match,flex"] == pytest.approx((-0.25, math.sqrt(0.005)))
    assert seqft["wall time s"] == (5, 0)  # train + eval + general
    header = markdown_table([seqft, replay]).splitlines()[0]
    assert "| own-task score | general change | ΔOP vs seqft |" in header
    write_comparison(tmp_path, "c.yaml", [], runs, "seqft", 2, [])
    assert (tmp_path / "comparison-general.png").stat().st_size > 10_000
    assert "general change" in (tmp_path / "comparison.csv").read_text().splitlines()[0]
    # runs without general ability: no such column and no plot
    plain = {"seqft": [fake_run(1, 0.5, -0.1, None, None, 0.4, 1, 1, 1)]}
    assert "general" not in markdown_table(aggregate(plain))
    write_comparison(tmp_path / "plain", "c.yaml", [], plain, None, 1, [])
    assert not (tmp_path / "plain" / "comparison-general.png").exists()


def test_a_finished_run_that_measured_general_ability_is_reused(trace_dir, tiny_model_dir, tmp_path, capsys):
    """compare expects the identity a fit records, general-ability tasks included; a changed task
    file makes the finished run one to refuse."""
    from clbench.testing import write_general_tasks

    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:1]
    cfg["stream"]["tasks"][0].update(epochs=1)
    cfg["general"] = {"tasks": write_general_tasks(tmp_path / "general", n_test=4), "batch_size": 4}
    cfg["run"]["checkpoints"] = "none"
    argv = ["compare", "--config", str(write_config(tmp_path / "toy.yaml", cfg)), "--strategies", "seqft"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing finished run") == 1
    data = tmp_path / "general" / "toy_general" / "test.jsonl"
    data.write_text(data.read_text().replace("plus", "and", 1))
    assert main(argv) == 2
    assert "the general-ability tasks" in capsys.readouterr().err
