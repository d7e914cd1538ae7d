"""General ability through lm-eval (clbench/evaluation/general.py): measured before the stream, after
each task where asked and after it, in results.json, results.md and the logger; a run trains as it
would without it; resume keeps what was measured; the identity covers the task files; bad input is
one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.errors import ConfigError
from clbench.identity import differences, run_identity
from clbench.strategy import CLStrategy
from clbench.testing import write_general_tasks

HERE = Path(__file__).parent


def toy(trace_dir: Path, model_dir: Path, out: Path, **general) -> dict:
    import sys

    sys.path.insert(0, str(HERE.parent / "core"))
    from test_fit import toy_config

    cfg = toy_config(trace_dir, model_dir, out)
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 1
    cfg["run"]["checkpoints"] = "none"
    if general:
        cfg["general"] = general
    return cfg


def fit(tmp_path: Path, cfg: dict, name: str, *args: str) -> dict:
    cfg["run"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["fit", "--config", str(path), *args]) == 0
    return json.loads((Path(cfg["run"]["output_dir"]) / name / "results.json").read_text())


@pytest.fixture(scope="module")
def general_tasks(tmp_path_factory) -> list[str]:
    return write_general_tasks(tmp_path_factory.mktemp("general"))


def test_general_ability_is_measured_and_training_is_unchanged(
    trace_dir, tiny_model_dir, tmp_path, general_tasks
):
    out = tmp_path / "runs"
    with_general = fit(
        tmp_path, toy(trace_dir, tiny_model_dir, out, tasks=general_tasks, batch_size=4, every_task=True), "g"
    )
    plain = fit(tmp_path, toy(trace_dir, tiny_model_dir, out), "plain")
    # lm-eval seeds the global generators: they are given back, so training is the same to the bit
    assert with_general["matrix"] == plain["matrix"]
    for task in plain["tasks"]:
        assert with_general["per_task"][task]["train_loss"] == plain["per_task"][task]["train_loss"]
    assert plain["general"] is None

    g = with_general["general"]
    assert g["tasks"] == ["toy_sum", "toy_choice"] and g["lm_eval"]
    assert sorted(g["rows"], key=int) == ["0", "1", "2", "3"]  # before, after every task
    for row in g["rows"].values():
        assert set(row) == {"toy_sum", "toy_choice"}
        assert set(row["toy_sum"]) == {"exact_match,number"}
        assert set(row["toy_choice"]) == {"acc,none", "acc_norm,none"}
        for metrics in row.values():
            for m in metrics.values():
                assert 0.0 <= m["value"] <= 1.0 and m["stderr"] is not None and m["higher_is_better"] is True
    before, after = g["rows"]["0"], g["rows"]["3"]
    for task, metrics in after.items():
        for key, m in metrics.items():
            assert g["change"][task][key] == pytest.approx(m["value"] - before[task][key]["value"])
    primaries = [g["change"]["toy_sum"]["exact_match,number"], g["change"]["toy_choice"]["acc,none"]]
    assert g["mean_change"] == pytest.approx(sum(primaries) / 2)
    # the model changed, so at least one log-likelihood score moved (12 four-way questions)
    assert any(g["rows"][r]["toy_choice"] != before["toy_choice"] for r in ("1", "2", "3"))

    run = out / "g"
    for r in range(4):  # lm-eval's per-document samples, one line per test document
        lines = (run / "general" / f"after_{r}" / "toy_choice.jsonl").read_text().splitlines()
        assert len(lines) == 12 and {"doc", "target", "resps", "acc"} <= set(json.loads(lines[0]))
    report = (run / "results.md").read_text()
    assert "## General ability (lm-eval)" in report
    line = next(x for x in report.splitlines() if x.startswith("| toy_choice | acc,none |"))
    assert line.count("±") == 4 and line.endswith(f"| {g['change']['toy_choice']['acc,none']:+.3f} |")
    assert with_general["timings"]["general_s"] > 0
    # logged where the run logs (TensorBoard by default)
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert any(b"general/toy_choice/acc,none" in f.read_bytes() for f in events)


class StopAtTask2(CLStrategy):
    """Stops the run at the start of task 2, as SIGTERM would, unless CLBENCH_TEST_GO_ON is set."""

    def on_task_start(self, ctx) -> None:
        if ctx.task_index == 1 and not os.environ.get("CLBENCH_TEST_GO_ON"):
            raise SystemExit(143)


def test_resume_keeps_what_was_measured(trace_dir, tiny_model_dir, tmp_path, general_tasks, monkeypatch):
    out = tmp_path / "runs"
    whole = fit(tmp_path, toy(trace_dir, tiny_model_dir, out, tasks=general_tasks, batch_size=4), "whole")
    assert sorted(whole["general"]["rows"]) == ["0", "3"]  # before and after only

    cfg = toy(trace_dir, tiny_model_dir, out, tasks=general_tasks, batch_size=4)
    cfg["strategy"] = "test_general.StopAtTask2"
    cfg["run"]["name"] = "cut"
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "cut.yaml")])
    run = out / "cut"
    before = json.loads((run / "results.json").read_text())["general"]["rows"]["0"]
    sample = run / "general" / "after_0" / "toy_sum.jsonl"
    mtime = sample.stat().st_mtime_ns
    monkeypatch.setenv("CLBENCH_TEST_GO_ON", "1")
    assert main(["fit", "--resume", str(run)]) == 0
    got = json.loads((run / "results.json").read_text())
    assert got["status"] == "complete"
    assert got["general"]["rows"]["0"] == before == whole["general"]["rows"]["0"]
    assert sample.stat().st_mtime_ns == mtime  # not measured again
    assert got["general"]["rows"] == whole["general"]["rows"] and got["matrix"] == whole["matrix"]


def test_the_identity_covers_the_task_files(trace_dir, tiny_model_dir, tmp_path):
    from clbench.data.loaders import StreamConfig, TaskConfig, load_stream

    tasks = write_general_tasks(tmp_path / "general")
    stream = load_stream(
        StreamConfig(name="toy", data_root=str(trace_dir), tasks=[TaskConfig(name="parity", path="parity")])
    )
    then = run_identity("x", stream, str(tiny_model_dir), "32-true", None, tasks)
    assert then["general"]["tasks"][tasks[0]]["task"] == "toy_sum"
    assert differences(then, run_identity("x", stream, str(tiny_model_dir), "32-true", None, tasks)) == []
    data = tmp_path / "general" / "toy_general" / "test.jsonl"
    data.write_text(data.read_text().replace("plus", "added to", 1))
    now = run_identity("x", stream, str(tiny_model_dir), "32-true", None, tasks)
    assert differences(then, now) == [f"the general-ability tasks ({', '.join(sorted(tasks))})"]
    # a registry task: its YAML in lm-eval's package is hashed (its data are the hub's, by name)
    registry = run_identity("x", stream, str(tiny_model_dir), "32-true", None, ["piqa"])["general"]
    assert registry["tasks"]["piqa"]["yaml_sha256"] and registry["lm_eval"]


@pytest.mark.parametrize(
    "tasks, expected",
    [
        (
            ["no_such_lm_eval_task_xyz"],
            "general.tasks: no_such_lm_eval_task_xyz: lm-eval knows no task or group",
        ),
        (["missing/task.yaml"], "general.tasks: missing/task.yaml: no such task file"),
        (["tydiqa_goldp"], "general.tasks: tydiqa_goldp: is a tag in lm-eval, which reports no score for it"),
        ("broken", "general.tasks: lm-eval cannot build toy_sum, toy_choice"),
    ],
)
def test_unknown_tasks_are_one_line(trace_dir, tiny_model_dir, tmp_path, capsys, tasks, expected):
    if tasks == "broken":  # a loader that is not there: lm-eval fails when it builds the task
        tasks = write_general_tasks(tmp_path / "general")
        (tmp_path / "general" / "toy_general.py").write_text("def other(**kwargs):\n    pass\n")
    cfg = toy(trace_dir, tiny_model_dir, tmp_path / "runs", tasks=tasks)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option, value", [("limit", "0"), ("num_fewshot", "-1"), ("batch_size", "0")])
def test_bad_settings_are_one_line_naming_the_field(
    trace_dir, tiny_model_dir, tmp_path, capsys, option, value
):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy(trace_dir, tiny_model_dir, tmp_path / "runs")), encoding="utf-8")
    assert main(["fit", "--config", str(path), f"--general.{option}", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"general.{option}: must be" in err, err


def test_a_task_file_without_a_name_is_a_config_error(tmp_path):
    from clbench.evaluation.general import task_name

    (tmp_path / "t.yaml").write_text("output_type: multiple_choice\n")
    with pytest.raises(ConfigError, match="has no `task:` name"):
        task_name(str(tmp_path / "t.yaml"))


def lm_eval_cli(model_args: str, tasks: list[str], batch_size: int, out: Path, *extra: str) -> dict:
    """What the `lm_eval` command line reports for a saved model: {task: {"metric,filter": value}}."""
    import subprocess
    import sys

    from clbench.evaluation.general import task_name

    folders = sorted({str(Path(t).parent) for t in tasks})
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args", model_args]
    cmd += ["--tasks", ",".join(task_name(t) for t in tasks), "--include_path", *folders]
    cmd += ["--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


def assert_same_numbers(ours: dict[str, dict], theirs: dict[str, dict]) -> None:
    """clbench's scores (value and stderr of every metric) equal lm_eval's, to the bit."""
    assert set(ours) <= set(theirs)
    for task, metrics in ours.items():
        assert metrics, task
        for key, m in metrics.items():
            metric, _, filt = key.partition(",")
            assert m["value"] == theirs[task][key], (task, key)
            assert m["stderr"] == theirs[task][f"{metric}_stderr,{filt}"], (task, key)


BUNDLED = [str(HERE.parents[1] / "data" / "general" / f"{t}.yaml") for t in ("clb_arith", "clb_currency")]


@pytest.mark.parametrize("case", ["full", "lora", "bf16-mixed"])
def test_the_numbers_are_lm_eval_s_on_the_saved_model(trace_dir, tiny_model_dir, tmp_path, case):
    """Peer-exact, on the bundled suite: the scores clbench measured in process after the last task
    equal what the `lm_eval` command line prints on that task's checkpoint (LoRA: the base model with
    the saved adapter; bf16-mixed: lm_eval's mixed_precision_dtype bfloat16 on the fp32 weights)."""
    lora = case == "lora"
    cfg = toy(trace_dir, tiny_model_dir, tmp_path / "runs", tasks=BUNDLED, batch_size=4, limit=10)
    cfg["run"]["checkpoints"] = "last"
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    if lora:
        cfg["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    if case == "bf16-mixed":
        cfg["trainer"]["precision"] = "bf16-mixed"
    res = fit(tmp_path, cfg, "run")
    after = res["general"]["rows"]["2"]
    assert set(after) == {"clb_arith", "clb_currency"}
    # trained: the model's log-likelihoods of the choices moved (its scores may not, on 10 documents)
    run = tmp_path / "runs" / "run" / "general"
    resps = [
        [json.loads(x)["resps"] for x in (run / f"after_{r}" / "clb_currency.jsonl").read_text().splitlines()]
        for r in (0, 2)
    ]
    assert len(resps[0]) == 10 and resps[0] != resps[1]
    checkpoint = tmp_path / "runs" / "run" / "checkpoints" / "task2-reverse"
    model_args = f"pretrained={tiny_model_dir},peft={checkpoint}" if lora else f"pretrained={checkpoint}"
    model_args += ",dtype=float32" + (",mixed_precision_dtype=bfloat16" if case == "bf16-mixed" else "")
    cli = lm_eval_cli(model_args, BUNDLED, 4, tmp_path / "lm_eval", "--limit", "10")
    assert_same_numbers(after, cli)
    if case == "bf16-mixed":  # and bf16 really ran: fp32 gives other log-likelihoods
        lm_eval_cli(
            model_args.replace(",mixed_precision_dtype=bfloat16", ""),
            BUNDLED,
            4,
            tmp_path / "fp32",
            "--limit",
            "10",
            "--log_samples",
        )
        theirs = [
            json.loads(x)["resps"]
            for f in sorted((tmp_path / "fp32").rglob("samples_clb_currency_*.jsonl"))
            for x in f.read_text().splitlines()
        ]
        ours = [
            json.loads(x)["resps"] for x in (run / "after_2" / "clb_currency.jsonl").read_text().splitlines()
        ]
        assert len(theirs) == len(ours) == 10 and sorted(map(str, theirs)) != sorted(map(str, ours))
