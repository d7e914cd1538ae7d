"""Per-parameter gradients of one loss, read where every layout puts them: `p.grad` after backward.

Under FSDP2 `torch.autograd.grad(loss, sharded_params)` returns None for every sharded parameter
(the graph runs through the gathered copies), so a None-to-zeros fallback would silently give all
zeros. Here a missing gradient is an error.
"""

from __future__ import annotations

from torch import Tensor

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
