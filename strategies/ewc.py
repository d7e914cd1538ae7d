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
about 1/batch_size of per-sample), so lambda is tuned for one of them. The estimator is
clbench.gradients.empirical_fisher, shared with other strategies.

Only parameters that train are regularised (every weight in full fine-tuning, the adapters with
LoRA). Fisher and anchors are fp32, laid out like their parameters (sharded the same way under
FSDP2), keyed by parameter name. Under several ranks every rank estimates the Fisher on the same
global batches (so each gradient is one batch's, never a sum over ranks' batches) and the penalty
is computed shard-locally: each element's pull lambda F (theta - theta*) reaches exactly the rank
that owns it.

How the penalty trains. Its gradient lambda F (theta - theta*) is elementwise, so it is not built
into the autograd graph: `on_before_optimizer_step` adds it to each parameter's gradient in place
(theta - theta* into one reused buffer, then grad += lambda F (theta - theta*) by addcmul_), once per
optimizer step, after all accumulated backward passes. That is the gradient the former loss term
gave: the parameters do not change between the micro-batches of a step, and Lightning divides each
micro-batch's loss by the number accumulated, k, so k micro-batches each carrying the penalty added
its gradient exactly once; a step Lightning takes at the end of an epoch on m < k micro-batches
added m / k of it, and so does the hook (it counts the micro-batches). Lightning calls the hook
before it clips the gradients (the precision plugin's `_after_closure`: hooks, then clipping), so
the penalty's gradient is inside the clipped norm, as before. Under FSDP2 each rank adds it to its
own shards (no communication); under DDP every rank adds the same term to the averaged gradient.

The Fisher's scale decides what a lambda means (a per-batch empirical Fisher of a large model is
tiny), so after each task RUN_DIR/ewc/fisher.json records the accumulated Fisher's mean, the share
of its elements above 1e-10 ... 1e-4, and lambda x mean (a log line says the same).

The penalty's value is computed without a graph, for the log only: on optimizer steps 0, k, 2k, ...
of each task (k = `penalty_every`, 8), on the first micro-batch; in between, train/penalty (and its
share of train/loss) repeats the last value, at most k - 1 steps old (the gradient is always the
current one). Against the penalty in the graph a step saves a forward and a backward pass over
every parameter and their temporaries, a model-sized fp32 tensor kept for the backward pass among
them (tools/bench_gate.py measures the step).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from clbench.distributed import all_reduce_, is_sharded, local
from clbench.files import write_json
from clbench.gradients import empirical_fisher, gate_statistics
from clbench.strategy import CLStrategy, StrategyContext

Tensors = dict[str, torch.Tensor]


def ewc_penalty(params: Tensors, fisher: Tensors, anchor: Tensors, lam: float) -> torch.Tensor:
    """(lam / 2) * sum F * (theta - theta*)^2 over the parameters present in all three dicts, in the
    autograd graph (the reference form: EWC itself adds the gradient in its optimizer-step hook).

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


class EWC(CLStrategy):
    """Online EWC with a diagonal empirical Fisher computed at the end of each task.

    Args:
        ewc_lambda: Strength lambda of the penalty (lambda / 2) * sum F (theta - theta*)^2 (TRACE: 400).
        gamma: Decay of the earlier tasks' Fisher at each task end (F <- gamma F + F_new); 1 keeps all.
        fisher_batches: Training batches of the finished task the Fisher is averaged over; None: all.
        per_sample: Square each example's gradient (textbook, slower) instead of each batch's.
    """

    penalty_every = 8  # the penalty's value (for the log) is measured on steps 0, k, 2k, ... of a task

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
        self.scale_log: dict[str, dict] = {}  # the Fisher's scale after each task, by task
        self._restart()

    def _restart(self) -> None:
        """A new task (or new Fisher and anchors): the value is measured again at the next step."""
        self._steps = 0  # optimizer steps of the current task
        self._value: torch.Tensor | None = None  # the penalty's value as last measured
        self._value_step = -1  # the step it was measured at
        self._scratch: torch.Tensor | None = None  # theta - theta*, one tensor at a time
        self._micro = 0  # micro-batches since the last optimizer step

    def training_penalty(self, ctx: StrategyContext, batch: dict, outputs: object) -> torch.Tensor | None:
        """The penalty's value, without a graph: measured on steps 0, k, 2k, ... (k = penalty_every),
        else the last measured value. Its gradient comes in on_before_optimizer_step."""
        if not self.fisher:
            return None
        self._micro += 1
        if self._value is None or (self._steps % self.penalty_every == 0 and self._value_step != self._steps):
            params = ctx.module.trainable_parameters()
            self._follow(params)
            self._value = self._penalty_value(params)
            self._value_step = self._steps
        return self._value

    @torch.no_grad()
    def _penalty_value(self, params: Tensors) -> torch.Tensor:
        """ewc_penalty's value (the same numbers) in place in the buffer, with no graph; on sharded
        tensors the sum of every rank's shards (a collective: every rank measures on the same steps)."""
        total = torch.zeros((), device=local(next(iter(self.fisher.values()))).device)
        for name, p in params.items():
            if name in self.fisher:
                theta = local(p)
                displacement = self._buffer(theta)
                torch.sub(theta, local(self.anchor[name]), out=displacement)
                total = total + displacement.square_().mul_(local(self.fisher[name])).sum()
        if any(is_sharded(f) for f in self.fisher.values()):
            total = all_reduce_(total)
        return 0.5 * self.ewc_lambda * total

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        """grad += lambda F (theta - theta*) on every regularised parameter (local shards), in place,
        once per optimizer step and before Lightning clips the gradients."""
        if not self.fisher:
            return
        self._steps += 1
        lam = self.ewc_lambda * (self._micro / ctx.module.accumulate_grad_batches if self._micro else 1.0)
        self._micro = 0
        params = ctx.module.trainable_parameters()
        self._follow(params)
        for name, p in params.items():
            fisher = self.fisher.get(name)
            if fisher is None:
                continue
            if p.grad is None:  # a parameter the loss did not reach still feels the pull
                p.grad = torch.zeros_like(p)
            theta, grad = local(p), local(p.grad)
            displacement = self._buffer(theta)
            torch.sub(theta, local(self.anchor[name]), out=displacement)
            grad.addcmul_(local(fisher), displacement, value=lam)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An fp32 tensor shaped like `like`: a view of one buffer as large as the largest (local)
        Fisher tensor, kept for the task (no allocation, so no fresh pages to fault in, per tensor
        and step)."""
        if self._scratch is None or self._scratch.device != like.device:
            largest = max(local(f).numel() for f in self.fisher.values())
            self._scratch = torch.empty(largest, dtype=torch.float32, device=like.device)
        return self._scratch[: like.numel()].view(like.shape)

    def _follow(self, params: Tensors) -> None:
        # Lightning moves the model between devices around fit (and a resume loads on CPU):
        # keep each Fisher and anchor where its parameter is, moving it once.
        for name, p in params.items():
            if name in self.fisher and local(self.fisher[name]).device != local(p).device:
                self.fisher[name] = self.fisher[name].to(p.device)
                self.anchor[name] = self.anchor[name].to(p.device)

    def on_task_start(self, ctx: StrategyContext) -> None:
        self._restart()

    def on_task_end(self, ctx: StrategyContext) -> None:
        self._restart()  # frees the buffer before the Fisher's backward passes
        params = ctx.module.trainable_parameters()
        new = empirical_fisher(ctx, params, self.fisher_batches, self.per_sample)
        for name, f in new.items():
            old = self.fisher.get(name)
            self.fisher[name] = f if old is None else self.gamma * old + f
            self.anchor[name] = params[name].detach().float().clone()
        self._log_scale(ctx)

    def _log_scale(self, ctx: StrategyContext) -> None:
        """The accumulated Fisher's mean and spread (every rank: shard sums), to RUN_DIR/ewc/fisher.json
        (after a resume, the tasks before it are read back from the file)."""
        path = Path(ctx.run_dir) / "ewc" / "fisher.json"
        if not self.scale_log and path.is_file():
            self.scale_log = json.loads(path.read_text())
        stats = gate_statistics(self.fisher, thresholds=(1e-10, 1e-8, 1e-6, 1e-4))
        stats["lambda_times_mean"] = self.ewc_lambda * stats.get("mean", 0.0)
        self.scale_log[ctx.task.name] = stats
        rank_zero_info(
            f"clbench: ewc Fisher after {ctx.task.name}: mean {stats.get('mean', 0.0):.3g}, "
            f"lambda x mean {stats['lambda_times_mean']:.3g} (ewc/fisher.json)"
        )
        if ctx.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.scale_log)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"fisher.{name}": f for name, f in self.fisher.items()},
            **{f"anchor.{name}": a for name, a in self.anchor.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher.") :]: v.float() for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor.") :]: v.float() for k, v in state.items() if k.startswith("anchor.")}
        self._restart()
