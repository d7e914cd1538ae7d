"""What a run needs to go on after a kill: the state at the end of its last finished task.

After every task (trained, evaluated, checkpointed) the runner writes RUN_DIR/resume/: the model's
parameters, the carried AdamW moments, the strategy's state, the random-number generators and the
runner's bookkeeping (matrix, scores, losses, timings). It is written into a fresh folder and
renamed into place, with a `complete` marker written last, so a kill during the save leaves the
previous state usable. `clbench fit --resume RUN_DIR` reloads it and trains the next task; a task
killed midway is trained again from its start, which gives the same numbers as an uninterrupted run
(training order, dropout and everything else random are restored or seeded per task).
Not yet: sharded (FSDP2) runs, and mid-task checkpoints.
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


def save(run_dir: Path, module: torch.nn.Module, strategy_state: dict, runner: dict, done: int) -> None:
    """Write the state after `done` finished tasks (rank 0 only; unsharded models only)."""
    tmp = run_dir / f"{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(dict(module.model.named_parameters())), str(tmp / "model.safetensors"))
    moments = {f"{n}::{k}": v for n, st in module._saved_optimizer_state.items() for k, v in st.items()}
    save_file(_contiguous(moments), str(tmp / "optimizer.safetensors"))
    save_file(_contiguous(strategy_state), str(tmp / "strategy.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"done": done, "runner": runner, "rng": _host_rng()}))
    (tmp / MARKER).write_text("")
    final, old = run_dir / FOLDER, run_dir / f"{FOLDER}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path) -> ResumeState:
    """The last complete state of a run folder (the previous one when a save was cut short)."""
    folder = next((f for f in (run_dir / FOLDER, run_dir / f"{FOLDER}.old") if (f / MARKER).is_file()), None)
    if folder is None:
        raise ConfigError(f"--resume: {run_dir} holds no finished task to resume from; start it again")
    doc = json.loads((folder / "state.json").read_text())
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        name, field = key.rsplit("::", 1)
        moments.setdefault(name, {})[field] = value
    rng = {**doc["rng"], "torch": load_file(str(folder / "rng.safetensors"))["torch"]}
    return ResumeState(
        doc["done"],
        doc["runner"],
        load_file(str(folder / "model.safetensors")),
        moments,
        load_file(str(folder / "strategy.safetensors")),
        rng,
    )


def restore(state: ResumeState, module: torch.nn.Module) -> None:
    """Parameters, carried optimizer moments and random generators as they were after the task."""
    params = dict(module.model.named_parameters())
    if set(params) != set(state.model) or any(dist.is_sharded(p) for p in params.values()):
        raise ConfigError("--resume: the saved parameters do not match this model (or it is sharded)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.model[name])
    device = next(iter(params.values())).device
    module._saved_optimizer_state = {
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
