"""Where attribution's task priors come from: a single-task side model (the paper) or the continual
model, scored on the correctly answered samples, cached on disk under a key of what they depend on.

The strategy (__init__.py) only gates and folds; this is the sourcing, in four parts: `Scorer`
(which samples, which estimator: a model's prior), `Parking` (where the starting weights, the
continual weights and the carried moments wait meanwhile), `PriorCache` (the key, the files, the
cross-process lock) and `PriorSource` (which model is scored when, and used.json's list). See the
strategy's docstring for the semantics (the two savings, the cache key, used.json).

Several ranks: every rank trains the same side model and passes the same samples to task_prior,
which under FSDP2 splits LRP's scoring over the ranks (each scores its share of the samples; the
prior is one process's bit for bit); the prior is laid out like the parameters. Rank 0 decides
whether the cache holds the prior (all ranks then take the same branch) and writes files; the
stored prior is the whole tensor, whatever the world size that made it, and the key holds the
world size and global batch (they change the side model).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clbench import distributed as dist
from clbench.console import say
from clbench.evaluation.metrics import score_predictions
from clbench.files import exclusive
from clbench.module import CLModule, flat_state, nested_state
from clbench.strategy import StrategyContext
from strategies.attribution.importance import (
    NEEDS_ANSWERS,
    PriorKey,
    PriorStore,
    digest,
    magnitude_prior,
    parameter_signature,
    rng_preserved,
    task_prior,
)
from strategies.attribution.offload import Parked, Where, resolve

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Scorer:
    """A model's prior for the current task: up to `max_prior_samples` training examples, those it
    answers with a score >= `correct_threshold`, scored by `estimator` (top-K mean, K `top_k`,
    kept in `prior_dtype`). Estimator "random" scores with LRP (the strategy permutes)."""

    estimator: str
    top_k: int
    max_prior_samples: int | None
    correct_threshold: float
    prior_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimator", "lrp" if self.estimator == "random" else self.estimator)

    def settings(self, task: object) -> dict:
        """What the prior depends on besides model, data and training (part of the cache key)."""
        return {
            "estimator": self.estimator,
            "top_k": self.top_k,
            "prior_dtype": self.prior_dtype,
            "max_prior_samples": self.max_prior_samples,
            "correct_threshold": self.correct_threshold,
            "max_new_tokens": task.max_new_tokens,
        }

    def score(self, ctx: StrategyContext) -> tuple[Tensors, dict]:
        """Score the current model on the task's correctly answered samples."""
        task, params, services = ctx.task, ctx.module.trainable_parameters(), ctx.service()
        start = time.perf_counter()
        if self.estimator == "magnitude":  # looks at no sample: no generation, no scoring pass
            info = {"samples_used": None, "candidates": 0, "estimator": "magnitude"}
            return magnitude_prior(params), {**info, "seconds": {"score": time.perf_counter() - start}}
        candidates = task.train[: self.max_prior_samples]
        correct = self._correct(ctx, candidates)
        filtered = time.perf_counter()
        if not correct:
            warnings.warn(
                f"attribution: no sample of {task.name} is answered correctly; its prior is zero",
                stacklevel=2,
            )
        if not correct:
            batches = []
        elif self.estimator in NEEDS_ANSWERS:
            batches = services.make_loader(correct, False)
        else:
            batches = services.make_prompt_loader(correct)
        store = getattr(torch, self.prior_dtype)
        desc = f"{ctx.task.name}: scoring ({self.estimator})"
        prior, n = task_prior(
            ctx.model, params, batches, self.estimator, self.top_k, store_dtype=store, desc=desc
        )
        seconds = {"filter": filtered - start, "score": time.perf_counter() - filtered}
        info = {"samples_used": n, "candidates": len(candidates), "estimator": self.estimator}
        return prior, {**info, "seconds": seconds}

    def _correct(self, ctx: StrategyContext, examples: list) -> list:
        if self.correct_threshold == 0.0 or not examples:
            return list(examples)
        preds = ctx.service().predict(ctx.task, examples)
        refs = [ex.answer.strip() for ex in examples]
        scores = score_predictions(ctx.task.metric, preds, refs, [ex.prompt for ex in examples])
        return [ex for ex, s in zip(examples, scores) if s >= self.correct_threshold]


@dataclass
class Parking:
    """Where state waits while a prior is computed: `offload` ("memory", "disk" or "auto", by
    the device the parameters live on), this rank's files in RUN_DIR/offload/rank<r>."""

    offload: str = "auto"
    start: Parked | None = field(default=None, init=False)  # this rank's shards of the starting weights

    def where(self, ctx: StrategyContext) -> Where:
        first = next(iter(ctx.module.trainable_parameters().values()), None)
        return resolve(self.offload, dist.local(first).device if first is not None else torch.device("cpu"))

    def folder(self, ctx: StrategyContext) -> Path:
        """This rank's folder of offloaded tensors (offload "disk"), removed by `close`."""
        return Path(ctx.run_dir) / "offload" / f"rank{ctx.rank}"

    def keep_start(self, ctx: StrategyContext) -> None:
        """The start of every single-task model: this rank's shards, kept until `close`."""
        if self.start is None:
            params = ctx.module.trainable_parameters()
            self.start = Parked(params, self.where(ctx), self.folder(ctx) / "start", copy=True)

    @contextmanager
    def starting_weights(self, ctx: StrategyContext) -> Iterator[None]:
        """Starting weights and the run seed inside; the continual weights and RNG state after."""
        params = ctx.module.trainable_parameters()
        continual = Parked(params, self.where(ctx), self.folder(ctx) / "continual", copy=True)
        try:
            with rng_preserved(ctx.seed):
                _copy_into(params, self.start.items())
                yield
        finally:
            _copy_into(ctx.module.trainable_parameters(), continual.items())
            continual.close()

    def moments(self, ctx: StrategyContext) -> contextlib.AbstractContextManager:
        """The continual run's carried moments parked meanwhile."""
        return moments_parked(ctx.module, self.where(ctx), self.folder(ctx) / "moments")

    def close(self, ctx: StrategyContext) -> None:
        """No prior is needed any more: let go of the starting weights (and offloaded files)."""
        if self.start is not None:
            self.start.close()
            self.start = None
        shutil.rmtree(self.folder(ctx), ignore_errors=True)
        with contextlib.suppress(OSError):  # the last rank to finish removes the folder
            self.folder(ctx).parent.rmdir()


@dataclass(frozen=True)
class PriorCache:
    """Single-task priors on disk in `prior_dir` (default: "priors" beside the run folder), keyed by
    model identity, task data and tokenisation, scoring and training settings and the seed."""

    prior_dir: str | None = None

    def store(self, ctx: StrategyContext) -> PriorStore:
        return PriorStore(Path(self.prior_dir) if self.prior_dir else Path(ctx.run_dir).parent / "priors")

    def key(self, ctx: StrategyContext, scorer: Scorer) -> PriorKey:
        task, services = ctx.task, ctx.service()
        examples = [[ex.prompt, ex.answer] for ex in task.train]
        limits = [task.max_prompt_tokens, task.max_answer_tokens, task.metric, task.postprocess]
        # token ids of a few prompts: the tokenizer and prompt format, which the context hides
        probe = next(iter(services.make_prompt_loader(task.train[:4])))["input_ids"].tolist()
        training = asdict(services.training_settings(task))
        settings = {"training": training, "scoring": scorer.settings(task), "seed": ctx.seed}
        return PriorKey(model_identity(ctx), task.name, digest([examples, limits, probe]), settings)

    @staticmethod
    def computing(ctx: StrategyContext, path: Path) -> contextlib.AbstractContextManager:
        """One process computes a given prior at a time: a run that needs the prior another run with
        the same prior_dir is computing (`compare --jobs`) waits for it, then reuses it. Rank 0 holds
        the lock; the other ranks wait at its broadcast, so within the process group's timeout."""
        if not ctx.writes:
            return contextlib.nullcontext()
        return exclusive(
            path.with_name(f"{path.name}.lock"),
            on_wait=lambda: say(f"clbench: waiting for {path.name}: another run is computing it"),
        )


def model_identity(ctx: StrategyContext) -> dict:
    """The model a prior belongs to: its name, LoRA settings and dtype."""
    peft = getattr(ctx.model, "peft_config", None)
    lora = None
    if peft:
        c = next(iter(peft.values()))
        targets = c.target_modules if isinstance(c.target_modules, str) else sorted(c.target_modules)
        lora = {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "targets": targets}
    dtype = str(next(iter(ctx.module.trainable_parameters().values())).dtype)
    return {"name": ctx.module.model_name, "lora": lora, "dtype": dtype}


def save_prior(
    ctx: StrategyContext, store: PriorStore, key: PriorKey, signature: str, prior: Tensors, info: dict
) -> Path:
    """The whole prior to `store` (rank 0 writes; gathering it is a collective: every rank)."""
    whole = {n: dist.full(t) for n, t in prior.items()}
    if ctx.writes:
        store.save(key, signature, whole, info)
    return store.path(key)


class PriorSource:
    """Priors of finished tasks, one per call of `prior(ctx)`: which model is scored ("single_task"
    side model or "continual"), when, and `used`, the list of every map used (used.json)."""

    def __init__(
        self, source: str, record_continual: bool, scorer: Scorer, parking: Parking, cache: PriorCache
    ) -> None:
        self.source, self.record_continual = source, record_continual
        self.scorer, self.parking, self.cache = scorer, parking, cache
        self.used: list[dict] = []

    def setup(self, ctx: StrategyContext) -> None:
        if self.source == "single_task":
            self.parking.keep_start(ctx)

    def prior(self, ctx: StrategyContext, needed: bool) -> Tensors | None:
        """Task t's prior (None when not needed), recording continual maps when asked. Meanwhile the
        continual run's optimizer moments wait where `offload` says."""
        with self.parking.moments(ctx):
            if self.source == "continual":
                return self._continual_map(ctx) if needed or self.record_continual else None
            if self.record_continual and ctx.task_index > 0:
                self._continual_map(ctx)  # task 0's continual map is its single-task prior
            return self._single_task_prior(ctx) if needed else None

    def close(self, ctx: StrategyContext) -> None:
        self.parking.close(ctx)

    def _single_task_prior(self, ctx: StrategyContext) -> Tensors:
        params = ctx.module.trainable_parameters()
        store, key = self.cache.store(ctx), self.cache.key(ctx, self.scorer)
        signature = parameter_signature(params)
        with self.cache.computing(ctx, store.path(key)):
            found = dist.broadcast_object(store.path(key).is_file())  # one branch for every rank
            if found:
                whole, info = store.load(key, signature)
                prior = {
                    n: dist.shard_like(params[n], t) if dist.is_sharded(params[n]) else t
                    for n, t in whole.items()
                }
                path, reused = store.path(key), True
            else:
                prior, info, reused = *self._train_and_score(ctx), False
                path = save_prior(ctx, store, key, signature, prior, info)
        self._record(ctx, "single_task", path, info.get("samples_used"), reused, None if reused else info)
        if ctx.task_index == 0 and self.record_continual:  # the same model, so the same map
            self._record(ctx, "continual", path, info.get("samples_used"), reused)
        return prior

    def _train_and_score(self, ctx: StrategyContext) -> tuple[Tensors, dict]:
        if ctx.task_index == 0:  # the continual model after task 1 is task 1's single-task model
            return self.scorer.score(ctx)
        with self.parking.starting_weights(ctx):
            start = time.perf_counter()
            ctx.service().side_fit(ctx.task, ctx.task.train)
            side_fit_s = time.perf_counter() - start
            prior, info = self.scorer.score(ctx)
        return prior, {**info, "seconds": {"side_fit": side_fit_s, **info["seconds"]}}

    def _continual_map(self, ctx: StrategyContext) -> Tensors:
        prior, info = self.scorer.score(ctx)
        params = ctx.module.trainable_parameters()
        key = PriorKey(model_identity(ctx), ctx.task.name, "continual", {"after_task": ctx.task_index})
        store = PriorStore(Path(ctx.run_dir) / "importance" / "continual")  # history-dependent: never shared
        path = save_prior(ctx, store, key, parameter_signature(params), prior, info)
        self._record(ctx, "continual", path, info["samples_used"], reused=False, info=info)
        return prior

    def _record(
        self,
        ctx: StrategyContext,
        kind: str,
        path: Path,
        samples: int | None,
        reused: bool,
        info: dict | None = None,
    ) -> None:
        """One map used; `info` of a map computed here adds where its time went (side training,
        generation for the correct-sample filter, scoring), in seconds."""
        entry = {"task": ctx.task.name, "index": ctx.task_index, "kind": kind}
        entry.update({"file": str(Path(path).resolve()), "samples_used": samples, "reused": reused})
        if info is not None and "seconds" in info:
            entry["seconds"] = {k: round(v, 3) for k, v in info["seconds"].items()}
        self.used.append(entry)


def _copy_into(params: Tensors, values: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each (name, value) (this rank's shard) into its parameter's local tensor; every
    parameter must get one."""
    done = set()
    with torch.no_grad():
        for name, value in values:
            dist.local(params[name]).copy_(dist.local(value))
            done.add(name)
    if done != set(params):
        raise RuntimeError(f"attribution: no stored value for {sorted(set(params) - done)[:3]}")


@contextmanager
def moments_parked(module: CLModule, where: Where, folder: Path) -> Iterator[None]:
    """The module's carried AdamW moments out of the way inside (host memory or disk: offload.py),
    back where they were after: a prior's side computations need the memory, not the moments."""
    flat = flat_state(module.carried_optimizer_state)
    module.carried_optimizer_state = {}
    kept = {key: v for key, v in flat.items() if not torch.is_tensor(v)}
    parked = Parked({k: v for k, v in flat.items() if torch.is_tensor(v)}, where, folder, copy=False)
    del flat  # the moments' last references: they are freed here
    try:
        yield
    finally:
        module.carried_optimizer_state = nested_state({**dict(parked.items()), **kept})
        parked.close()
