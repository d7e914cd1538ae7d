"""What several strategies compute per parameter: gradients of one loss (and their squares, the
empirical Fisher of a task: EWC's penalty, Fisher merging's weights), and how strong a
per-parameter gate or weight is (gate_statistics).

Gradients are read where every layout puts them: `p.grad` after backward.

Under FSDP2 `torch.autograd.grad(loss, sharded_params)` returns None for every sharded parameter
(the graph runs through the gathered copies), so a None-to-zeros fallback would silently give all
zeros. Here a missing gradient is an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from clbench import distributed as dist
from clbench.data.collate import IGNORE_INDEX

if TYPE_CHECKING:
    from clbench.module import CLModule
    from clbench.strategy import StrategyContext

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


def empirical_fisher(
    ctx: StrategyContext, params: Tensors, batches: int | None = None, per_sample: bool = False
) -> Tensors:
    """The diagonal empirical Fisher of the current task at the current weights: the mean squared
    gradient of the training loss (answer tokens) over the first `batches` shuffled training batches
    of the task (None: all), fp32, laid out like `params`. Squares of each batch's mean-loss gradient
    (one backward pass per batch), or with `per_sample` of each example's (the textbook estimator, one
    pass per example; about batch_size x larger). Dropout off. Every rank must call it: the loader
    gives every rank the same global batches, so each gradient is one batch's, never a sum over
    ranks' batches."""
    module, device = ctx.module, module_device(ctx)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count, was_training = 0, module.training
    module.eval()  # the Fisher of the deterministic model at these weights
    try:
        with torch.enable_grad():
            for batch in islice(ctx.service().make_loader(ctx.task.train, True), batches):
                batch = move_data_to_device(batch, device)
                for part in rows(batch) if per_sample else [batch]:
                    for name, g in squared_grads(module(part).loss, params).items():
                        sums[name] += g
                    count += 1
    finally:
        module.train(was_training)
    return {name: s / max(count, 1) for name, s in sums.items()}


def module_device(ctx: StrategyContext) -> torch.device:
    """Where the model's (local) parameters are, so batches go there."""
    return dist.local(next(ctx.module.model.parameters())).device


def rows(batch: dict) -> Iterator[dict]:
    """One-example batches from a batch (left padding is harmless: it is masked and labelled -100)."""
    for i in range(batch["input_ids"].shape[0]):
        yield {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}


def answer_tokens(batch: dict) -> int:
    """The answer tokens a batch's loss averages over (labels 1..T after the causal shift)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def mean_loss_grads(module: CLModule, batches: list[dict], params: Tensors) -> Tensors:
    """The gradient of the mean answer-token loss over all `batches` together (each batch's token
    mean weighted by its share of the tokens), fp32, laid out like the parameters, computed under the
    run's precision (module.precision_context) in the module's current mode.

    Every rank must pass the same batches (Services.make_loader gives them): under FSDP2 the
    reduce-scatter then averages equal gradients, and under DDP, where the module's own forward
    bypasses DDP's reducer, every rank computes the whole gradient itself."""
    counts = [answer_tokens(b) for b in batches]
    total, device = sum(counts), dist.local(next(iter(params.values()))).device
    out: Tensors = {}
    with torch.enable_grad(), module.precision_context():
        for batch, n in zip(batches, counts, strict=True):
            loss = module(move_data_to_device(batch, device)).loss * (n / total)
            for name, g in grads_of(loss, params).items():
                out[name] = g.float() if name not in out else out[name].add_(g)
    return out


def dots(a: Tensors, others: list[Tensors]) -> Tensor:
    """Whole-model dot products <a, b> for each b in `others` (over the names of `a`), as one fp64
    vector on every rank. Sharded tensors give their shard sums, all-reduced in one collective;
    replicated ones (one process, DDP) are whole on every rank and need none."""
    first = dist.local(next(iter(a.values())))
    out = torch.zeros(len(others), dtype=torch.float64, device=first.device)
    for name, x in a.items():
        flat = dist.local(x).reshape(-1)
        for i, b in enumerate(others):
            out[i] += torch.dot(flat, dist.local(b[name]).reshape(-1)).double()
    if others and any(dist.is_sharded(x) for x in a.values()):
        dist.all_reduce_(out)
    return out


def gram(vectors: list[Tensors]) -> Tensor:
    """The fp64 Gram matrix of whole-model dot products <v_i, v_j>: each pair once (the upper
    triangle, mirrored), in one pass over the tensors and, when sharded, one all-reduce."""
    n = len(vectors)
    first = dist.local(next(iter(vectors[0].values())))
    out = torch.zeros(n, n, dtype=torch.float64, device=first.device)
    for name in vectors[0]:
        flat = [dist.local(v[name]).reshape(-1) for v in vectors]
        for i in range(n):
            for j in range(i, n):
                out[i, j] += torch.dot(flat[i], flat[j]).double()
    if any(dist.is_sharded(x) for x in vectors[0].values()):
        dist.all_reduce_(out)
    return out.triu() + out.triu(1).T


def add_combination_(target: Tensors, vectors: list[Tensors], coefficients: list[float]) -> None:
    """target += sum_i coefficients[i] * vectors[i], in place, shard by shard."""
    for name, t in target.items():
        for v, c in zip(vectors, coefficients, strict=True):
            if c != 0.0:
                dist.local(t).add_(dist.local(v[name]), alpha=c)


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
