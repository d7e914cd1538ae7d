"""Elastic Weight Consolidation, online form: a quadratic pull towards the weights of earlier tasks.

Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS); the
online recursion of Schwarz et al. 2018 ("Progress & Compress") and Huszár 2018 ("Note on the
quadratic penalties in elastic weight consolidation"): after task t,

    F     <- gamma * F + F_t          (F_t: diagonal Fisher of task t at its final weights)
    theta* <- theta                   (the weights after task t)
    penalty = (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2

gamma = 1 is Huszár's exact Laplace recursion; gamma < 1 lets old tasks fade. One Fisher and one
anchor are kept whatever the number of tasks (Kirkpatrick's one penalty per task would grow
memory by two model copies per task). TRACE uses lambda = 400.

Fisher estimator: the *empirical* Fisher, squared gradients of the training loss (answer tokens,
the same loss as training) on the finished task's training examples, averaged over
`fisher_batches` batches. By default the squares are of whole-batch mean-loss gradients (one
backward pass per batch, as TRACE does); `per_sample` squares each example's gradient instead,
the textbook estimator, at one backward pass per example. The two differ in scale (per-batch is
about 1/batch_size of per-sample), so lambda is tuned for one of them.

Only parameters that train are regularised (every weight in full fine-tuning, the adapters with
LoRA). Fisher and anchors are fp32, laid out like their parameters (sharded the same way under
FSDP2), keyed by parameter name. Under several ranks every rank estimates the Fisher on the same
global batches (so each gradient is one batch's, never a sum over ranks' batches) and the penalty
is computed shard-locally: each element's pull lambda F (theta - theta*) reaches exactly the rank
that owns it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from clbench.distributed import all_reduce_, is_sharded, local
from clbench.gradients import squared_grads
from clbench.strategy import CLStrategy, StrategyContext

Tensors = dict[str, torch.Tensor]


def ewc_penalty(params: Tensors, fisher: Tensors, anchor: Tensors, lam: float) -> torch.Tensor:
    """(lam / 2) * sum F * (theta - theta*)^2 over the parameters present in all three dicts.

    On sharded tensors each rank sums its shards, so each element's gradient is complete on the rank
    that owns it; the value is the whole penalty on every rank (the other shards' sum enters as a
    constant), so the loss a rank logs is the whole loss."""
    total = torch.zeros((), device=local(next(iter(fisher.values()))).device)
    for name, p in params.items():
        if name in fisher:
            total = total + (local(fisher[name]) * (local(p).float() - local(anchor[name])).square()).sum()
    if any(is_sharded(f) for f in fisher.values()):
        part = total.detach()
        total = total + (all_reduce_(part.clone()) - part)
    return 0.5 * lam * total


def module_device(ctx: StrategyContext) -> torch.device:
    """Where the model's (local) parameters are, so batches go there."""
    return local(next(ctx.module.model.parameters())).device


def rows(batch: dict) -> Iterator[dict]:
    """One-example batches from a batch (left padding is harmless: it is masked and labelled -100)."""
    for i in range(batch["input_ids"].shape[0]):
        yield {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}


class EWC(CLStrategy):
    """Online EWC with a diagonal empirical Fisher computed at the end of each task.

    Args:
        ewc_lambda: Strength lambda of the penalty (lambda / 2) * sum F (theta - theta*)^2 (TRACE: 400).
        gamma: Decay of the earlier tasks' Fisher at each task end (F <- gamma F + F_new); 1 keeps all.
        fisher_batches: Training batches of the finished task the Fisher is averaged over; None: all.
        per_sample: Square each example's gradient (textbook, slower) instead of each batch's.
    """

    def __init__(
        self,
        ewc_lambda: float = 400.0,
        gamma: float = 1.0,
        fisher_batches: int | None = 64,
        per_sample: bool = False,
    ) -> None:
        if ewc_lambda < 0:
            raise ValueError(f"ewc.ewc_lambda must be >= 0, got {ewc_lambda}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"ewc.gamma must be in [0, 1], got {gamma}")
        if fisher_batches is not None and fisher_batches < 1:
            raise ValueError(f"ewc.fisher_batches must be a positive count or None, got {fisher_batches}")
        self.ewc_lambda, self.gamma = ewc_lambda, gamma
        self.fisher_batches, self.per_sample = fisher_batches, per_sample
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def training_penalty(self, ctx: StrategyContext, batch: dict, outputs: object) -> torch.Tensor | None:
        if not self.fisher:
            return None
        params = ctx.module.trainable_parameters()
        self._follow(params)
        return ewc_penalty(params, self.fisher, self.anchor, self.ewc_lambda)

    def _follow(self, params: Tensors) -> None:
        # Lightning moves the model between devices around fit (and a resume loads on CPU):
        # keep each Fisher and anchor where its parameter is, moving it once.
        for name, p in params.items():
            if name in self.fisher and local(self.fisher[name]).device != local(p).device:
                self.fisher[name] = self.fisher[name].to(p.device)
                self.anchor[name] = self.anchor[name].to(p.device)

    def on_task_end(self, ctx: StrategyContext) -> None:
        params = ctx.module.trainable_parameters()
        new = self.estimate_fisher(ctx, params)
        for name, f in new.items():
            old = self.fisher.get(name)
            self.fisher[name] = f if old is None else self.gamma * old + f
            self.anchor[name] = params[name].detach().float().clone()

    def estimate_fisher(self, ctx: StrategyContext, params: Tensors) -> Tensors:
        """Mean squared gradient over the first `fisher_batches` (shuffled) training batches."""
        module, device = ctx.module, module_device(ctx)
        sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        count, was_training = 0, module.training
        module.eval()  # dropout off: the Fisher of the deterministic model at theta*
        try:
            with torch.enable_grad():
                for batch in self._batches(ctx.service().make_loader(ctx.task.train, True)):
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    for part in rows(batch) if self.per_sample else [batch]:
                        for name, g in squared_grads(module(part).loss, params).items():
                            sums[name] += g
                        count += 1
        finally:
            module.train(was_training)
        return {name: s / max(count, 1) for name, s in sums.items()}

    def _batches(self, loader: Iterable) -> Iterator[dict]:
        for i, batch in enumerate(loader):
            if self.fisher_batches is not None and i >= self.fisher_batches:
                return
            yield batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"fisher.{name}": f for name, f in self.fisher.items()},
            **{f"anchor.{name}": a for name, a in self.anchor.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher.") :]: v.float() for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor.") :]: v.float() for k, v in state.items() if k.startswith("anchor.")}
