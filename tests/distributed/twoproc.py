"""Running clbench as a user does, in subprocesses: one process, or two ranks on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from clbench.prompts import ATTRIBUTE

PER_RANK_BATCH = 4
LORA = ("--model.lora.r", "4", "--model.lora.dropout", "0")
ATTRIBUTION = ("--strategy.correct_threshold", "0.0", "--strategy.max_prior_samples", "6")
# Every registered strategy and docs/plugins.md's example, with settings that act on the toy stream
STRATEGY_ARGS = {
    "seqft": ("--strategy", "seqft"),
    "replay": ("--strategy", "replay", "--strategy.replay_ratio", "0.5"),
    "ewc": ("--strategy", "ewc", "--strategy.ewc_lambda", "1e4"),
    "freeze": ("--strategy", "freeze", "--strategy.lower_layers", "1"),
    "lwf": ("--strategy", "lwf"),
    "multitask": ("--strategy", "multitask"),
    "attribution": ("--strategy", "attribution", *ATTRIBUTION),
    # generation by the starting model (sharded copy under FSDP2), answers by the evaluator, k-means
    "ssr": ("--strategy", "ssr", "--strategy.candidates", "8", "--strategy.synthetic", "4"),
    "plugin": ("--strategy", "l2_pull.L2Pull", "--strategy.strength", "0.5"),
    # memory gradients of every earlier task each step, the dual QP (margin 0.5: always acts)
    "gem": ("--strategy", "gem", "--strategy.memory_per_task", "4"),
    "agem": ("--strategy", "agem", "--strategy.memory_per_task", "4", "--strategy.memory_batch", "3"),
    "ogd": ("--strategy", "ogd", "--strategy.directions_per_task", "3"),
    # local adaptation to each test input: under FSDP2 every rank adapts to every rank's inputs
    "mbpa": ("--strategy", "mbpa", "--strategy.neighbours", "3", "--strategy.adapt_steps", "2"),
    "o_lora": ("--strategy", "o_lora", "--strategy.lambda_2", "0.01", *LORA),  # LoRA only
    # soft prompts only (model frozen), at a prompt-tuning learning rate
    "progressive_prompts": (
        "--strategy",
        "progressive_prompts",
        "--strategy.prompt_length",
        "4",
        "--model.lr",
        "0.03",
    ),
    # a pool of 4 prompts with keys, 2 chosen per input by the frozen encoder's query (model frozen),
    # diversified by the earlier tasks' choice counts (summed over the ranks)
    "l2p": (
        *("--strategy", "l2p", "--strategy.pool_size", "4", "--strategy.prompt_length", "2"),
        *("--strategy.top_n", "2", "--strategy.diversify", "true", "--model.lr", "0.03"),
    ),
    # one prompt (model frozen) trained with the generation loss, on a model whose vocabulary holds the
    # markers; 96 continuations of each earlier task written before each task (some parse), the KL to
    # the previous model on the kept ones
    "lfpt5": (
        *("--strategy", "lfpt5", "--strategy.prompt_length", "4", "--strategy.pseudo_per_task", "96"),
        *("--strategy.temperature", "1.0", "--strategy.kl_lambda", "1.0", "--model.lr", "0.03"),
        *("--model.model", "./lfpt5-model"),
    ),
    # merges at each task's end (issue 37): TIES's threshold over every rank's shards, MagMax's
    # sequential fine-tuning from theta' (its default), the Fisher of every example of two batches,
    # attribution's gate on each task's change
    "linear_merge": ("--strategy", "linear_merge", "--strategy.alpha", "0.5"),
    "ties": ("--strategy", "ties", "--strategy.top_k", "0.2"),
    "magmax": ("--strategy", "magmax"),
    "fisher_merge": ("--strategy", "fisher_merge", "--strategy.fisher_batches", "2"),
    "attribution_merge": ("--strategy", "attribution_merge", *ATTRIBUTION),
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def clbench(root: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clbench", *args]
    out = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def torchrun_worker(worker: str, model: Path, out: Path) -> Path:
    """`worker` (a file beside this one) on two ranks started by torchrun, given the model folder and
    `out`, where it writes what it computed; `out`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*cmd, str(Path(__file__).with_name(worker)), str(model), str(out)],
        env={**ENV, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def fit_args(out: str, ranks: int, *args: str, config: str = "toy.yaml", name: str = "run") -> list[str]:
    """`fit` of a stream (the toy one by default) into `out/name`: `ranks` processes with the same
    global batch."""
    sharding = ["--trainer.devices", "2"] if ranks == 2 else []
    batch = PER_RANK_BATCH * (2 // ranks)
    run = ["--stream.batch_size", str(batch), "--run.output_dir", out, "--run.name", name]
    return ["fit", "--config", config, *run, *sharding, *args]


def fit(root: Path, out: str, ranks: int, *args: str) -> Path:
    """A run of the toy stream in `root/out/run`: `ranks` processes with the same global batch."""
    clbench(root, *fit_args(out, ranks, *args))
    return root / out / "run"


def start_fit(root: Path, out: str, ranks: int, *args: str, config: str = "toy.yaml") -> subprocess.Popen:
    """`fit` started in a session of its own (os.killpg reaches every rank), output discarded."""
    cmd = [sys.executable, "-m", "clbench", *fit_args(out, ranks, *args, config=config)]
    quiet = subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=root, env=ENV, stdout=quiet, stderr=quiet, start_new_session=True)


def wait_for_first_task(proc: subprocess.Popen, run: Path, why: Callable[[], str] = lambda: "") -> None:
    """Until `run` has saved the state of its first task (the kill point of the resume tests)."""
    saved, deadline = run / "resume" / "state.json", time.time() + 240
    while not (saved.is_file() and json.loads(saved.read_text())["done"] >= 1):
        assert proc.poll() is None and time.time() < deadline, why() or "the run ended before the kill point"
        time.sleep(0.05)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    """The model after the last task, from a Hugging Face folder or a sharded (DCP) checkpoint."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    tasks = results(run)["tasks"]
    folder = run / "checkpoints" / f"task{len(tasks)}-{tasks[-1]}"
    if (folder / "model").is_dir():  # the starting model's tensors, and the soft prompts a strategy added
        saved = dcp.FileSystemReader(folder / "model").read_metadata().state_dict_metadata
        state = {k: torch.empty_like(v) for k, v in start_parameters(run).items()}
        state |= {
            k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in saved.items() if ATTRIBUTE in k
        }
        dcp.load(state, checkpoint_id=folder / "model", no_dist=True)
        return state
    adapters = sorted(folder.rglob("adapter_model.safetensors"))  # LoRA, whatever the layout; O-LoRA
    if adapters:  # keeps each later task's adapter in a subfolder
        return {
            f"{a.parent.relative_to(folder)}/{k}": v for a in adapters for k, v in load_file(str(a)).items()
        }
    return load_file(str(folder / "model.safetensors"))


def assert_same_run(one: Path, two: Path) -> None:
    """Two ranks gave one process's run: the accuracy matrix, every generated answer, every step's
    loss and the weights."""
    a, b = results(one), results(two)
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["matrix"] == a["matrix"]
    for file in sorted((one / "predictions").rglob("*.jsonl")):  # every answer, not only the scores
        raw = [
            [json.loads(line)["raw"] for line in f.read_text().splitlines()]
            for f in (file, two / file.relative_to(one))
        ]
        assert raw[0] == raw[1], file.relative_to(one)
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
    """The weights the run started from: its model.model (relative to the folder `fit` ran in)."""
    import yaml
    from safetensors.torch import load_file

    model = yaml.safe_load((run / "config.yaml").read_text())["model"]["model"]
    return load_file(str(run.parents[2] / model / "model.safetensors"))
