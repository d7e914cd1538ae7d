"""What several strategies compute per parameter: gradients of one loss (and their squares, the
empirical Fisher), and how strong a per-parameter gate or weight is (gate_statistics).

Gradients are read where every layout puts them: `p.grad` after backward.

Under FSDP2 `torch.autograd.grad(loss, sharded_params)` returns None for every sharded parameter
(the graph runs through the gathered copies), so a None-to-zeros fallback would silently give all
zeros. Here a missing gradient is an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clbench import distributed as dist

Tensors = dict[str, Tensor]


def grads_of(loss: Tensor, params: Tensors) -> Tensors:
    """d loss / d p for every p in `params`, which must hold every parameter that requires grad.

    Sharded parameters give their (reduce-scattered) shard: every rank must compute the same loss on
    the same inputs, so that the average over ranks is that loss's gradient. Existing `.grad` values
    are put back afterwards."""
    saved = {name: p.grad for name, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        loss.backward()
        missing = [name for name, p in params.items() if p.grad is None]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[:3]}: is the parameter used by the loss?")
        return {name: p.grad for name, p in params.items()}
    finally:
        for name, p in params.items():
            p.grad = saved[name]


def squared_grads(loss: Tensor, params: Tensors) -> Tensors:
    """The empirical-Fisher term of one loss: squared gradients, fp32, laid out like the parameters."""
    return {name: g.float().square() for name, g in grads_of(loss, params).items()}


def gate_statistics(gate: Tensors, thresholds: tuple[float, ...] = (0.01, 0.1, 0.5, 0.9)) -> dict:
    """How strong a gate is over all its elements: the mean (the share of a uniform step it
    removes) and the share of elements above each threshold."""
    n = sum(g.numel() for g in gate.values())  # a sharded tensor's numel is the whole tensor's
    if n == 0:
        return {"elements": 0}
    shards = [dist.local(g) for g in gate.values()]
    sums = torch.tensor(
        [sum(g.sum(dtype=torch.float64).item() for g in shards)]  # no fp64 copy
        + [sum((g > t).sum().item() for g in shards) for t in thresholds],
        dtype=torch.float64,
        device=shards[0].device,
    )
    if any(dist.is_sharded(g) for g in gate.values()):
        dist.all_reduce_(sums)  # shard sums -> whole-tensor sums
    total, *counts = sums.tolist()
    above = {f"share_above_{t}": c / n for t, c in zip(thresholds, counts)}
    return {"elements": n, "mean": total / n, **above}
