"""Model merging at each task's end: the weights task t leaves, theta', are merged with where the task
started (theta_prev) or with the starting model theta_0, and the merge is written back into the model
before row t is evaluated (the runner calls `on_task_end` first). Training itself is sequential
fine-tuning: no hook touches a step. (Attribution merging, theta_prev + (1 - Rbar)(theta' -
theta_prev), lives with attribution's priors: strategies/attribution/merge.py.)

    linear_merge  theta <- theta_prev + alpha (theta' - theta_prev)         (torch.lerp: exact at 0, 1)
    ties          TIES-Merging (Yadav et al. 2023, NeurIPS, arXiv 2306.01708) of the task vectors
                  tau_i = theta'_i - theta_0 of every task so far: each trimmed to its largest
                  magnitudes over the whole model (top_k), a sign elected per element (the sign of the
                  sum of the trimmed vectors), the mean of the trimmed entries of that sign:
                  theta <- theta_0 + scale * mean
    magmax        MagMax (Marczak et al. 2024, ECCV, arXiv 2407.06322): per element the task vector
                  tau_i = theta'_i - theta_0 of largest magnitude over the tasks so far:
                  theta <- theta_0 + scale * that
    fisher_merge  Fisher merging (Matena & Raffel 2022, NeurIPS, arXiv 2111.09832), one task at a time:
                  theta <- (F_acc theta_prev + F~_t theta') / (F_acc + F~_t),  F_acc <- F_acc + F_t
                  (F~_t = max(F_t, fisher_floor): the new task's term alone is floored)

Where the next task starts: from the merged model (the reading of issue 37: the merge is what the next
task starts from and what is evaluated), for every method. TIES and MagMax also offer
`start_from="finetuned"`: the merge is evaluated and checkpointed, and the next task trains on from
theta' (the MagMax paper's "sequential fine-tuning, then merging"; its code merges TIES from the same
sequentially fine-tuned vectors). That is MagMax's default, since the paper's method is that pair.

Readings, from each paper's code where the paper leaves a choice open:
- TIES (ties-merging's topk_values_mask, resolve_sign, disjoint_merge): the trim keeps the elements
  whose magnitude is >= the (floor(top_k n) + 1)-th largest of the task vector's n elements over the
  whole model (the reference's kthvalue at n - floor(top_k n): floor(top_k n) + 1 elements where no
  two magnitudes tie; top_k 1 keeps all); where the sum of the trimmed vectors is 0 the elected sign
  is the sign of the sum of all elected signs ("majority"); the merge of an element is the mean of
  its trimmed entries of the elected sign, 0 where there is none (an elected sign of 0 takes the
  negative ones, as the reference does). scale (lambda) 1: the paper's value without a validation set.
  Folded: the sign needs only the sum of the trimmed vectors and the mean only the sums and counts of
  the positive and of the negative entries, so TIES keeps those four per element, never the t trimmed
  vectors. Exact in exact arithmetic; in floating point the sum that elects the sign is (positive
  sum) + (negative sum) instead of the sum in task order, the same but for its last bits, so only an
  element whose total is within rounding of 0 could elect otherwise. The threshold is an exact k-th
  value (`kth_largest`): under FSDP2 each rank counts its shards and the counts are summed, so two
  ranks trim exactly what one process trims, without a gathered copy of the model.
- MagMax (its code's merge_max_abs): an element takes the newer task vector where its magnitude is >=
  the kept one's (ties go to the later task); one running vector holds the fold. scale 0.5: the value
  its code merges with.
- Fisher merging: F_t is the diagonal EMPIRICAL Fisher of task t on its own training data at theta'
  (clbench.gradients.empirical_fisher, EWC's estimator: the squared gradients of the gold labels'
  loss; per example by default, as the paper's per-example Fisher; no earlier task's data is kept).
  The paper's code (mmatena/model_merging) takes the model's Fisher instead, the expectation over the
  model's own predicted distribution of the squared gradients, not the gold labels'. F_t is divided
  by its whole-model L2 norm (the paper's code's `normalize_fishers`, on there by default: every task
  weighs the same whatever its Fisher's scale). The floor `fisher_floor` (the code's 1e-6, which its
  `favor_target_model` puts on the target model's Fisher only) goes on the new task's term only:
  theta <- (F_acc theta_prev + max(F_t, floor) theta') / (F_acc + max(F_t, floor)), and F_acc adds
  the unfloored F_t, so an element no Fisher sees takes theta' and the denominator is never 0.
  Unrolled, the fold is the paper's all-at-once merge of every task's fine-tuned model,
  theta_t = sum_i F_i theta'_i / sum_i F_i with F_i the normalised Fishers, but where the floor
  counts: where every Fisher so far is 0 the newest theta' is taken, as the paper's code takes the
  target model's.

What each keeps, per rank (its shards under FSDP2), for n trainable elements ("a copy": n in the
parameters' dtype), and what a task's end costs (seconds: one CPU thread, 134.5M fp32 elements, the
size of SmolLM2-135M, on a machine shared with other runs):
- linear_merge: theta_prev, a copy, during the task only; nothing between tasks. One elementwise
  pass (0.2 s).
- ties: theta_0 (a copy), the positive and negative sums (8n bytes) and counts (2n bytes, uint8: at
  most 255 tasks), and with start_from "finetuned" theta' until the next task starts (a copy). Two
  passes over the task vector for the threshold (a 65536-bin histogram each, all-reduced under
  FSDP2), one to fold it, one to write the merge and one for the record's distance, and an
  all-reduce of three counts (9 s; 23 s at the first task, which allocates the sums).
- magmax: theta_0 (a copy) and the running vector (4n bytes), and theta' as TIES does. One pass to
  fold and write, one for the distance (3-4 s).
- fisher_merge: F_acc (4n bytes), and theta_prev during the task (a copy). The Fisher's backward
  passes (`fisher_batches` batches, or one pass per example with `per_sample`: what dominates), one
  all-reduced norm and one elementwise pass (4 s).
theta_0 is not in the strategy's state: `setup` copies it on a resume too, before the runner restores
the weights, from the same starting model (attribution keeps its single-task start the same way).

The optimizer: the next task's AdamW starts from the moments the previous task left
(`model.keep_optimizer_state`, as for every strategy), now at the merged weights; with it off, from
zero moments. With LoRA only the adapters train, so the merges act on the adapter tensors, A and B
elementwise (not on their product). RUN_DIR/merge/<strategy>.json records, per task, what TIES
trimmed (the threshold, the elements kept, those with kept entries of both signs so far), how much
of MagMax's vector the task replaced, how far either merge is from theta_0 (L2), and the Fisher's
norm, floored share and the mean weight F~_t / (F_acc + F~_t) the new task got.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from clbench.distributed import all_reduce_, is_sharded, local
from clbench.errors import ConfigError
from clbench.files import write_json
from clbench.gradients import empirical_fisher
from clbench.strategy import CLStrategy, StrategyContext

Tensors = dict[str, Tensor]
BINS = 1 << 16  # kth_largest's histogram: 16 bits of an fp32 pattern per pass
TRIMMED = {
    "pos": torch.float32,
    "neg": torch.float32,
    "n_pos": torch.uint8,
    "n_neg": torch.uint8,
}  # TIES's fold


# -- the rules, on plain tensors (a rank's shards) ------------------------------------------------
def kth_largest(values: Callable[[], Iterator[Tensor]], k: int, device: torch.device, sharded: bool) -> float:
    """The k-th largest (1: the largest) of all the non-negative fp32 values that `values()` yields,
    exactly. A radix select on the bit patterns, which order non-negative floats as their values do:
    the top 16 bits first, then the low 16 among the values in the chosen top bucket, one histogram
    each (`values()` is called twice). `sharded`: each rank yields its shards and the histograms are
    summed over the ranks (every rank must call it), which gives one process's value bit for bit."""
    prefix = 0
    for shift in (16, 0):
        hist = torch.zeros(BINS, dtype=torch.int64, device=device)
        for v in values():
            bits = v.reshape(-1).view(torch.int32)
            if shift == 0:
                bits = bits[(bits >> 16) == prefix]
            hist += torch.bincount((bits >> shift) & (BINS - 1), minlength=BINS)
        if sharded:
            all_reduce_(hist)
        at_least = hist.flip(0).cumsum(0)  # at_least[j]: how many have a key >= BINS - 1 - j
        j = int((at_least < k).sum())  # the first bucket from the top that reaches k
        bucket = BINS - 1 - j
        k -= int(at_least[j] - hist[bucket])  # those in buckets above it
        prefix = (prefix << 16) | bucket
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item()


def ties_fold_(
    sums: tuple[Tensor, Tensor], counts: tuple[Tensor, Tensor], tau: Tensor, threshold: float
) -> int:
    """Task vector `tau` trimmed at `threshold` (|tau| >= threshold kept) into the running (positive,
    negative) sums and counts, in place; returns how many elements the trim kept."""
    kept = tau.abs() >= threshold
    for total, count, side in zip(sums, counts, (kept & (tau > 0), kept & (tau < 0)), strict=True):
        total.add_(torch.where(side, tau, 0.0))
        count.add_(side)
    return int(kept.sum())


def ties_mean(sums: tuple[Tensor, Tensor], counts: tuple[Tensor, Tensor], majority: float) -> Tensor:
    """TIES's disjoint mean per element: the mean of the trimmed entries of the elected sign (the sign
    of their sum; `majority` where that is 0), 0 where there is none."""
    (pos, neg), (n_pos, n_neg) = sums, counts
    total = pos + neg
    sign = torch.where(total == 0, majority, total.sign())
    return torch.where(sign > 0, pos / n_pos.clamp(min=1), neg / n_neg.clamp(min=1))


def magmax_fold_(kept: Tensor, tau: Tensor) -> int:
    """kept <- tau where |tau| >= |kept|, in place; returns how many elements took tau."""
    take = tau.abs() >= kept.abs()
    torch.where(take, tau, kept, out=kept)
    return int(take.sum())


def fisher_merge_(theta: Tensor, prev: Tensor, f_acc: Tensor, f_new: Tensor) -> None:
    """theta <- (f_acc prev + f_new theta) / (f_acc + f_new), in place, computed in fp32."""
    theta.copy_((f_acc * prev.float() + f_new * theta.float()) / (f_acc + f_new))


# -- what the strategies share ---------------------------------------------------------------------
def snapshot(params: Tensors) -> Tensors:
    """A copy of every parameter; of a sharded one, this rank's shards in the same layout."""
    return {name: p.detach().clone() for name, p in params.items()}


def placed(state: Tensors, params: Tensors) -> Tensors:
    """`state` where its parameters are (a resume loads on the CPU); no copy where it is already."""
    return {name: t.to(params[name].device) for name, t in state.items()}


def prefixed(prefix: str, tensors: Tensors) -> Tensors:
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def unprefixed(prefix: str, state: Tensors) -> Tensors:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}.")}


def whole_sum(total: Tensor, params: Tensors) -> Tensor:
    """A sum over this rank's shards summed over the ranks (a collective when the parameters are
    sharded; under DDP and in one process every rank holds the whole already)."""
    return all_reduce_(total) if any(is_sharded(p) for p in params.values()) else total


class MergeRecord:
    """RUN_DIR/merge/<file>: one entry per task (rank 0 writes; a resumed run reads the earlier ones)."""

    def __init__(self, file: str) -> None:
        self.file, self.entries = file, {}

    def add(self, ctx: StrategyContext, entry: dict) -> None:
        path = Path(ctx.run_dir) / "merge" / self.file
        if not self.entries and path.is_file():
            self.entries = json.loads(path.read_text())
        self.entries[ctx.task.name] = entry
        if ctx.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.entries)


# -- the strategies ---------------------------------------------------------------------------------
class LinearMerge(CLStrategy):
    """theta <- theta_prev + alpha (theta' - theta_prev) at each task's end.

    Args:
        alpha: The share of each task's change kept (1: sequential fine-tuning, 0: nothing learnt).
    """

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"linear_merge.alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.prev: Tensors = {}

    def on_task_start(self, ctx: StrategyContext) -> None:
        self.prev = snapshot(ctx.module.trainable_parameters())

    @torch.no_grad()
    def on_task_end(self, ctx: StrategyContext) -> None:
        params = ctx.module.trainable_parameters()
        for name, prev in placed(self.prev, params).items():
            theta = local(params[name])
            torch.lerp(local(prev), theta, self.alpha, out=theta)
        self.prev = {}


class _TaskVectorMerge(CLStrategy):
    """What TIES and MagMax share: theta_0, task vectors tau = theta' - theta_0, theta <- theta_0 +
    scale * merged vector, and where the next task starts."""

    def __init__(self, scale: float, start_from: str, name: str) -> None:
        if scale <= 0:
            raise ValueError(f"{name}.scale must be > 0, got {scale}")
        if start_from not in ("merged", "finetuned"):
            raise ValueError(f"{name}.start_from must be one of merged, finetuned; got {start_from!r}")
        self.scale, self.start_from = scale, start_from
        self.theta0: Tensors = {}
        self.finetuned: Tensors = {}  # theta' until the next task starts from it (start_from "finetuned")
        self.record = MergeRecord(f"{name}.json")

    def setup(self, ctx: StrategyContext) -> None:
        # once per run, before a resume restores the weights: the starting model's, on a resume too
        self.theta0 = snapshot(ctx.module.trainable_parameters())

    @torch.no_grad()
    def on_task_start(self, ctx: StrategyContext) -> None:
        if self.finetuned:
            params = ctx.module.trainable_parameters()
            for name, theta in self.finetuned.items():
                local(params[name]).copy_(local(theta))
            self.finetuned = {}

    @torch.no_grad()
    def on_task_end(self, ctx: StrategyContext) -> None:
        params = ctx.module.trainable_parameters()
        self.theta0 = placed(self.theta0, params)
        if self.start_from == "finetuned":
            self.finetuned = snapshot(params)
        entry = self.merge(params)
        squares = sum((self.task_vector(params, name).double() ** 2).sum() for name in params)
        self.record.add(ctx, {**entry, "distance": whole_sum(squares, params).sqrt().float().item()})

    def merge(self, params: Tensors) -> dict:
        """Fold this task's vector in, write the merge into `params`; what the record keeps."""
        raise NotImplementedError

    def task_vector(self, params: Tensors, name: str) -> Tensor:
        """This rank's part of tau = theta' - theta_0 for one tensor, fp32."""
        return local(params[name]).float() - local(self.theta0[name]).float()

    def write(self, params: Tensors, name: str, vector: Tensor) -> None:
        """theta <- theta_0 + scale * vector (this rank's part)."""
        local(params[name]).copy_(torch.add(local(self.theta0[name]).float(), vector, alpha=self.scale))

    def state_dict(self) -> Tensors:
        return prefixed("finetuned", self.finetuned)

    def load_state_dict(self, state: Tensors) -> None:
        self.finetuned = unprefixed("finetuned", state)


class TIES(_TaskVectorMerge):
    """TIES-Merging of every task's vector so far (trim, elect sign, disjoint mean), at each task's end.

    Args:
        top_k: The share of each task vector's elements the trim keeps, by magnitude over the whole model
            (the paper's k: 0.2).
        scale: lambda, the merged vector's scale (the paper's 1 without a validation set).
        start_from: Where the next task trains from: the merged model ("merged") or the task's own
            fine-tuned weights ("finetuned", sequential fine-tuning; the merge is only evaluated).
    """

    def __init__(
        self, top_k: float = 0.2, scale: float = 1.0, start_from: Literal["merged", "finetuned"] = "merged"
    ) -> None:
        if not 0.0 < top_k <= 1.0:
            raise ValueError(f"ties.top_k must be in (0, 1], got {top_k}")
        super().__init__(scale, start_from, "ties")
        self.top_k = top_k
        # per element: the sums of the positive and of the negative trimmed entries, and their counts
        self.trimmed: dict[str, Tensors] = {part: {} for part in TRIMMED}

    def setup(self, ctx: StrategyContext) -> None:
        if len(ctx.stream) > 255:
            raise ConfigError(
                f"strategy ties counts at most 255 tasks (uint8); the stream has {len(ctx.stream)}"
            )
        super().setup(ctx)

    def merge(self, params: Tensors) -> dict:
        for part, dtype in TRIMMED.items():
            fold = self.trimmed[part] or {n: torch.zeros_like(p, dtype=dtype) for n, p in params.items()}
            self.trimmed[part] = placed(fold, params)
        sharded = any(is_sharded(p) for p in params.values())
        device = local(next(iter(params.values()))).device
        n = sum(p.numel() for p in params.values())  # a sharded tensor's numel is the whole tensor's
        magnitudes = lambda: (self.task_vector(params, name).abs() for name in params)  # noqa: E731
        threshold = kth_largest(magnitudes, min(int(n * self.top_k) + 1, n), device, sharded)
        # elements kept from this task; with trimmed entries of both signs so far; the sum of signs
        counts = torch.zeros(3, dtype=torch.float64, device=device)
        for name in params:
            sums, (n_pos, n_neg) = self._local(name)
            counts[0] += ties_fold_(sums, (n_pos, n_neg), self.task_vector(params, name), threshold)
            counts[1] += ((n_pos > 0) & (n_neg > 0)).sum()
            counts[2] += (sums[0] + sums[1]).sign().sum(dtype=torch.float64)
        kept, conflicts, signs = whole_sum(counts, params).tolist()
        majority = 1.0 if signs > 0 else -1.0 if signs < 0 else 0.0
        for name in params:
            self.write(params, name, ties_mean(*self._local(name), majority))
        return {"elements": n, "kept": int(kept), "threshold": threshold, "conflicts": int(conflicts)}

    def _local(self, name: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """This rank's (positive, negative) sums and (positive, negative) counts of one tensor."""
        pos, neg, n_pos, n_neg = (local(self.trimmed[part][name]) for part in TRIMMED)
        return (pos, neg), (n_pos, n_neg)

    def state_dict(self) -> Tensors:
        trimmed = {k: v for part, kept in self.trimmed.items() for k, v in prefixed(part, kept).items()}
        return {**super().state_dict(), **trimmed}

    def load_state_dict(self, state: Tensors) -> None:
        super().load_state_dict(state)
        self.trimmed = {part: unprefixed(part, state) for part in TRIMMED}


class MagMax(_TaskVectorMerge):
    """MagMax: per element the task vector of largest magnitude so far, added to the starting model.

    Args:
        scale: The chosen vector's scale (MagMax's code: 0.5).
        start_from: Where the next task trains from: the task's own fine-tuned weights ("finetuned",
            the paper's sequential fine-tuning; the merge is only evaluated) or the merged model
            ("merged").
    """

    def __init__(self, scale: float = 0.5, start_from: Literal["merged", "finetuned"] = "finetuned") -> None:
        super().__init__(scale, start_from, "magmax")
        self.vector: Tensors = {}  # the running max-magnitude task vector, fp32

    def merge(self, params: Tensors) -> dict:
        if not self.vector:  # zeros: the first task's vector replaces every element
            self.vector = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.vector = placed(self.vector, params)
        replaced = 0
        for name in params:
            replaced += magmax_fold_(local(self.vector[name]), self.task_vector(params, name))
            self.write(params, name, local(self.vector[name]))
        device = local(next(iter(params.values()))).device
        replaced = int(whole_sum(torch.tensor(replaced, device=device), params))
        return {"elements": sum(p.numel() for p in params.values()), "replaced": replaced}

    def state_dict(self) -> Tensors:
        return {**super().state_dict(), **prefixed("vector", self.vector)}

    def load_state_dict(self, state: Tensors) -> None:
        super().load_state_dict(state)
        self.vector = unprefixed("vector", state)


class FisherMerge(CLStrategy):
    """Fisher merging, one task at a time: theta <- (F_acc theta_prev + F~_t theta') / (F_acc + F~_t)
    with F~_t = max(F_t, fisher_floor), then F_acc <- F_acc + F_t (F_t: the empirical Fisher).

    Args:
        fisher_batches: Training batches of the finished task its Fisher is averaged over; None: all.
        per_sample: Square each example's gradient (the paper's per-example Fisher) instead of each batch's.
        normalize: Divide each task's Fisher by its whole-model L2 norm (the paper's code's default), so
            every task weighs the same.
        fisher_floor: The least Fisher value of the new task's term in its merge (the paper's code:
            1e-6, on the target model's Fisher); F_acc keeps the unfloored Fishers.
    """

    def __init__(
        self,
        fisher_batches: int | None = 64,
        per_sample: bool = True,
        normalize: bool = True,
        fisher_floor: float = 1e-6,
    ) -> None:
        if fisher_batches is not None and fisher_batches < 1:
            raise ValueError(
                f"fisher_merge.fisher_batches must be a positive count or None, got {fisher_batches}"
            )
        if not fisher_floor > 0:
            raise ValueError(f"fisher_merge.fisher_floor must be > 0, got {fisher_floor}")
        self.fisher_batches, self.per_sample = fisher_batches, per_sample
        self.normalize, self.fisher_floor = normalize, fisher_floor
        self.fisher: Tensors = {}  # F_acc, the sum of the earlier tasks' normalised Fishers (unfloored)
        self.prev: Tensors = {}
        self.record = MergeRecord("fisher_merge.json")

    def on_task_start(self, ctx: StrategyContext) -> None:
        self.prev = snapshot(ctx.module.trainable_parameters())

    def on_task_end(self, ctx: StrategyContext) -> None:
        params = ctx.module.trainable_parameters()
        fisher = empirical_fisher(ctx, params, self.fisher_batches, self.per_sample)
        self.record.add(ctx, self.merge(params, fisher))

    @torch.no_grad()
    def merge(self, params: Tensors, fisher: Tensors) -> dict:
        """Fold this task's Fisher `fisher` (at theta', laid out like `params`; normalised here, in
        place; floored in its own term of the merge only) and merge the model; what the record keeps."""
        # exact squares summed in fp64, whose order (the sharding) barely shows, and the norm rounded
        # to fp32: one process's on every rank
        squares = sum(local(f).double().square().sum() for f in fisher.values())
        norm = whole_sum(squares, params).sqrt().float()
        totals = torch.zeros(2, dtype=torch.float64, device=squares.device)  # floored; F_t / (F_acc + F_t)
        self.fisher, prev = placed(self.fisher, params), placed(self.prev, params)
        for name, f in fisher.items():
            new = local(f)
            if self.normalize and norm > 0:
                new.div_(norm)
            totals[0] += (new < self.fisher_floor).sum()
            if name in self.fisher:
                acc, floored = local(self.fisher[name]), new.clamp(min=self.fisher_floor)
                fisher_merge_(local(params[name]), local(prev[name]), acc, floored)
                totals[1] += (floored / (acc + floored)).sum(dtype=torch.float64)
                acc.add_(new)
            else:  # the first task: nothing to merge with, theta' is kept whole
                self.fisher[name] = f
                totals[1] += new.numel()
        self.prev = {}
        n = sum(p.numel() for p in params.values())
        floored, weight = whole_sum(totals, params).tolist()
        return {"fisher_norm": norm.item(), "floored_share": floored / n, "new_weight_mean": weight / n}

    def state_dict(self) -> Tensors:
        return prefixed("fisher", self.fisher)

    def load_state_dict(self, state: Tensors) -> None:
        self.fisher = unprefixed("fisher", state)
