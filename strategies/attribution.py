"""Attribution-guided gating: protect parameters that earlier tasks found relevant.

"Attribution-Guided Continual Learning for Large Language Models" (arXiv 2605.05285, section 4;
project reading in docs/attribution.md). After task tau, a prior over the trainable parameters is
scored (clbench/importance.py, Eq. 10-11) on the samples a model answers correctly; the historical
importance Rbar = clamp(max over earlier priors, 0) (Eq. 12) then gates every optimizer step of
later tasks (Eq. 13), once per step, after all accumulated backward passes:

    gate_target "grad"    g <- (1 - Rbar) g                                   (the paper)
    gate_target "update"  theta <- theta_old + (1 - Rbar) (theta_step - theta_old)

What still moves a parameter with Rbar = 1 under "grad": its gradient is exactly zero, but AdamW
still applies its decoupled weight decay (theta <- theta (1 - lr wd), independent of g) and the
first moment m carried over from earlier tasks (keep_optimizer_state) keeps pushing it along
m / sqrt(v) for many steps. Adam is also invariant to a constant gradient scale, so a gate of 0.7
on every step does almost nothing; only gates near 0 matter. "update" gates the whole step
(decay and momentum included): a parameter with Rbar = 1 does not move. Both are exact at
Rbar = 0 (the step is bit-identical to sequential fine-tuning).

`gate_power` (clbench's ablation, 1 = the paper) gates with Rbar ** gate_power instead: a
monotone transform that keeps which parameters are protected but changes how strongly. Eq. 10's
log(1 + |R|) is nearly linear for relevance this small (a whole sample's relevance is about one
logit, spread over every parameter), so the paper's gate is mostly close to 0 and rarely near 1.
Every gate actually used is summarised in RUN_DIR/importance/gate.json (mean, shares above
thresholds) with, under "update", the measured share of the L1 mass of the gated tensors' update
that the gate removed (tensors whose gate is all zero, e.g. norm weights, are not counted).

Importance source. "single_task" (the paper): the prior of task tau comes from a model trained on
tau alone from the starting weights (same data, epochs, optimizer settings and seed), trained via
ctx.fit with the continual weights saved and restored and the random-number state untouched. Two
savings keep the semantics (docs section 5): task 1's single-task model is the continual model
after task 1, so its prior is scored in place; the last task's prior gates nothing and is scored
only with `score_last_task`. "continual" scores the continual model after each task (no extra
training). Estimator "random" computes the LRP gate and permutes it within each tensor with one
fixed permutation per tensor (seeded by the run seed and the name), so it has the LRP gate's
per-tensor mass and distribution but not its locations (and permute(max) = max(permute)).

Priors are cached as safetensors in `prior_dir` (default: a "priors" folder beside the run folder),
keyed by model identity (name, LoRA settings, dtype), task name and a hash of its training data and
tokenisation, scoring settings, single-task training settings and the seed (the seed changes the
single-task model); other strategies, orders and ablations sharing these reuse them. A file under
that key for a model with other parameter names or shapes is refused. Continual-model maps depend
on the history and go to the run folder only. RUN_DIR/importance/used.json lists every map used,
for `clbench analyze importance`.

With LoRA only the adapters train and are scored; note that with B = 0 (peft's init) adapter
relevance is exactly 0, so only a trained adapter has an informative prior.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from clbench.evaluation.metrics import score_predictions
from clbench.importance import (
    NEEDS_ANSWERS,
    PriorKey,
    PriorStore,
    digest,
    fold_max,
    gate_statistics,
    parameter_signature,
    permute_within,
    rng_preserved,
    task_prior,
)
from clbench.reporting import write_json
from strategies.base import CLStrategy, StrategyContext

Tensors = dict[str, torch.Tensor]


class Attribution(CLStrategy):
    """Gates each optimizer step by the historical attribution importance of earlier tasks.

    Args:
        gate_target: Gate the gradient ("grad", the paper) or the optimizer's whole update ("update").
        source: Score single-task models ("single_task", the paper) or the continual model ("continual").
        estimator: Per-sample relevance: "lrp" (the paper), "grad_x_weight", "fisher", or "random"
            (the LRP gate permuted within each tensor).
        top_k: K of the top-K mean over samples (Eq. 11); memory K x trainable parameters while scoring.
        max_prior_samples: Training examples (the first ones) scored per task; None: all.
        correct_threshold: A sample counts if its metric score is >= this (0/1 metrics: any value in
            (0, 1] means exactly correct); 0 counts every sample and skips generation.
        prior_dir: Cache folder of single-task priors; None: "priors" beside the run folder.
        score_last_task: Also score the last task (it gates nothing; for the overlap analysis).
        record_continual: With source "single_task", also record the continual model's map after
            each task in the run folder (for the analysis; one scoring pass per task).
        gate_power: Gate with Rbar ** gate_power (> 0); 1 is the paper, < 1 strengthens the gate.
    """

    def __init__(
        self,
        gate_target: Literal["grad", "update"] = "grad",
        source: Literal["single_task", "continual"] = "single_task",
        estimator: Literal["lrp", "grad_x_weight", "fisher", "random"] = "lrp",
        top_k: int = 8,
        max_prior_samples: int | None = 128,
        correct_threshold: float = 0.5,
        prior_dir: str | None = None,
        score_last_task: bool = False,
        record_continual: bool = False,
        gate_power: float = 1.0,
    ) -> None:
        for option, value, allowed in (
            ("gate_target", gate_target, ("grad", "update")),
            ("source", source, ("single_task", "continual")),
            ("estimator", estimator, ("lrp", "grad_x_weight", "fisher", "random")),
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
        if not 0.0 <= correct_threshold <= 1.0:
            raise ValueError(f"attribution.correct_threshold must be in [0, 1], got {correct_threshold}")
        self.gate_target, self.source, self.estimator = gate_target, source, estimator
        self.top_k, self.max_prior_samples = top_k, max_prior_samples
        self.correct_threshold, self.prior_dir = correct_threshold, prior_dir
        self.score_last_task, self.record_continual = score_last_task, record_continual
        self.gate_power = gate_power
        self.rbar: Tensors = {}
        self.gate: Tensors = {}  # what multiplies the step: Rbar ** gate_power
        self.gate_log: dict[str, dict] = {}  # by the task trained under the gate
        self._moved = torch.zeros(2, dtype=torch.float64)  # gated tensors' update L1 mass: removed, total
        self.tasks_folded = 0
        self.start: Tensors = {}
        self.used: list[dict] = []
        self._old: dict[int, torch.Tensor] = {}
        self._nonzero: dict[str, bool] = {}

    # -- the gate -------------------------------------------------------------------------------
    def _gated(self, ctx: StrategyContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gate) for every trainable parameter with some nonzero gate (moved once)."""
        for name, p in ctx.module.trainable_parameters().items():
            r = self.gate.get(name)
            if r is None or not self._nonzero.get(name, True):
                continue
            if r.device != p.device:
                r = self.gate[name] = r.to(p.device)
            yield p, r

    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for p, r in self._gated(ctx):
                if self.gate_target == "grad":
                    if p.grad is not None:
                        p.grad.mul_((1 - r).to(p.grad.dtype))
                else:
                    self._old[id(p)] = p.detach().clone()

    def on_after_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        if self.gate_target != "update":
            return
        with torch.no_grad():
            for p, r in self._gated(ctx):
                old = self._old.pop(id(p))
                step = (p - old).abs_()
                if self._moved.device != p.device:  # kept where the parameters are: no sync per step
                    self._moved = self._moved.to(p.device)
                self._moved[0] += (r * step).sum(dtype=torch.float64)
                self._moved[1] += step.sum(dtype=torch.float64)
                # lerp(new, old, r) is exactly new at r = 0 and exactly old at r = 1
                p.lerp_(old, r.to(p.dtype))
        self._old.clear()

    def _fold(self, prior: Tensors, seed: int) -> None:
        if self.estimator == "random":
            prior = permute_within(prior, seed)
        fold_max(self.rbar, prior)
        self.tasks_folded += 1
        self._refresh()

    def _refresh(self) -> None:
        if self.gate_power == 1.0:
            self.gate = dict(self.rbar)
        else:
            self.gate = {name: r.pow(self.gate_power) for name, r in self.rbar.items()}
        self._nonzero = {name: bool(r.any()) for name, r in self.gate.items()}

    # -- priors ---------------------------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        if self.source == "single_task" and not self.start:
            # snapshot of the starting trainable weights, the start of every single-task model
            self.start = {
                n: p.detach().to("cpu", copy=True) for n, p in ctx.module.trainable_parameters().items()
            }

    def on_task_end(self, ctx: StrategyContext) -> None:
        last = ctx.task_index == len(ctx.stream) - 1
        # scoring iterates data loaders (which draw from the global RNG) and may train a side
        # model: keep the continual run's random stream the same whether a prior is cached or not
        with rng_preserved(ctx.seed):
            prior = self._prior(ctx, needed=not last or self.score_last_task)
        if self.gate and self.gate_target == "update":
            removed, total = self._moved.tolist()
            entry = self.gate_log.setdefault(ctx.task.name, {})
            entry["update_mass_removed"] = removed / total if total else 0.0
        self._moved.zero_()
        if prior is not None and not last:
            self._fold(prior, ctx.seed)
            following = ctx.stream.tasks[ctx.task_index + 1].name
            stats = gate_statistics(self.gate)
            self.gate_log[following] = {"after": ctx.task.name, "gate_power": self.gate_power, **stats}
            rank_zero_info(
                f"clbench: attribution gate for {following}: mean {stats.get('mean', 0.0):.4f}, "
                f"{stats.get('share_above_0.5', 0.0):.3%} of elements above 0.5 (importance/gate.json)"
            )
        out = Path(ctx.run_dir) / "importance"
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "used.json", {"maps": self.used})
        write_json(out / "gate.json", self.gate_log)

    def _prior(self, ctx: StrategyContext, needed: bool) -> Tensors | None:
        """Task t's prior (None when not needed), recording continual maps when asked."""
        if self.source == "continual":
            return self._continual_map(ctx) if needed or self.record_continual else None
        if self.record_continual and ctx.task_index > 0:
            self._continual_map(ctx)  # task 0's continual map is its single-task prior
        return self._single_task_prior(ctx) if needed else None

    def _single_task_prior(self, ctx: StrategyContext) -> Tensors:
        params = ctx.module.trainable_parameters()
        store, key, signature = PriorStore(self._prior_dir(ctx)), self._key(ctx), parameter_signature(params)
        found = store.load(key, signature)
        if found is not None:
            (prior, info), path, reused = found, store.path(key), True
        else:
            prior, info, reused = *self._train_and_score(ctx), False
            path = store.save(key, signature, prior, info)
        self._record(ctx, "single_task", path, info.get("samples_used"), reused)
        if ctx.task_index == 0 and self.record_continual:  # the same model, so the same map
            self._record(ctx, "continual", path, info.get("samples_used"), reused)
        return prior

    def _train_and_score(self, ctx: StrategyContext) -> tuple[Tensors, dict]:
        if ctx.task_index == 0:  # the continual model after task 1 is task 1's single-task model
            return self._score(ctx)
        if ctx.fit is None:
            raise ValueError("attribution: source 'single_task' needs ctx.fit (a side-model trainer)")
        with self._starting_weights(ctx):
            ctx.fit(ctx.task, ctx.task.train)
            return self._score(ctx)

    def _continual_map(self, ctx: StrategyContext) -> Tensors:
        prior, info = self._score(ctx)
        params = ctx.module.trainable_parameters()
        key = PriorKey(self._model_identity(ctx), ctx.task.name, "continual", {"after_task": ctx.task_index})
        store = PriorStore(Path(ctx.run_dir) / "importance" / "continual")  # history-dependent: never shared
        path = store.save(key, parameter_signature(params), prior, info)
        self._record(ctx, "continual", path, info["samples_used"], reused=False)
        return prior

    def _record(self, ctx: StrategyContext, kind: str, path: Path, samples: int | None, reused: bool) -> None:
        entry = {"task": ctx.task.name, "index": ctx.task_index, "kind": kind}
        self.used.append(
            {**entry, "file": str(Path(path).resolve()), "samples_used": samples, "reused": reused}
        )

    def _score(self, ctx: StrategyContext) -> tuple[Tensors, dict]:
        """Score the current model on the task's correctly answered samples."""
        task, params = ctx.task, ctx.module.trainable_parameters()
        candidates = task.train[: self.max_prior_samples]
        correct = self._correct(ctx, candidates)
        if not correct:
            warnings.warn(
                f"attribution: no sample of {task.name} is answered correctly; its prior is zero",
                stacklevel=2,
            )
        estimator = "lrp" if self.estimator == "random" else self.estimator
        if not correct:
            batches = []
        elif estimator in NEEDS_ANSWERS:
            batches = ctx.make_loader(correct, False)
        else:
            batches = ctx.make_prompt_loader(correct)
        prior, n = task_prior(ctx.model, params, batches, estimator, self.top_k)
        return prior, {"samples_used": n, "candidates": len(candidates), "estimator": estimator}

    def _correct(self, ctx: StrategyContext, examples: list) -> list:
        if self.correct_threshold == 0.0 or not examples:
            return list(examples)
        device = next(iter(ctx.module.trainable_parameters().values())).device
        preds = ctx.predict(ctx.task, examples)
        ctx.module.to(device)  # a Trainer's teardown moves the module to the CPU
        refs = [ex.answer.strip() for ex in examples]
        scores = score_predictions(ctx.task.metric, preds, refs, [ex.prompt for ex in examples])
        return [ex for ex, s in zip(examples, scores) if s >= self.correct_threshold]

    @contextmanager
    def _starting_weights(self, ctx: StrategyContext) -> Iterator[None]:
        """Starting weights and the run seed inside; the continual weights and RNG state after."""
        params = ctx.module.trainable_parameters()
        continual = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        try:
            with rng_preserved(ctx.seed):
                _copy_into(params, self.start)
                yield
        finally:
            _copy_into(ctx.module.trainable_parameters(), continual)

    # -- cache key ------------------------------------------------------------------------------
    def _prior_dir(self, ctx: StrategyContext) -> Path:
        return Path(self.prior_dir) if self.prior_dir else Path(ctx.run_dir).parent / "priors"

    def _model_identity(self, ctx: StrategyContext) -> dict:
        model = ctx.model
        peft = getattr(model, "peft_config", None)
        lora = None
        if peft:
            c = next(iter(peft.values()))
            lora = {
                "r": c.r,
                "alpha": c.lora_alpha,
                "dropout": c.lora_dropout,
                "targets": c.target_modules
                if isinstance(c.target_modules, str)
                else sorted(c.target_modules),
            }
        dtype = str(next(iter(ctx.module.trainable_parameters().values())).dtype)
        return {"name": ctx.module.model_name, "lora": lora, "dtype": dtype}

    def _key(self, ctx: StrategyContext) -> PriorKey:
        task = ctx.task
        examples = [[ex.prompt, ex.answer] for ex in task.train]
        limits = [task.max_prompt_tokens, task.max_answer_tokens, task.metric, task.postprocess]
        # token ids of a few prompts: the tokenizer and prompt format, which the context hides
        probe = next(iter(ctx.make_prompt_loader(task.train[:4])))["input_ids"].tolist()
        scoring = {
            "estimator": "lrp" if self.estimator == "random" else self.estimator,
            "top_k": self.top_k,
            "max_prior_samples": self.max_prior_samples,
            "correct_threshold": self.correct_threshold,
            "max_new_tokens": task.max_new_tokens,
        }
        settings = {"training": self._training_settings(ctx), "scoring": scoring, "seed": ctx.seed}
        return PriorKey(self._model_identity(ctx), task.name, digest([examples, limits, probe]), settings)

    def _training_settings(self, ctx: StrategyContext) -> dict:
        """What the single-task model's training depends on, besides model, data and seed."""
        module, trainer = ctx.module, ctx.trainer
        return {
            "lr": module.lr,
            "weight_decay": module.weight_decay,
            "betas": list(module.betas),
            "warmup_steps": module.warmup_steps,
            "schedule": module.schedule,
            "epochs": ctx.task.epochs,
            "max_steps": ctx.task.max_steps,
            "batch_size": ctx.make_loader([], False).batch_size,
            "accumulate_grad_batches": getattr(trainer, "accumulate_grad_batches", None),
            "precision": str(getattr(trainer, "precision", None)),
            "gradient_clip_val": getattr(trainer, "gradient_clip_val", None),
        }

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"rbar.{name}": r for name, r in self.rbar.items()}
        return {**state, "tasks_folded": torch.tensor(self.tasks_folded)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rbar = {k[len("rbar.") :]: v.float() for k, v in state.items() if k.startswith("rbar.")}
        self.tasks_folded = int(state.get("tasks_folded", torch.tensor(0)))
        self._refresh()


def _copy_into(params: Tensors, values: Tensors) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])
