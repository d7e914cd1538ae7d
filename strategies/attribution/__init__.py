"""Attribution-guided gating: protect parameters that earlier tasks found relevant.

"Attribution-Guided Continual Learning for Large Language Models" (arXiv 2605.05285, section 4;
project reading in docs/attribution.md). After task tau, a prior over the trainable parameters is
scored (importance.py, Eq. 10-11) on the samples a model answers correctly; the historical
importance Rbar = clamp(max over earlier priors, 0) (Eq. 12) then gates every optimizer step of
later tasks (Eq. 13), once per step, after all accumulated backward passes:

    gate_target "grad"    g <- (1 - Rbar) g                                   (the paper)
    gate_target "update"  theta <- theta_old + (1 - Rbar) (theta_step - theta_old)

(`attribution_merge`, merge.py, applies the same gate to each task's whole change at its end.)

What still moves a parameter with Rbar = 1 under "grad": its gradient is exactly zero, but AdamW
still applies its decoupled weight decay (theta <- theta (1 - lr wd), independent of g) and the
first moment m carried over from earlier tasks (keep_optimizer_state) keeps pushing it along
m / sqrt(v) for many steps. Adam is also invariant to a constant gradient scale, so a gate of 0.7
on every step does almost nothing; only gates near 0 matter. "update" gates the whole step
(decay and momentum included): a parameter with Rbar = 1 does not move. Both are exact at
Rbar = 0 (the step is bit-identical to sequential fine-tuning). "update" is folded into AdamW's
step (the hook `update_gate`, applied by clbench.module.GatedAdamW): the step of a gated tensor is
computed out of place and lerp(theta_step, theta_old, gate) written into the parameter, with no
copy of the old weights, at about the cost of a seqft step (tools/bench_gate.py).

`gate_power` (clbench's ablation, 1 = the paper) gates with Rbar ** gate_power instead: a
monotone transform that keeps which parameters are protected but changes how strongly. Eq. 10's
log(1 + |R|) is nearly linear for relevance this small (a whole sample's relevance is about one
logit, spread over every parameter), so the paper's gate is mostly close to 0 and rarely near 1.
`budget` q (clbench's, for comparing importance sources at matched strength) replaces the graded
gate by a hard one: in each tensor the share q of elements with the highest Rbar gets gate 1 (ties
broken arbitrarily, exactly ceil(q n) elements), every other element 0; a tensor whose Rbar is zero
everywhere (the source says nothing about it, e.g. LRP and norm weights) is not gated. Only each
tensor's order of Rbar matters then, so LRP, gradient x weight, Fisher, magnitude and random all
withhold the updates of the same number of elements and differ only in which ones.
Every gate actually used is summarised in RUN_DIR/importance/gate.json (mean, shares above
thresholds) with, under "update", the measured share of the L1 mass of the gated tensors' update
that the gate removed (tensors whose gate is all zero, e.g. norm weights, are not counted). It
takes extra passes over the weights, so it is measured on optimizer steps 0, k, 2k, ... of each
task only (k = `mass_every`, 8; gate.json gives k and the number of steps measured), exactly on
those steps.

Importance source. "single_task" (the paper): the prior of task tau comes from a model trained on
tau alone from the starting weights (same data, epochs, optimizer settings and seed), trained by
the services' side_fit with the continual weights saved and restored and the random-number state
untouched. Two savings keep the semantics (docs section 5): task 1's single-task model is the continual model
after task 1, so its prior is scored in place; the last task's prior gates nothing and is scored
only with `score_last_task`. "continual" scores the continual model after each task (no extra
training). Estimator "magnitude" takes |theta| of the single-task model (no samples scored, no
generation; the trivial baseline). Estimator "random" computes the LRP gate and permutes it within
each tensor with one fixed permutation per tensor (seeded by the run seed and the name), so it has
the LRP gate's per-tensor mass and distribution but not its locations (and permute(max) =
max(permute)); under a budget its gate is a uniform random choice of q of each tensor's elements,
fixed by the seed.

Priors are cached as safetensors in `prior_dir` (default: a "priors" folder beside the run folder),
keyed by model identity (name, LoRA settings, dtype), task name and a hash of its training data and
tokenisation, scoring settings, single-task training settings and the seed (the seed changes the
single-task model); other strategies, orders and ablations sharing these reuse them. A file under
that key for a model with other parameter names or shapes is refused. Continual-model maps depend
on the history and go to the run folder only. RUN_DIR/importance/used.json lists every map used,
for `clbench analyze importance`.

Defaults: the paper's reading with 64 prior samples per task. clbench keeps it because the matched-
budget study's candidates, chosen by OP on the quickstart's eval split, did not beat it there (README,
"Does attribution's choice of parameters matter?"): the hard budgets forget less and learn less.

With LoRA only the adapters train and are scored; note that with B = 0 (peft's init) adapter
relevance is exactly 0, so only a trained adapter has an informative prior.

This package holds everything the method needs, and the core never imports it:
    __init__.py    the strategy (this file): the gate, its statistics, the hooks
    lrp/           the exact LRP engine (rules, per-architecture passes, parameter relevance)
    importance.py  per-sample scores (LRP, gradient x weight, Fisher), Eq. 10-12, the prior cache
    priors.py      where each task's prior comes from (single-task side fit or continual model)
    offload.py     tensors parked in host memory or on disk while a prior is computed
    merge.py       attribution_merge: the gate on each task's whole change at its end (issue 37)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from clbench import distributed as dist
from clbench.distributed import full, is_sharded, local, shard_like
from clbench.files import write_json
from clbench.gradients import gate_statistics
from clbench.strategy import CLStrategy, StrategyContext, UpdateGate
from strategies.attribution.importance import fold_max, permute_within, rng_preserved
from strategies.attribution.offload import Parked
from strategies.attribution.priors import Parking, PriorCache, PriorSource, Scorer

Tensors = dict[str, torch.Tensor]


class Attribution(CLStrategy):
    """Gates each optimizer step by the historical attribution importance of earlier tasks.

    Args:
        gate_target: Gate the gradient ("grad", the paper) or the optimizer's whole update ("update").
        source: Score single-task models ("single_task", the paper) or the continual model ("continual").
        estimator: Per-sample relevance: "lrp" (the paper), "grad_x_weight", "fisher", "magnitude"
            (|theta|, no samples) or "random" (the LRP gate permuted within each tensor).
        top_k: K of the top-K mean over samples (Eq. 11); memory K x trainable parameters while scoring.
        max_prior_samples: Training examples (the first ones) scored per task; None: all.
        correct_threshold: A sample counts if its metric score is >= this (0/1 metrics: any value in
            (0, 1] means exactly correct); 0 counts every sample and skips generation.
        prior_dir: Cache folder of single-task priors; None: "priors" beside the run folder.
        score_last_task: Also score the last task (it gates nothing; for the overlap analysis).
        record_continual: With source "single_task", also record the continual model's map after
            each task in the run folder (for the analysis; one scoring pass per task).
        gate_power: Gate with Rbar ** gate_power (> 0); 1 is the paper, < 1 strengthens the gate.
        budget: Instead, gate 1 on the share `budget` (0 < q <= 1) of each tensor's elements with the
            highest Rbar and 0 elsewhere; None: the graded gate.
        offload: Where the single-task models' starting weights wait, and the continual weights,
            optimizer moments and Rbar while a prior is computed: "memory" (host memory), "disk"
            (safetensors in RUN_DIR/offload, removed after the last prior; lower peak memory, costs
            writing and reading them once per prior) or "auto": disk when training runs on the
            CPU (host memory is then the training memory), memory on an accelerator. See
            strategies/attribution/offload.py.
        prior_dtype: How the K values per element are kept while scoring: "bfloat16" (2K bytes per
            trainable parameter) or "float32" (4K bytes, exact).
    """

    gate_targets: tuple[str, ...] = ("grad", "update")  # where the gate acts (attribution_merge: "merge")
    mass_every = 8  # "update": the removed update mass is measured on steps 0, k, 2k, ... of each task
    placement_only = ("offload", "prior_dir")  # the same numbers wherever state waits or priors are cached

    def __init__(
        self,
        gate_target: Literal["grad", "update"] = "grad",
        source: Literal["single_task", "continual"] = "single_task",
        estimator: Literal["lrp", "grad_x_weight", "fisher", "magnitude", "random"] = "lrp",
        top_k: int = 8,
        max_prior_samples: int | None = 64,
        correct_threshold: float = 0.5,
        prior_dir: str | None = None,
        score_last_task: bool = False,
        record_continual: bool = False,
        gate_power: float = 1.0,
        prior_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        budget: float | None = None,
        offload: Literal["auto", "memory", "disk"] = "auto",
    ) -> None:
        for option, value, allowed in (
            ("gate_target", gate_target, self.gate_targets),
            ("source", source, ("single_task", "continual")),
            ("estimator", estimator, ("lrp", "grad_x_weight", "fisher", "magnitude", "random")),
            ("prior_dtype", prior_dtype, ("bfloat16", "float32")),
            ("offload", offload, ("auto", "memory", "disk")),
        ):
            if value not in allowed:
                raise ValueError(f"attribution.{option} must be one of {', '.join(allowed)}; got {value!r}")
        if top_k < 1:
            raise ValueError(f"attribution.top_k must be >= 1, got {top_k}")
        if max_prior_samples is not None and max_prior_samples < 1:
            raise ValueError(
                f"attribution.max_prior_samples must be a positive count or None, got {max_prior_samples}"
            )
        if not gate_power > 0:
            raise ValueError(f"attribution.gate_power must be > 0, got {gate_power}")
        if budget is not None and not 0.0 < budget <= 1.0:
            raise ValueError(f"attribution.budget must be in (0, 1] or None, got {budget}")
        if budget is not None and gate_power != 1.0:
            raise ValueError("attribution.budget and attribution.gate_power exclude each other: set one")
        if not 0.0 <= correct_threshold <= 1.0:
            raise ValueError(f"attribution.correct_threshold must be in [0, 1], got {correct_threshold}")
        self.gate_target, self.source, self.estimator = gate_target, source, estimator
        self.top_k, self.max_prior_samples = top_k, max_prior_samples
        self.correct_threshold, self.prior_dir = correct_threshold, prior_dir
        self.score_last_task, self.record_continual = score_last_task, record_continual
        self.gate_power, self.budget, self.offload = gate_power, budget, offload
        self.rbar: Tensors = {}
        self.gate: Tensors = {}  # what multiplies the step: Rbar ** gate_power
        self.gate_log: dict[str, dict] = {}  # by the task trained under the gate
        self._moved = torch.zeros(2, dtype=torch.float64)  # gated tensors' update L1 mass: removed, total
        self.tasks_folded = 0
        scorer = Scorer(estimator, top_k, max_prior_samples, correct_threshold, prior_dtype)
        self.priors = PriorSource(source, record_continual, scorer, Parking(offload), PriorCache(prior_dir))
        self._steps = 0  # optimizer steps of the current task under the update gate
        self._nonzero: dict[str, bool] = {}

    # -- the gate -------------------------------------------------------------------------------
    def _gated(self, ctx: StrategyContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gate) shards for every trainable parameter with some nonzero gate here (moved
        once). Everything the gate does is elementwise, so under FSDP2 it runs on local shards."""
        for name, p in ctx.module.trainable_parameters().items():
            r = self.gate.get(name)
            if r is None or not self._nonzero.get(name, True):
                continue
            if local(r).device != local(p).device:
                r = self.gate[name] = r.to(local(p).device)
            yield p, local(r)

    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        """ "grad": g <- (1 - gate) g as g - g gate, one fused in-place op per gated tensor: no
        temporary and no second tensor beside the gate (within fp32 rounding of multiplying by
        1 - gate, exact at gates 0 and 1, and as fast)."""
        if self.gate_target != "grad":
            return
        with torch.no_grad():
            for p, r in self._gated(ctx):
                if p.grad is not None:
                    grad = local(p.grad)
                    grad.addcmul_(grad, r, value=-1)

    def update_gate(self, ctx: StrategyContext) -> UpdateGate | None:
        """The gate as the share of each element's update the optimizer's step withholds: theta_new =
        lerp(theta_step, theta_old, gate), folded into the step. Every `mass_every`-th step of a task
        (the first included) also measures the update mass the gate removes."""
        if self.gate_target != "update" or not self.gate:
            return None
        held = {p: r.to(p.dtype) for p, r in self._gated(ctx)}  # lerp weighs in the parameter's dtype
        if not held:
            return None
        measured = self._steps % self.mass_every == 0
        self._steps += 1
        device = next(iter(held.values())).device
        if self._moved.device != device:  # kept where the parameters are: no sync per step
            self._moved = self._moved.to(device)
        return UpdateGate(held, self._moved if measured else None)

    def _fold(self, ctx: StrategyContext, prior: Tensors) -> None:
        if self.estimator == "random":
            params = ctx.module.trainable_parameters()
            whole = permute_within({n: full(t).cpu() for n, t in prior.items()}, ctx.seed)
            prior = {n: shard_like(params[n], t) if is_sharded(params[n]) else t for n, t in whole.items()}
        fold_max(self.rbar, prior)
        self.tasks_folded += 1
        self._refresh()

    def _refresh(self) -> None:
        if self.budget is not None:
            self.gate = {name: _top_share(r, self.budget) for name, r in self.rbar.items()}
        elif self.gate_power == 1.0:
            self.gate = dict(self.rbar)
        else:
            self.gate = {name: r.pow(self.gate_power) for name, r in self.rbar.items()}
        self._nonzero = {name: bool(local(r).any()) for name, r in self.gate.items()}

    # -- priors ---------------------------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        self.priors.setup(ctx)

    def on_task_end(self, ctx: StrategyContext) -> None:
        last = ctx.task_index == len(ctx.stream) - 1
        # scoring iterates data loaders (which draw from the global RNG) and may train a side
        # model: keep the continual run's random stream the same whether a prior is cached or not
        with rng_preserved(ctx.seed), self._rbar_parked(ctx):
            prior = self.priors.prior(ctx, needed=not last or self.score_last_task)
        if last:
            self.priors.close(ctx)
        if self.rbar and self.gate_target == "update":  # a gate trained this task
            removed, total = dist.all_reduce_(self._moved).tolist()  # shard sums -> whole-model sums
            entry = self.gate_log.setdefault(ctx.task.name, {})
            entry["update_mass_removed"] = removed / total if total else 0.0
            entry["update_mass_every"] = self.mass_every
            entry["update_mass_steps"] = -(-self._steps // self.mass_every)  # steps 0, k, 2k, ... measured
        self._moved.zero_()
        self._steps = 0
        if prior is not None and not last:
            self._fold(ctx, prior)
            following = ctx.stream.tasks[ctx.task_index + 1].name
            stats = gate_statistics(self.gate)
            form = {"gate_power": self.gate_power} if self.budget is None else {"budget": self.budget}
            self.gate_log[following] = {"after": ctx.task.name, **form, **stats}
            rank_zero_info(
                f"clbench: attribution gate for {following}: mean {stats.get('mean', 0.0):.4f}, "
                f"{stats.get('share_above_0.5', 0.0):.3%} of elements above 0.5 (importance/gate.json)"
            )
        else:
            self._refresh()  # the gate of the Rbar that waited while the prior was computed
        if ctx.writes:
            out = Path(ctx.run_dir) / "importance"
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "used.json", {"maps": self.priors.used})
            write_json(out / "gate.json", self.gate_log)

    @contextmanager
    def _rbar_parked(self, ctx: StrategyContext) -> Iterator[None]:
        """Rbar waits where `offload` says while a prior is computed (nothing gates meanwhile); the
        caller makes the gate again from it after (once, with the new prior folded in)."""
        if not self.rbar:
            yield
            return
        parked = Parked(
            self.rbar, self.priors.parking.where(ctx), self.priors.parking.folder(ctx) / "rbar", copy=False
        )
        self.rbar, self.gate, self._nonzero = {}, {}, {}
        try:
            yield
        finally:
            self.rbar = dict(parked.items())
            parked.close()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"rbar.{name}": r for name, r in self.rbar.items()}
        return {**state, "tasks_folded": torch.tensor(self.tasks_folded)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rbar = {k[len("rbar.") :]: v.float() for k, v in state.items() if k.startswith("rbar.")}
        self.tasks_folded = int(state.get("tasks_folded", torch.tensor(0)))
        self._refresh()


def _top_share(rbar: torch.Tensor, q: float) -> torch.Tensor:
    """1 on the ceil(q n) elements of the tensor with the highest Rbar, 0 elsewhere (all 0 when Rbar
    is); laid out like `rbar`. Under FSDP2 the whole tensor is gathered (a collective: every rank)."""
    whole = full(rbar)
    flat = whole.flatten()
    gate = torch.zeros_like(flat)
    if flat.any():
        gate[flat.topk(math.ceil(q * flat.numel()), sorted=False).indices] = 1.0
    gate = gate.view_as(whole)
    return shard_like(rbar, gate) if is_sharded(rbar) else gate
