"""What a run needs to go on after a kill: the state at the end of its last finished task.

After every task (trained, evaluated, checkpointed) the runner writes RUN_DIR/resume/: the model's
parameters, the carried AdamW moments, the strategy's state, the random-number generators and the
runner's bookkeeping (matrix, scores, losses, timings). It is written into a fresh folder and
renamed into place, with a `complete` marker written last, so a kill during the save leaves the
previous state usable. `clbench fit --resume RUN_DIR` reloads it and trains the next task; a task
killed midway is trained again from its start, which gives the same numbers as an uninterrupted run
(training order, dropout and everything else random are restored or seeded per task).
state.json records each file's SHA-256: a damaged file is named at --resume, never loaded.
Not yet: sharded (FSDP2) runs (results.json's "resumable" says so), and mid-task checkpoints.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clbench import distributed as dist
from clbench.errors import ConfigError
from clbench.identity import file_sha256
from clbench.module import flat_state, nested_state

FOLDER, MARKER = "resume", "complete"


@dataclass
class ResumeState:
    """The end of the last finished task: `done` tasks, bookkeeping and tensors."""

    done: int
    runner: dict
    model: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]
    strategy: dict[str, torch.Tensor]
    rng: dict


TENSOR_FILES = ("model", "optimizer", "strategy", "rng")


def save(run_dir: Path, module: torch.nn.Module, strategy_state: dict, runner: dict, done: int) -> None:
    """Write the state after `done` finished tasks (rank 0 only; unsharded models only). state.json
    holds each tensor file's SHA-256, so a damaged file is named at --resume, never loaded."""
    tmp = run_dir / f"{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(dict(module.model.named_parameters())), str(tmp / "model.safetensors"))
    save_file(_contiguous(flat_state(module.carried_optimizer_state)), str(tmp / "optimizer.safetensors"))
    save_file(_contiguous(strategy_state), str(tmp / "strategy.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    hashes = {f"{n}.safetensors": file_sha256(tmp / f"{n}.safetensors") for n in TENSOR_FILES}
    state = {"done": done, "runner": runner, "rng": _host_rng(), "sha256": hashes}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / MARKER).write_text("")
    final, old = run_dir / FOLDER, run_dir / f"{FOLDER}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path) -> ResumeState:
    """The last complete state of a run folder (the previous one when a save was cut short)."""
    complete = [f for f in (run_dir / FOLDER, run_dir / f"{FOLDER}.old") if (f / MARKER).is_file()]
    if not complete:
        raise ConfigError(f"--resume: {run_dir}: {_why_no_state(run_dir)}")
    try:
        return _read(complete[0])
    except _Damaged as e:
        earlier = complete[1:] and _done(complete[1])
        fallback = (
            f"{complete[1]} holds the state after task {earlier}: move {complete[0].name} aside "
            f"(mv {complete[0]} {complete[0]}.damaged) to resume from there"
            if earlier
            else "no earlier state is kept: start the run again"
        )
        raise ConfigError(f"--resume: {e}; {fallback}") from None


class _Damaged(Exception):
    """A resume file that is missing, unreadable or not what was written."""


def _why_no_state(run_dir: Path) -> str:
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = {}
    reason = str(results.get("resumable", ""))
    if reason.startswith("no:"):
        return f"cannot be resumed ({reason[3:].strip()})"
    return "holds no finished task to resume from (stopped during its first task); start it again"


def _done(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "state.json").read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read(folder: Path) -> ResumeState:
    try:
        doc = json.loads((folder / "state.json").read_text())
        hashes = doc["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damaged(f"{folder / 'state.json'} is unreadable ({type(e).__name__})") from None
    tensors = {}
    for name in TENSOR_FILES:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise _Damaged(f"{path} is missing")
        if file_sha256(path) != hashes.get(path.name):
            raise _Damaged(f"{path} is damaged (its SHA-256 is not the one saved in state.json)")
        try:
            tensors[name] = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise _Damaged(f"{path} is unreadable ({str(e).splitlines()[0][:120]})") from None
    moments = nested_state(tensors["optimizer"])
    rng = {**doc["rng"], "torch": tensors["rng"]["torch"]}
    return ResumeState(doc["done"], doc["runner"], tensors["model"], moments, tensors["strategy"], rng)


def restore(state: ResumeState, module: torch.nn.Module) -> None:
    """Parameters, carried optimizer moments and random generators as they were after the task."""
    params = dict(module.model.named_parameters())
    if set(params) != set(state.model) or any(dist.is_sharded(p) for p in params.values()):
        raise ConfigError("--resume: the saved parameters do not match this model (or it is sharded)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.model[name])
    device = next(iter(params.values())).device
    module.carried_optimizer_state = {
        n: {k: v.to(device) if k != "step" else v for k, v in st.items()} for n, st in state.optimizer.items()
    }
    torch.set_rng_state(state.rng["torch"])
    random.setstate((state.rng["python"][0], tuple(state.rng["python"][1]), state.rng["python"][2]))
    kind, keys, pos, has_gauss, cached = state.rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _host_rng() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
