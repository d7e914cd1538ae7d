"""Merging's exact ends over whole `clbench fit` runs: linear merging at alpha 1 and attribution merging
at Rbar 0 are sequential fine-tuning bit for bit (matrix, every step's loss, weights); at Rbar 1
every task after the first is withdrawn, bit for bit (tests/strategies/test_merging.py tests the rules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.testing import toy_tasks, write_trace_folder
from strategies.attribution.priors import PriorSource


def fit_run(trace: Path, model_dir: Path, out: Path, name: str, strategy: dict | str) -> dict:
    """`clbench fit` of the toy stream, one epoch a task; its results."""
    cfg = toy_config(trace, model_dir, out, strategy)
    for task in cfg["stream"]["tasks"]:
        task["epochs"] = 1
    assert main(["fit", "--config", str(write_config(out / f"{name}.yaml", cfg)), "--run.name", name]) == 0
    return json.loads((out / name / "results.json").read_text())


def weights(out: Path, name: str, task: str) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / name / "checkpoints").glob(f"*-{task}")) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def seqft_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("merge-runs")
    trace, out = write_trace_folder(root / "TRACE", toy_tasks()), root / "runs"
    out.mkdir()
    return trace, out, fit_run(trace, tiny_model_dir, out, "seqft", "seqft")


def assert_seqft_run(seqft_run, done: dict, name: str) -> None:
    _, out, seqft = seqft_run
    assert done["matrix"] == seqft["matrix"]
    assert all(
        done["per_task"][t]["train_loss"] == seqft["per_task"][t]["train_loss"] for t in seqft["tasks"]
    )
    assert_same_weights(weights(out, name, "upper"), weights(out, "seqft", "upper"))


def test_linear_merge_at_alpha_1_is_sequential_fine_tuning(seqft_run, tiny_model_dir):
    trace, out, _ = seqft_run
    strategy = {"class_path": "linear_merge", "init_args": {"alpha": 1.0}}
    assert_seqft_run(seqft_run, fit_run(trace, tiny_model_dir, out, "linear-a1", strategy), "linear-a1")


def attribution_merge_run(seqft_run, model_dir: Path, monkeypatch, value: float, name: str) -> dict:
    """A whole run of attribution merging whose every prior is `value` everywhere."""

    def prior(self, ctx, needed: bool) -> dict | None:
        params = ctx.module.trainable_parameters()
        return {n: torch.full(p.shape, value) for n, p in params.items()} if needed else None

    monkeypatch.setattr(PriorSource, "prior", prior)
    trace, out, _ = seqft_run
    args = {"prior_dir": str(out / "priors")}
    return fit_run(trace, model_dir, out, name, {"class_path": "attribution_merge", "init_args": args})


def test_attribution_merge_at_rbar_0_is_sequential_fine_tuning(seqft_run, tiny_model_dir, monkeypatch):
    done = attribution_merge_run(seqft_run, tiny_model_dir, monkeypatch, 0.0, "attr-merge-0")
    assert_seqft_run(seqft_run, done, "attr-merge-0")


def test_attribution_merge_at_rbar_1_keeps_the_first_tasks_weights(seqft_run, tiny_model_dir, monkeypatch):
    """Rbar 1 everywhere after task 1: every later task trains, and its change is withdrawn bit for bit."""
    done = attribution_merge_run(seqft_run, tiny_model_dir, monkeypatch, 1.0, "attr-merge-1")
    out = seqft_run[1]
    first = weights(out, "attr-merge-1", "parity")
    assert_same_weights(first, weights(out, "seqft", "parity"))
    assert_same_weights(weights(out, "attr-merge-1", "upper"), first)
    assert done["matrix"][2] == done["matrix"][3] == done["matrix"][1]
    assert all(len(done["per_task"][t]["train_loss"]) > 0 for t in done["tasks"])
    seqft = weights(out, "seqft", "upper")
    assert any(not torch.equal(seqft[n], first[n]) for n in first)  # the later tasks would have moved them
