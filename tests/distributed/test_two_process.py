"""Every strategy under two-process FSDP2 (and seqft / attribution under DDP) gives one process's
per-step losses, final parameters and accuracy matrix; one run folder, one writer."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from twoproc import clbench, fit, results, start_fit

LAST = "task3-upper"
ATTRIBUTION = ("--strategy.correct_threshold", "0.0", "--strategy.max_prior_samples", "6")
CASES = {
    "seqft": ("--strategy", "seqft"),
    "replay": ("--strategy", "replay", "--strategy.replay_ratio", "0.5"),
    "ewc": ("--strategy", "ewc", "--strategy.ewc_lambda", "1e4"),
    "freeze": ("--strategy", "freeze", "--strategy.lower_layers", "1"),
    "lwf": ("--strategy", "lwf"),
    "plugin": ("--strategy", "l2_pull.L2Pull", "--strategy.strength", "0.5"),  # docs/plugins.md's example
    "attribution-grad": ("--strategy", "attribution", *ATTRIBUTION),
    "attribution-update": ("--strategy", "attribution", "--strategy.gate_target", "update", *ATTRIBUTION),
    # the budget gate's top share of the whole tensor, and moments/weights offloaded as shards
    "attribution-budget-disk": (
        *("--strategy", "attribution", "--strategy.gate_target", "update", "--strategy.budget", "0.3"),
        *("--strategy.offload", "disk", *ATTRIBUTION),
    ),
    "attribution-lora": (
        "--strategy",
        "attribution",
        "--model.lora.r",
        "4",
        "--model.lora.dropout",
        "0",
        *ATTRIBUTION,
    ),
    "o_lora": (
        "--strategy",
        "o_lora",
        "--model.lora.r",
        "4",
        "--model.lora.dropout",
        "0",
        "--strategy.lambda_2",
        "0.01",
    ),
    # generation by the starting model's sharded copy, answers by the evaluator, k-means of 8 into 4
    "ssr": ("--strategy", "ssr", *("--strategy.candidates", "8", "--strategy.synthetic", "4")),
}


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    """The model after the last task, from a Hugging Face folder or a sharded (DCP) checkpoint."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    folder = run / "checkpoints" / LAST
    if (folder / "model").is_dir():
        state = {k: torch.empty_like(v) for k, v in start_parameters(run).items()}
        dcp.load(state, checkpoint_id=folder / "model")
        return state
    adapters = sorted(folder.rglob("adapter_model.safetensors"))  # LoRA, whatever the layout; O-LoRA
    if adapters:  # keeps each later task's adapter in a subfolder
        return {
            f"{a.parent.relative_to(folder)}/{k}": v for a in adapters for k, v in load_file(str(a)).items()
        }
    return load_file(str(folder / "model.safetensors"))


def assert_same_run(one: Path, two: Path) -> None:
    a, b = results(one), results(two)
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["matrix"] == a["matrix"]
    for task in a["tasks"]:
        la, lb = a["per_task"][task]["train_loss"], b["per_task"][task]["train_loss"]
        assert len(la) == len(lb) > 0
        assert torch.allclose(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6), (task, la, lb)
    pa, pb = final_parameters(one), final_parameters(two)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.allclose(pb[name], pa[name], atol=1e-5, rtol=0), name
    start = start_parameters(one)
    moved = max((pa[n] - start.get(n, torch.zeros_like(pa[n]))).abs().max().item() for n in pa)
    assert moved > 1e-3  # the runs really trained (LoRA: B moved away from 0)


def start_parameters(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.parents[2] / "model" / "model.safetensors"))


def reference(root: Path, case: str) -> Path:
    """The one-process run of a case (made once, shared by the FSDP2 and DDP tests)."""
    run = root / case / "one" / "run"
    return run if (run / "results.json").is_file() else fit(root, f"{case}/one", 1, *CASES[case])


def assert_same_synthetic_examples(one: Path, two: Path) -> None:
    """SSR: every rank wrote, selected and answered the same inputs as one process, 4 per task (none
    after the last)."""
    written = json.loads((two / "ssr" / "synthetic.json").read_text())
    assert written == json.loads((one / "ssr" / "synthetic.json").read_text())
    assert {t: c["kept"] for t, c in written["counts"].items()} == {"parity": 4, "reverse": 4}


def assert_one_writer(root: Path, out: str) -> None:
    """One run folder, and every TensorBoard file from one process (the writer, rank 0)."""
    runs = sorted(p.name for p in (root / out).iterdir() if p.name != "priors")
    assert runs == ["run"]
    pids = {re.search(r"\.(\d+)\.\d+$", f.name).group(1) for f in (root / out).rglob("events.out.tfevents.*")}
    assert len(pids) == 1
    assert not list((root / out).rglob("*.tmp"))


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_equals_one_process(toy_setup, case):
    one = reference(toy_setup, case)
    two = fit(toy_setup, f"{case}/two", 2, "--trainer.strategy", "fsdp", *CASES[case])
    assert_same_run(one, two)
    assert_one_writer(toy_setup, f"{case}/two")
    assert json.loads((two / "results.json").read_text())["resumable"] == "yes"
    if case == "ssr":
        assert_same_synthetic_examples(one, two)
    if case.startswith("attribution"):
        gates = json.loads((two / "importance" / "gate.json").read_text())
        assert gates == json.loads((one / "importance" / "gate.json").read_text()) or _close(gates, one)
        assert gates["reverse"]["mean"] > 0  # a real gate, not zeros
        assert not (two / "offload").exists()  # offloaded shards are removed after the last prior


def _close(gates: dict, one: Path) -> bool:
    ref = json.loads((one / "importance" / "gate.json").read_text())
    return all(abs(gates[t]["mean"] - ref[t]["mean"]) < 1e-5 for t in ref if "mean" in ref[t])


@pytest.mark.parametrize("case", ["seqft", "attribution-grad", "o_lora", "ssr", "plugin"])
def test_ddp_equals_one_process(toy_setup, case):
    one = reference(toy_setup, case)
    two = fit(toy_setup, f"{case}/ddp", 2, "--trainer.strategy", "ddp", *CASES[case])
    assert_same_run(one, two)
    assert_one_writer(toy_setup, f"{case}/ddp")
    if case == "ssr":
        assert_same_synthetic_examples(one, two)


def test_sharded_checkpoint_exports_to_a_plain_hugging_face_folder(toy_setup):
    """The exported folder loads with plain from_pretrained and answers the test prompts, batched as
    the run batched them, exactly as the sharded model did during the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clbench.data.loaders import StreamConfig, load_stream

    run = toy_setup / "seqft" / "two" / "run"
    if not (run / "results.json").is_file():
        run = fit(toy_setup, "seqft/two", 2, "--trainer.strategy", "fsdp", *CASES["seqft"])
    out = toy_setup / "exported"
    clbench(toy_setup, "export", str(run / "checkpoints" / LAST), str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    stream = load_stream(StreamConfig(**yaml_stream(toy_setup)))
    for task in stream.tasks:
        rows = [
            json.loads(x)
            for x in (run / "predictions" / "after_3" / f"{task.name}.jsonl").read_text().splitlines()
        ]
        texts = []
        for batch in prompt_batches(task, tok):
            gen = model.generate(
                **batch, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            texts += tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert texts == [row["raw"] for row in rows], task.name


def yaml_stream(root: Path) -> dict:
    import yaml

    from clbench.data.loaders import TaskConfig

    stream = yaml.safe_load((root / "toy.yaml").read_text())["stream"]
    return {**stream, "tasks": [TaskConfig(**t) for t in stream["tasks"]]}


def prompt_batches(task, tok):
    """The test prompts in the run's evaluation batches (4, left-padded, positions from the mask)."""
    from clbench.data.collate import LeftPadCollator, TokenizedTask

    data = TokenizedTask(task.test, task, tok, "raw", with_answer=False)
    collate = LeftPadCollator(tok.pad_token_id)
    for start in range(0, len(data), 4):
        batch = collate([data[i] for i in range(start, min(start + 4, len(data)))])
        mask = batch["attention_mask"]
        yield {"input_ids": batch["input_ids"], "attention_mask": mask}


@pytest.mark.parametrize(
    "case, sharding", [("seqft", "fsdp"), ("ewc", "fsdp"), ("attribution-grad", "fsdp"), ("ewc", "ddp")]
)
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_run(toy_setup, case, sharding):
    """SIGKILL to both ranks after the first task's state is saved (under FSDP2 every rank its shards,
    through torch.distributed.checkpoint; under DDP rank 0 the one replica); `fit --resume` on two
    ranks ends with one process's matrix, losses and weights, as an uninterrupted run does."""
    one = reference(toy_setup, case)
    run = toy_setup / case / f"killed-{sharding}" / "run"
    proc = start_fit(toy_setup, f"{case}/killed-{sharding}", 2, "--trainer.strategy", sharding, *CASES[case])
    saved = run / "resume" / "state.json"
    deadline = time.time() + 240
    while not (saved.is_file() and json.loads(saved.read_text())["done"] >= 1):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks: rank 1 is rank 0's child, in its session
    proc.wait(timeout=30)
    assert results(run)["status"] == "running"  # killed: nothing could write otherwise
    shards = len(list((run / "resume" / "sharded").glob("*.distcp")))
    assert shards == (2 if sharding == "fsdp" else 0)  # FSDP2: each rank wrote its shards
    clbench(toy_setup, "fit", "--resume", str(run))  # two ranks again, from the run's config.yaml
    assert results(run)["status"] == "complete"
    assert_same_run(one, run)
