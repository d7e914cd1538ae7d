"""What a run needs to go on after a kill: the state at the end of its last finished task.

After every task (trained, evaluated, checkpointed) the runner writes RUN_DIR/resume/: the model's
parameters, the carried AdamW moments, the strategy's state, the random-number generators and the
runner's bookkeeping (matrix, scores, losses, timings). It is written into a fresh folder and
renamed into place, with a `complete` marker written last, so a kill during the save leaves the
previous state usable. `clbench fit --resume RUN_DIR` reloads it and trains the next task; a task
killed midway is trained again from its start, which gives the same numbers as an uninterrupted run
(training order, dropout and everything else random are restored or seeded per task).
state.json records each file's SHA-256: a damaged file is named at --resume, never loaded.

Sharded (FSDP2) runs write the same state with torch.distributed.checkpoint, every rank its own
shards (resume/sharded/), and load it into tensors laid out as when it was saved (each DTensor's
placements are in state.json), so a sharded strategy state (EWC's Fisher, attribution's Rbar) comes
back sharded. Each rank's random generators (CUDA's too) are kept. Not yet: mid-task checkpoints.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from clbench import distributed as dist
from clbench.errors import ConfigError
from clbench.identity import file_sha256, tensor_sha256
from clbench.module import flat_state, nested_state

FOLDER, MARKER = "resume", "complete"


@dataclass
class ResumeState:
    """The end of the last finished task: `done` tasks, bookkeeping and tensors (for a sharded run,
    `sharded` names the DCP folder and `layout` each DTensor's placements; the tensors load in
    `restore`, where every rank takes part)."""

    done: int
    runner: dict
    model: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]
    strategy: dict[str, torch.Tensor]
    rng: dict
    sharded: Path | None = None
    layout: dict[str, list[str]] | None = None


TENSOR_FILES = ("model", "optimizer", "strategy", "rng")
SHARDED = "sharded"


def save(run_dir: Path, module: torch.nn.Module, strategy_state: dict, runner: dict, done: int) -> None:
    """Write the state after `done` finished tasks. Unsharded: rank 0 alone writes safetensors.
    Sharded (FSDP2): every rank calls it and writes its shards. state.json holds each file's
    SHA-256, so a damaged file is named at --resume, never loaded."""
    sharded = dist.is_fully_sharded(module.model)
    writes = dist.rank() == 0
    tmp = run_dir / f"{FOLDER}.tmp"
    if writes:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    state = {"done": done, "runner": runner}
    if sharded:
        dist.barrier()  # the folder exists before any rank writes into it
        tensors = _flat(module, strategy_state)
        _check_shardable(tensors)
        dcp.save(tensors, checkpoint_id=str(tmp / SHARDED))
        state["layout"] = {
            k: [f"shard {p.dim}" if p.is_shard() else "replicate" for p in t.placements]
            for k, t in tensors.items()
            if dist.is_sharded(t)
        }
        save_file(_device_rng(), str(tmp / f"rng-rank{dist.rank()}.safetensors"))
        state["rng"] = dist.gather_objects(_host_rng())  # every rank's, in rank order
        dist.barrier()  # every rank's files are written
    else:
        save_file(_contiguous(dict(module.model.named_parameters())), str(tmp / "model.safetensors"))
        save_file(_contiguous(flat_state(module.carried_optimizer_state)), str(tmp / "optimizer.safetensors"))
        save_file(_contiguous(strategy_state), str(tmp / "strategy.safetensors"))
        save_file(_device_rng(), str(tmp / "rng.safetensors"))
        state["rng"] = _host_rng()
    if not writes:
        return
    state["sha256"] = {str(f.relative_to(tmp)): file_sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / MARKER).write_text("")
    final, old = run_dir / FOLDER, run_dir / f"{FOLDER}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _check_shardable(tensors: dict[str, object]) -> None:
    """What DCP can save and give back: tensors only, and a plain (not DTensor) tensor the same on
    every rank, since DCP keeps one rank's copy of it. A collective: every rank."""
    others = sorted(k for k, v in tensors.items() if not torch.is_tensor(v))
    if others:
        raise RuntimeError(f"resume state: {others[0]} is not a tensor; a sharded run saves tensors only")
    plain = {k: tensor_sha256(v) for k, v in tensors.items() if not dist.is_sharded(v)}
    ranks = dist.gather_objects(plain)
    differ = sorted(k for k in plain if any(r.get(k) != plain[k] for r in ranks))
    if differ:
        raise RuntimeError(
            f"resume state: {differ[0]} differs between ranks; a sharded run's plain tensors must be "
            "the same on every rank (keep per-rank state as a DTensor laid out like its parameter)"
        )


def _flat(module: torch.nn.Module, strategy_state: dict) -> dict[str, torch.Tensor]:
    """One flat dict of every tensor of the state, keys that name their part (DCP keeps flat keys)."""
    model = {f"model::{n}": p for n, p in module.model.named_parameters()}
    moments = {f"optimizer::{k}": v for k, v in flat_state(module.carried_optimizer_state).items()}
    return {**model, **moments, **{f"strategy::{k}": v for k, v in strategy_state.items()}}


def has_state(run_dir: Path) -> bool:
    """Whether the run folder keeps the complete state of a finished task (what --resume needs)."""
    return any((run_dir / name / MARKER).is_file() for name in (FOLDER, f"{FOLDER}.old"))


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
    sharded = "layout" in doc
    expected = set(hashes) if sharded else {f"{n}.safetensors" for n in TENSOR_FILES}
    for name in sorted(expected):
        path = folder / name
        if not path.is_file():
            raise _Damaged(f"{path} is missing")
        if file_sha256(path) != hashes.get(name):
            raise _Damaged(f"{path} is damaged (its SHA-256 is not the one saved in state.json)")
    if sharded:
        rng = {"ranks": doc["rng"], "folder": folder}
        return ResumeState(doc["done"], doc["runner"], {}, {}, {}, rng, folder / SHARDED, doc["layout"])
    tensors = {}
    for name in TENSOR_FILES:
        path = folder / f"{name}.safetensors"
        try:
            tensors[name] = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise _Damaged(f"{path} is unreadable ({str(e).splitlines()[0][:120]})") from None
    moments = nested_state(tensors["optimizer"])
    rng = {**doc["rng"], **tensors["rng"]}
    return ResumeState(doc["done"], doc["runner"], tensors["model"], moments, tensors["strategy"], rng)


def restore(state: ResumeState, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, carried optimizer moments and random generators as they were after the task;
    returns the strategy's state. Every rank calls it."""
    if state.sharded is not None:
        return _restore_sharded(state, module)
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
    _set_rng(state.rng, state.rng)
    return state.strategy


def _restore_sharded(state: ResumeState, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load the DCP state into tensors laid out as when it was saved: the parameters in place, every
    saved DTensor as a DTensor on the parameters' mesh with its placements, the rest whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import empty as dtensor_empty

    params = dict(module.model.named_parameters())
    if not dist.is_fully_sharded(module.model) or {f"model::{n}" for n in params} - set(state.layout):
        raise ConfigError("--resume: the saved state is sharded and this model is not (or differs)")
    mesh = next(p.device_mesh for p in params.values() if dist.is_sharded(p))

    def placement(text: str) -> Shard | Replicate:
        return Shard(int(text.split()[1])) if text.startswith("shard") else Replicate()

    metadata = dcp.FileSystemReader(str(state.sharded)).read_metadata().state_dict_metadata
    tensors: dict[str, torch.Tensor] = {}
    for key, meta in metadata.items():
        if key.startswith("model::"):
            tensors[key] = params[key[len("model::") :]]
        elif key in state.layout:
            places = [placement(p) for p in state.layout[key]]
            tensors[key] = dtensor_empty(
                meta.size, dtype=meta.properties.dtype, device_mesh=mesh, placements=places
            )
        else:
            tensors[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with torch.no_grad():
        dcp.load(tensors, checkpoint_id=str(state.sharded))
    part = {
        p: {k[len(p) + 2 :]: v for k, v in tensors.items() if k.startswith(p + "::")}
        for p in ("optimizer", "strategy")
    }
    module.carried_optimizer_state = nested_state(part["optimizer"])
    rank = min(dist.rank(), len(state.rng["ranks"]) - 1)  # the ranks that saved it, normally
    _set_rng(state.rng["ranks"][rank], load_file(str(state.rng["folder"] / f"rng-rank{rank}.safetensors")))
    return part["strategy"]


def _device_rng() -> dict[str, torch.Tensor]:
    """torch's CPU generator, and CUDA's (this process's device) where there is one."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng(host: dict, device: dict) -> None:
    torch.set_rng_state(device["torch"])
    if "cuda" in device and torch.cuda.is_available():
        torch.cuda.set_rng_state(device["cuda"])
    random.setstate((host["python"][0], tuple(host["python"][1]), host["python"][2]))
    kind, keys, pos, has_gauss, cached = host["numpy"]
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
