"""Tensors waiting out of the way while they are not needed.

Attribution keeps the starting weights of its single-task models for the whole run, and while a
task prior is computed the continual run's weights and AdamW moments wait until the side model has
trained and been scored. Where they wait decides that phase's peak memory:

- "memory": in host memory (on an accelerator this already frees the device; on a CPU it is where
  they were);
- "disk": safetensors files (one set per rank) read back one tensor at a time, so host memory holds
  at most one part of them while writing and one tensor while reading. It costs writing and reading
  them once per prior.

"auto" (attribution's default) is "disk" when the parameters live on the CPU, where host memory is
the memory training uses and "memory" would free nothing, and "memory" on an accelerator.

Files are written in parts of at most PART_BYTES (safetensors serialises a whole file in memory
before writing it), each part atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from clbench import distributed as dist
from clbench.files import atomic_path

Where = Literal["memory", "disk"]
PART_BYTES = 1 << 28


def resolve(setting: str, device: torch.device) -> Where:
    """Where state waits for an offload setting ("memory", "disk" or "auto") and the device the
    parameters live on: "auto" parks on disk only when that device is the host itself."""
    if setting == "auto":
        return "disk" if torch.device(device).type == "cpu" else "memory"
    if setting not in ("memory", "disk"):
        raise ValueError(f"offload must be memory, disk or auto, got {setting!r}")
    return setting


class Parked:
    """A named set of tensors kept in host memory or in a folder of safetensors parts; `items()`
    gives them back on their devices (a sharded DTensor as the same DTensor: its local shard is what
    waits, one file set per rank).

    `copy`: the caller goes on changing the originals (weights), so "memory" keeps a copy; without
    it (tensors the caller lets go of, e.g. optimizer moments) "memory" keeps the tensors themselves
    when they are on the CPU already."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: Where, folder: Path, copy: bool) -> None:
        if where not in ("memory", "disk"):
            raise ValueError(f"offload must be memory or disk, got {where!r}")
        self.where, self.folder = where, Path(folder)
        self._held: dict[str, torch.Tensor] = {}
        self._like = {n: (dist.local(t).device, _layout(t)) for n, t in tensors.items()}  # not t itself
        tensors = {n: dist.local(t) for n, t in tensors.items()}
        if where == "memory":
            self._held = {n: t.detach().to("cpu", copy=copy) for n, t in tensors.items()}
            return
        shutil.rmtree(self.folder, ignore_errors=True)  # a part left by a killed run
        self.folder.mkdir(parents=True)
        part, size, index = {}, 0, 0
        for name, t in tensors.items():
            part[name] = t.detach().contiguous()
            size += t.numel() * t.element_size()
            if size >= PART_BYTES:
                self._write(part, index)
                part, size, index = {}, 0, index + 1
        if part:
            self._write(part, index)

    def _write(self, part: dict[str, torch.Tensor], index: int) -> None:
        with atomic_path(self.folder / f"part-{index:05d}.safetensors") as tmp:
            save_file(part, str(tmp))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs as they were parked, one tensor read at a time when on disk."""
        for name, value in self._stored():
            device, layout = self._like[name]
            value = value.to(device)
            if layout is not None:
                mesh, placements, shape, stride = layout
                value = DTensor.from_local(value, mesh, placements, shape=shape, stride=stride)
            yield name, value

    def _stored(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.where == "memory":
            yield from self._held.items()
            return
        for path in sorted(self.folder.glob("part-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def close(self) -> None:
        """Let go of the tensors (and delete the files)."""
        self._held, self._like = {}, {}
        if self.where == "disk":
            shutil.rmtree(self.folder, ignore_errors=True)


def _layout(t: torch.Tensor) -> tuple | None:
    """What rebuilds a sharded DTensor from its local shard (None for a plain tensor)."""
    if not dist.is_sharded(t):
        return None
    return t.device_mesh, t.placements, t.shape, t.stride()
