"""Every merge (strategies/merging.py and attribution_merge) on a model sharded with FSDP2 over
the ranks torchrun starts, or on the whole model in one process: three tasks whose training is a fixed
change of the weights; the whole weights after each merge and each strategy's record.
Usage: torchrun --nproc-per-node 2 merge_worker.py MODEL_DIR OUT_DIR"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from clbench import distributed as dist
from clbench.data.tasks import Task, TaskStream
from clbench.strategy import CLStrategy, StrategyContext
from strategies import merging
from strategies.attribution.merge import AttributionMerge
from strategies.attribution.priors import PriorSource
from strategies.merging import TIES, FisherMerge, LinearMerge, MagMax

TASKS = 3
CASES: dict[str, Callable[[], CLStrategy]] = {
    "linear_merge": lambda: LinearMerge(alpha=0.3),
    "ties": lambda: TIES(top_k=0.2),
    "ties-finetuned": lambda: TIES(top_k=0.5, scale=0.7, start_from="finetuned"),
    "magmax": lambda: MagMax(),
    "fisher_merge": lambda: FisherMerge(),
    "attribution_merge": lambda: AttributionMerge(),
    "attribution_merge-budget": lambda: AttributionMerge(budget=0.3),
}


class Module:
    """A CLModule stand-in: the model and what trains (every parameter)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())


def fixed(params: dict, t: int, kind: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """A whole tensor per parameter from a generator seeded by (kind, task, name), laid out like it:
    the same numbers in every process and layout."""
    out = {}
    for name, p in params.items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{t}-{name}".encode()))
        value = transform(torch.randn(p.shape, generator=g))
        out[name] = dist.shard_like(p, value) if dist.is_sharded(p) else value
    return out


def prior(self, ctx: StrategyContext, needed: bool) -> dict | None:
    """Task t's prior for attribution: values in [0, 1], a third of them exactly 0 and a third 1."""
    params = ctx.module.trainable_parameters()
    return (
        fixed(params, ctx.task_index, "prior", lambda x: x.sigmoid().mul(3).sub(1).clamp(0, 1))
        if needed
        else None
    )


def fisher(ctx: StrategyContext, params: dict, *args: object) -> dict:
    """Task t's Fisher for Fisher merging (fixed: the model is not run)."""
    return fixed(params, ctx.task_index, "fisher", lambda x: x.square().mul(1e-4))


@contextmanager
def fixed_sources() -> Iterator[None]:
    """Attribution's priors and Fisher merging's Fisher fixed inside, as they were after."""
    saved = PriorSource.prior, merging.empirical_fisher
    PriorSource.prior, merging.empirical_fisher = prior, fisher
    try:
        yield
    finally:
        PriorSource.prior, merging.empirical_fisher = saved


@fixed_sources()
def merges(model: torch.nn.Module, run_dir: Path, rank: int = 0, world: int = 1) -> tuple[dict, dict]:
    """{case/task/name: whole weights after the task's merge}, {case: its merge record (rank 0)}."""
    module = Module(model)
    params = module.trainable_parameters()
    start = {n: dist.local(p).detach().clone() for n, p in params.items()}
    stream = TaskStream(name="s", tasks=[Task(name=f"t{i}", train=[], test=[]) for i in range(TASKS)])
    weights, records = {}, {}
    for case, make in CASES.items():
        with torch.no_grad():
            for name, p in params.items():
                dist.local(p).copy_(start[name])
        strategy, folder = make(), run_dir / case
        ctxs = [StrategyContext(module, stream, t, folder, rank=rank, world_size=world) for t in range(TASKS)]
        strategy.setup(ctxs[0])
        for t, ctx in enumerate(ctxs):
            strategy.on_task_start(ctx)
            with torch.no_grad():  # the task's "training"
                for name, change in fixed(params, t, "change", lambda x: x.mul(0.01)).items():
                    dist.local(params[name]).add_(dist.local(change))
            strategy.on_task_end(ctx)
            weights |= {f"{case}/{t}/{n}": dist.full(p.detach()).cpu().clone() for n, p in params.items()}
        record = next(folder.glob("merge/*.json"), None) or next(folder.glob("importance/gate.json"), None)
        records[case] = json.loads(record.read_text()) if rank == 0 and record else None
    return weights, records


def main(model_dir: str, out_dir: str) -> None:
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dist.apply_fsdp(model, init_device_mesh("cpu", (world,)), "32-true")
    assert all(dist.is_sharded(p) for p in model.parameters())
    weights, records = merges(model, Path(out_dir) / "runs", rank, world)
    if rank == 0:
        save_file(weights, str(Path(out_dir) / "weights.safetensors"))
        (Path(out_dir) / "records.json").write_text(json.dumps(records))
    tdist.barrier()  # no rank leaves while another still works
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
