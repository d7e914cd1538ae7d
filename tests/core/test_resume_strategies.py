"""`clbench fit --resume` for strategies whose state is more than tensors by name: o_lora adds an
adapter per task to the model, ssr keeps text, gem / agem keep text and seed their draws per task,
ogd keeps a list of model-sized directions, mbpa keeps text and keys and answers through its own
hook, l2p keeps its prompt-choice counts, lfpt5 keeps the pseudo examples it wrote (none parse on
this byte-level model: tests/distributed/test_two_process.py resumes written ones), the merges keep
folded task vectors, theta' or Fisher sums (theta_0 comes from setup). A run stopped after two tasks
goes on to the uninterrupted run's matrix, training losses and strategy records (in process, so it
takes seconds; tests/core/test_resume.py kills real processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fit import toy_config, write_config

import strategies
from clbench.cli import main

RECORDS = {
    "o_lora": "o_lora/overlap.json",
    "ssr": "ssr/synthetic.json",
    "gem": "gem/projections.json",
    "agem": "agem/projections.json",
    "ogd": "ogd/directions.json",
    "mbpa": None,  # its record is timings; the matrix says whether the adaptation resumed right
    "progressive_prompts": "progressive_prompts/prompts.json",
    "l2p": "l2p/selection.json",  # the choices of tasks before the stop come back with the state
    "lfpt5": "lfpt5/pseudo.json",  # what it wrote and kept at each task end, and its budgets, as state
    "linear_merge": None,  # keeps nothing between tasks: the later rows say whether it merged alike
    "ties": "merge/ties.json",
    "magmax": "merge/magmax.json",  # theta' comes back with the state, for the next task to start from
    "fisher_merge": "merge/fisher_merge.json",
    "attribution_merge": None,  # gate.json lists the tasks since a resume only (README, Not finished)
}
# the merges act at a task's end: the last task's merge, from the restored state, shows in the weights
MERGES = {"linear_merge", "ties", "magmax", "fisher_merge", "attribution_merge"}


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_stopped_run_resumes_to_the_uninterrupted_run(
    name, trace_dir, tiny_model_dir, tmp_path, monkeypatch
):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs", name)
    cfg["run"]["checkpoints"] = "last" if name in MERGES else "none"
    for task in cfg["stream"]["tasks"]:
        task["epochs"] = 1
    if name == "o_lora":
        cfg["model"]["lora"] = {"r": 4, "dropout": 0.0}
        cfg["model"]["lr"] = 1e-2
    config = str(write_config(tmp_path / "c.yaml", cfg))
    assert main(["fit", "--config", config, "--run.name", "whole"]) == 0

    cls = strategies.load(name)
    start = cls.on_task_start

    def stopped_at_the_third_task(self, ctx):
        if ctx.task_index == 2:
            raise ValueError("stopped by the test")
        start(self, ctx)

    monkeypatch.setattr(cls, "on_task_start", stopped_at_the_third_task)
    with pytest.raises(ValueError, match="stopped by the test"):  # a hook's error: not one line
        main(["fit", "--config", config, "--run.name", "cut"])
    monkeypatch.undo()
    cut = tmp_path / "runs" / "cut"
    assert results(cut)["status"] == "failed" and (cut / "resume" / "complete").is_file()
    assert main(["fit", "--resume", str(cut)]) == 0

    whole, got = results(tmp_path / "runs" / "whole"), results(cut)
    assert got["status"] == "complete" and got["matrix"] == whole["matrix"]
    assert got["strategy_used"] == whole["strategy_used"]  # ssr's counts come back with its state
    for task in whole["tasks"]:
        assert got["per_task"][task]["train_loss"] == whole["per_task"][task]["train_loss"], task
    if name == "mbpa":  # it did adapt, after the resume too
        cost = json.loads((cut / "mbpa" / "inference.json").read_text())
        assert all(cost[task]["prompts"] > 0 for task in whole["tasks"])
    if RECORDS[name] is not None:
        record = (tmp_path / "runs" / "whole" / RECORDS[name]).read_text()
        assert (cut / RECORDS[name]).read_text() == record
    if name == "ssr":  # the third task trained on both earlier tasks' synthetic examples
        counts = json.loads(record)["counts"]
        assert counts["parity"]["kept"] > 0 and counts["reverse"]["kept"] > 0
    if name in MERGES:
        last = Path("checkpoints") / "task3-upper" / "model.safetensors"
        merged, resumed = (load_file(str(run / last)) for run in (tmp_path / "runs" / "whole", cut))
        assert merged.keys() == resumed.keys() and all(torch.equal(merged[n], resumed[n]) for n in merged)
