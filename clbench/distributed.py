"""Several processes: ranks, state laid out like sharded parameters, FSDP2 through Lightning, batches.

clbench runs on one process, under DDP (Lightning's "ddp") or under FSDP2 (`fully_shard`, one unit
per decoder layer and then the root) through Lightning's ModelParallelStrategy, registered here as
"fsdp2" (the CLI maps clbench's "fsdp" to it: Lightning's own "fsdp" is FSDP1, which refuses CPU and
cannot shard a model that `configure_model` builds). Every helper here is the identity in one
process, so single-process code paths stay exactly as they were.

Facts these helpers rest on (torch 2.13, checked on gloo): under FSDP2 parameters and gradients are
DTensors sharded on dim 0 with unchanged names; a tensor built with `distribute_tensor(full, mesh,
placements, src_data_rank=None)` takes each rank's chunk of a full tensor every rank holds, without
communication; `unshard()` swaps full plain parameters in until `reshard()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.data import Sampler


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank; before the process group exists, what the launcher's environment says."""
    return dist.get_rank() if initialized() else int(getattr(rank_zero_only, "rank", 0) or 0)


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for a sharded one)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(param: Tensor, value: Tensor) -> Tensor:
    """`value` (the full tensor, the same on every rank) laid out like `param`: same mesh and
    placements when `param` is sharded, on `param`'s device otherwise. No communication."""
    if isinstance(param, DTensor):
        value = value.to(param.device_mesh.device_type)
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def local_rows(param: Tensor, per_sample: Tensor) -> Tensor:
    """This rank's part of a per-sample map (B, *param.shape) of a parameter sharded on dim 0."""
    if not isinstance(param, DTensor):
        return per_sample
    placements = tuple(Shard(p.dim + 1) if isinstance(p, Shard) else p for p in param.placements)
    mesh = param.device_mesh
    return distribute_tensor(per_sample, mesh, placements, src_data_rank=None).to_local()


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In place across ranks ("sum" or "max"); nothing in one process."""
    if initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def dim0_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of each rank's dim-0 shard of a tensor with `rows` rows, as FSDP2's Shard(0)
    cuts it (torch.chunk: ceil(rows / world) each, the last ranks fewer or none)."""
    size = -(-rows // world)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def all_to_all_bytes(
    send: list[list[tuple[Tensor, torch.dtype]]],
    recv_bytes: list[int],
    device: torch.device,
    group: Any = None,
) -> list[Tensor]:
    """Rank q gets `send[q]` of every rank: each (tensor, dtype) written as the raw bytes of the tensor
    cast to dtype (bit for bit; the cast happens in the one copy into the send buffer), and what
    rank s sent arrives as a flat uint8 tensor on `device` of `recv_bytes[s]`, the size the receiver
    expects. Every rank of `group` must call it. Each rank's part is padded to 8 bytes, so every
    received part starts aligned for any dtype. One `all_to_all_single` with uneven splits (gloo's
    list `all_to_all` wants equal sizes)."""

    def padded(nbytes: int) -> int:
        return -(-nbytes // 8) * 8

    sizes = [padded(sum(t.numel() * d.itemsize for t, d in part)) for part in send]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for part, size in zip(send, sizes):
        at = offset
        for t, dtype in part:
            nbytes = t.numel() * dtype.itemsize
            buf[at : at + nbytes].view(dtype).view(t.shape).copy_(t)
            at += nbytes
        offset += size
    wanted = [padded(n) for n in recv_bytes]
    out = torch.empty(sum(wanted), dtype=torch.uint8, device=device)
    dist.all_to_all_single(out, buf, wanted, sizes, group=group)
    del buf
    return [part[:n] for part, n in zip(out.split(wanted), recv_bytes)]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (so that all ranks take the same branch)."""
    if not initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on some rank (every rank must call it)."""
    return bool(all_reduce_(torch.tensor([float(flag)], device=device), "max").item())


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of a replicated (unsharded) module set to rank `src`'s values."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            dist.broadcast(t.data, src)


def load_whole_from_rank0(model: nn.Module, whole: dict[str, Tensor]) -> None:
    """Fill a sharded model from rank 0's whole state dict (`whole` is empty on the other ranks):
    each rank receives only its shards; buffers (never sharded) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, 0)


def barrier() -> None:
    if initialized() and dist.get_world_size() > 1:
        dist.barrier()


def fsdp_root(model: nn.Module) -> nn.Module:
    """The Hugging Face model itself (inside a peft wrapper): the FSDP root. peft's generate calls the
    inner model directly, so a root on the wrapper would never gather the embeddings."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face model (peft-wrapped or not), each one FSDP unit."""
    base = fsdp_root(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:  # the model chosen, not a bug: one line
        from clbench.errors import ConfigError

        raise ConfigError(
            f"trainer.strategy fsdp: cannot find the decoder layers of {type(base).__name__} (it declares "
            "no _no_split_modules); use ddp or one process"
        )
    return units


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(fsdp_root(model), FSDPModule)


def apply_fsdp(model: nn.Module, mesh: Any, precision: str) -> None:
    """Shard `model` in place: each decoder layer, then the root (embeddings, final norm, head).

    The mixed-precision policy follows Lightning's precision: "bf16-mixed" / "16-mixed" all-gather
    parameters in that dtype and reduce gradients in fp32; anything else keeps the parameter dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    # the root too reshards after its forward (FSDP2 keeps it whole by default): outside a forward every
    # parameter is then its shard, which is what strategies keep their state like
    fully_shard(fsdp_root(model), mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def follow_trainable(model: nn.Module) -> None:
    """Make every FSDP2 unit's gradient dtypes follow the mixed-precision policy for the parameters
    that train now (called when a task's training starts, after the strategy chose them).

    Why: FSDP2 fixes a unit's gradient dtypes once, at the model's first forward, from the parameters
    that require grad at that moment. A unit with none (a strategy that freezes every adapter before the
    starting model is evaluated; any plugin may) keeps no reduce dtype and no original dtype, so its
    later gradients are reduced in bf16 and handed to fp32 parameters, which torch refuses ("assign a
    gradient with dtype BFloat16 to a tensor with grad_dtype Float"). FSDP2 has no public call for
    this; its own per-group initializer is idempotent and is what its lazy init runs."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            state = unit._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)  # torch before 2.10: one group or None
            for group in groups if groups is not None else filter(None, [state._fsdp_param_group]):
                group._init_mp_dtypes()


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Whole parameters in every FSDP unit inside (for code that reads `module.weight`), then
    sharded again. Every rank must enter together. Nothing happens for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data-parallel FSDP2: one mesh dimension over every
    rank (gloo on CPU, NCCL on GPUs). CLModule.configure_model applies `fully_shard`."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


StrategyRegistry.register(
    "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) through ModelParallelStrategy", override=True
)


class RankBatchSampler(Sampler[list[int]]):
    """Global batches of `batch_size x world` examples in one seeded order; each rank takes its slice.

    With one rank it is exactly a DataLoader's shuffled (randperm of the generator) or sequential
    order cut into batches, the last one partial. Under W ranks, global batch k is the same set of
    examples as one process's batch k with batch size `batch_size x W`, split in W contiguous parts;
    a last global batch with fewer than W examples is dropped (every rank needs a part).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator,
        world: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator
        self.world, self.rank = world, rank

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else range(self.n)
        step = self.batch_size * self.world
        for start in range(0, len(self) * step, step):
            chunk = list(order[start : start + step])
            size, extra = divmod(len(chunk), self.world)
            lo = self.rank * size + min(self.rank, extra)
            yield chunk[lo : lo + size + (self.rank < extra)]

    def __len__(self) -> int:
        step = self.batch_size * self.world
        full_batches, rest = divmod(self.n, step)
        return full_batches + (rest >= self.world)


class FixedBatches(Sampler[list[int]]):
    """A batch sampler over a given list of index batches (a rank's share of evaluation batches)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
