"""End to end: `clbench fit` on a 3-task stream with a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.reporting import results_markdown


def toy_config(trace_dir: Path, model_dir: Path, out: Path, strategy: str = "seqft") -> dict:
    return {
        "strategy": strategy,
        "model": {"model": str(model_dir), "lr": 3e-3},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "log_every_n_steps": 1},
        "stream": {
            "name": "toy",
            "data_root": str(trace_dir),
            "batch_size": 8,
            "eval_batch_size": 8,
            "tasks": [
                {"name": n, "path": n, "epochs": 4, "max_new_tokens": 4, "metric": m, "classification": c}
                for n, m, c in (
                    ("parity", "exact_match", True),
                    ("reverse", "edit_similarity", False),
                    ("upper", "rouge_l", False),
                )
            ],
        },
        "run": {"output_dir": str(out), "name": "run"},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_fit_three_tasks_end_to_end(trace_dir, tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path / "toy.yaml", toy_config(trace_dir, tiny_model_dir, tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and res["tasks"] == ["parity", "reverse", "upper"]
    matrix = res["matrix"]
    assert len(matrix) == 4 and all(len(r) == 3 and None not in r for r in matrix)
    assert set(res["summary"]) == {"OP", "BWT_TRACE", "BWT_GEM", "FWT"}
    for name in res["tasks"]:
        d = res["per_task"][name]
        assert d["loss_after"] < d["loss_before"] - 0.1, name  # every task really trained
        assert res["timings"]["steps"][name] == 12  # 24 examples / 8 per batch * 4 epochs, every task
        rows = [
            json.loads(x)
            for x in (run / "predictions" / "after_3" / f"{name}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 8 and {"prompt", "answer", "prediction", "score"} <= set(rows[0])
    assert res["per_task"]["parity"]["valid_label_share"] is not None
    report = (run / "results.md").read_text()
    assert report.count("| parity |") >= 1 and "## Valid-label share of classification tasks" in report
    assert res["score_split"] == "test" and "on the test split of each task" in report
    assert "on the eval split of each task" in results_markdown({**res, "score_split": "eval"})
    assert (run / "heatmap.png").stat().st_size > 1000
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "task1-parity",
        "task2-reverse",
        "task3-upper",
    ]


def test_rerun_refuses_to_overwrite(trace_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "run").mkdir(parents=True)
    (out / "run" / "results.json").write_text("{}")
    cfg = write_config(tmp_path / "toy.yaml", toy_config(trace_dir, tiny_model_dir, out))
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.name" in err and "already holds a run" in err
    assert (out / "run" / "results.json").read_text() == "{}"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c, d: (d / "parity" / "test.json").unlink(), "test.json: file not found"),
        (
            lambda c, d: (d / "reverse" / "train.json").write_text('{"prompt": "x"}'),
            "train.json: expected a JSON list",
        ),
        (lambda c, d: (d / "upper" / "eval.json").write_text('[{"prompt": "x"}]'), "field 'answer'"),
        (lambda c, d: (d / "upper" / "test.json").write_text("[]"), "test.json: the split is empty"),
        (lambda c, d: c["stream"]["tasks"][0].update(metric="bleu"), "unknown metric 'bleu'"),
        (lambda c, d: c.update(strategy="nosuch"), "unknown strategy 'nosuch'"),
        (lambda c, d: c["stream"].update(batchsize=3), "bad.yaml: Group 'stream' does not accept"),
    ],
)
def test_bad_input_is_one_line(trace_dir, tiny_model_dir, tmp_path, capsys, mutate, expected):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    mutate(cfg, trace_dir)
    path = write_config(tmp_path / "bad.yaml", cfg)
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "runs" / "run").exists()


def test_lora_run_checkpoints_only_the_adapter(trace_dir, tiny_model_dir, tmp_path):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    cfg["run"]["evaluate"] = "needed"
    assert main(["fit", "--config", str(write_config(tmp_path / "lora.yaml", cfg))]) == 0
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "task2-reverse"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert res["per_task"]["reverse"]["loss_after"] < res["per_task"]["reverse"]["loss_before"]


def test_training_order_does_not_depend_on_what_was_evaluated(trace_dir, tiny_model_dir, tmp_path):
    losses = []
    for evaluate in ("all", "needed"):
        cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / evaluate)
        cfg["run"]["evaluate"] = evaluate
        assert main(["fit", "--config", str(write_config(tmp_path / f"{evaluate}.yaml", cfg))]) == 0
        res = json.loads((tmp_path / evaluate / "run" / "results.json").read_text())
        losses.append([res["per_task"][t]["loss_after"] for t in res["tasks"]])
    assert losses[0] == losses[1]


def test_peak_memory_is_the_process_own_not_a_large_parents(tmp_path):
    """A run started by a process holding 1.5 GB (a compare, a benchmark with a model loaded) reports
    its own peak: getrusage's ru_maxrss would inherit the parent's across fork and exec."""
    import subprocess
    import sys

    import torch

    held = torch.ones(1500 * 2**20, dtype=torch.uint8)  # resident: every page written
    code = "from clbench.recorder import peak_memory_mb; print(peak_memory_mb())"
    child = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    # held[-1], not held.sum(): summing uint8 makes an int64 copy (12 GB here; the suite's old peak)
    assert int(held[-1]) == 1 and child < 1400


def test_ssr_demonstrations_over_a_task_s_size_are_capped_with_a_warning_and_recorded(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    """SSR: two settings capped alike are one run: the warning says so, and results.json's strategy_used
    holds what each task used (compare's report names such entries: test_compare)."""
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = [{**t, "epochs": 1} for t in cfg["stream"]["tasks"][:2]]
    cfg["strategy"] = {"class_path": "ssr", "init_args": {"demonstrations": 30, "shots": 28, "candidates": 4}}
    cfg["strategy"]["init_args"]["synthetic"] = 2
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    out = capsys.readouterr().out
    assert (
        "warning: ssr: task parity has 24 training examples: demonstrations 30 -> 24, shots 28 -> 24" in out
    )
    used = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())["strategy_used"]
    assert list(used) == ["parity"]  # nothing is generated after the last task
    assert {k: used["parity"][k] for k in ("demonstrations", "shots", "prompts")} == {
        "demonstrations": 24,
        "shots": 24,
        "prompts": 4,
    }
