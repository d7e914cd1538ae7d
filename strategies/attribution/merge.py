"""Attribution merging (issue 37): the historical importance Rbar of the attribution strategy (Eq. 12,
its priors, sources, cache and gate as they are) weighs each task's whole change once, at its end,
instead of every optimizer step:

    theta <- theta_prev + (1 - Rbar) (theta' - theta_prev)   =   lerp(theta', theta_prev, Rbar)

with theta_prev the weights the task started from and theta' those it trained to; training itself is
sequential fine-tuning. Why: Adam is invariant to a constant per-element gradient scale
(docs/attribution.md, section 6), so a graded gate on the steps barely acts; on the task's change
Adam cannot undo it, and Rbar reads as it says (0.3 keeps 70% of the change). `gate_power` and
`budget` make the gate as for `attribution` (the budget: theta_prev kept on the top share q of each
tensor by Rbar, theta' elsewhere), and so do the estimators and sources: the Fisher and gradient x
weight priors, the magnitude and random controls.

Order at a task's end, before its row is evaluated: the merge with the gate of the earlier tasks,
then the task's own prior is scored and folded into Rbar as `attribution` does. Task 1's merge
changes nothing (no gate yet), so its single-task model is theta' itself; later priors come from
single-task models trained from the starting weights (or the continual, merged model with source
"continual"). The priors are the ones `attribution` caches, under the same key, so runs of the two
strategies share them.

Exact at the ends: torch.lerp is exact at weights 0 and 1, so Rbar 0 (the first task, a prior of
zeros) is sequential fine-tuning bit for bit and Rbar 1 keeps theta_prev bit for bit.

Keeps theta_prev during the task (a copy of the trainable parameters; under FSDP2 each rank its
shards), let go before the prior is computed, and Rbar between tasks (attribution's state). Costs one
elementwise pass at the task's end (no communication: the gate is laid out like the parameters),
besides attribution's prior.
"""

from __future__ import annotations

from typing import Any

import torch

from clbench.distributed import local
from clbench.strategy import StrategyContext
from strategies.attribution import Attribution


class AttributionMerge(Attribution):
    """Attribution's gate applied once to each task's whole change, at the task's end.

    theta <- theta_prev + (1 - Rbar) (theta' - theta_prev). The options are attribution's but
    gate_target (here always the task's change)."""

    gate_targets = ("merge",)  # so neither step hook of attribution acts

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(gate_target="merge", **kwargs)
        self.start: dict[str, torch.Tensor] = {}  # theta_prev of the current task

    def on_task_start(self, ctx: StrategyContext) -> None:
        # a copy keeps a sharded parameter's layout: under FSDP2 each rank holds its own rows
        self.start = {n: p.detach().clone() for n, p in ctx.module.trainable_parameters().items()}

    def on_task_end(self, ctx: StrategyContext) -> None:
        self.merge(ctx)  # with the earlier tasks' gate, before this task's prior is folded in
        super().on_task_end(ctx)

    @torch.no_grad()
    def merge(self, ctx: StrategyContext) -> None:
        """theta <- lerp(theta', theta_prev, gate) in place on every gated tensor (local shards)."""
        start, self.start = self.start, {}
        prev = {p: start[n] for n, p in ctx.module.trainable_parameters().items()}
        for p, gate in self._gated(ctx):
            theta = local(p)
            torch.lerp(theta, local(prev[p]).to(theta.device), gate.to(theta.dtype), out=theta)
