"""Gradient Episodic Memory (GEM) and Averaged GEM (A-GEM): project each step's gradient so that the
loss on no earlier task's episodic memory rises.

Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (NeurIPS); Chaudhry et
al. 2019, "Efficient Lifelong Learning with A-GEM" (ICLR).

Memory: after each task, `memory_per_task` of its training examples (a seeded random subset) join an
episodic memory; nothing else of the task is kept. Each optimizer step of a later task, after all
accumulated backward passes and before clipping and AdamW:

- GEM: g_k, the gradient of the mean answer-token loss on task k's memory, for every earlier task k,
  at the current weights (recomputed every step, as the paper does). If g . g_k >= 0 for every k, g
  stays; else g becomes z = g + G^T v, the solution of the paper's dual QP
  min_v 1/2 v^T G G^T v + g^T G^T v subject to v >= margin (G stacks the g_k). margin = 0 is the
  paper's projection (z is the closest vector to g with G z >= 0); GEM's released code solves it with
  v >= 0.5 (its `memory_strength`) to favour backward transfer, which is the default here. The QP
  has one variable per earlier task; scipy's NNLS solves it exactly.
- A-GEM: one reference gradient g_ref on `memory_batch` examples drawn from the whole memory each step;
  if g . g_ref < 0, g <- g - (g . g_ref / g_ref . g_ref) g_ref.

Where this follows the papers and where TRACE's code does not: g and every g_k are one vector over
every trainable parameter (TRACE projects tensor by tensor, which satisfies no whole-model
constraint), and g_k is recomputed at each step on the memory (TRACE keeps one last-step gradient per
task, stale as soon as the weights move). Differences from the papers: the optimizer is AdamW (the
projected gradient enters its moments), and the gradient is projected before clipping.

Several ranks: the memory batches are the same on every rank (Services.make_loader). Under FSDP2 the
memory gradients are sharded like the parameters and the dot products are sums of shard sums,
all-reduced (one collective per set of dot products), so every rank solves the same QP and projects
its own shards. Under DDP every rank holds the whole averaged gradient and computes the whole memory
gradient itself, so every rank projects identically with no communication.

Cost per step of task t: GEM (t-1) extra forward and backward passes over `memory_batch` examples
each (all of a task's memory when None) and (t-1) fp32 gradient copies held during the step (per
rank: trainable parameters x 4 bytes / world size under FSDP2: 0.54 GB each for the 135M model fully
fine-tuned, 5 GB at 1.2B, 13 GB at 3.2B; LoRA's adapters are megabytes); A-GEM one pass and one copy,
whatever t. Nothing of this outlives the step. RUN_DIR/gem/projections.json (agem/...) counts, per
task, the steps whose gradient was projected.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from scipy.optimize import nnls

from clbench.data.tasks import Example
from clbench.files import write_json
from clbench.gradients import Tensors, add_combination_, dots, gram, mean_loss_grads
from clbench.strategy import (
    CLStrategy,
    StrategyContext,
    examples_json,
    json_examples,
    json_tensor,
    kept_batches,
    tensor_json,
)


def gem_multipliers(gram: np.ndarray, g_dots: np.ndarray, margin: float) -> np.ndarray:
    """v of GEM's dual QP: argmin 1/2 v^T P v + q^T v subject to v >= margin, with P = G G^T (`gram`)
    and q = G g (`g_dots`); the projected gradient is g + G^T v.

    With u = v - margin >= 0 it is min 1/2 u^T P u + c^T u, c = q + P margin, which is the least
    squares ||A u - b||^2 with A^T A = P and A^T b = -c (A from P's eigendecomposition, its null space
    dropped: c lies in P's range, since q = G g and P = G G^T share it), solved exactly by NNLS."""
    gram = 0.5 * (gram + gram.T)
    c = g_dots + gram @ np.full(len(g_dots), margin)
    s, u = np.linalg.eigh(gram)
    keep = s > max(s.max(), 0.0) * 1e-12
    if not keep.any():
        return np.full(len(g_dots), margin)
    root = np.sqrt(s[keep])
    a = root[:, None] * u[:, keep].T
    b = -(u[:, keep].T @ c) / root
    return nnls(a, b)[0] + margin


class GEM(CLStrategy):
    """GEM: each step's gradient projected so that no earlier task's memory loss rises (see the module
    docstring for the QP, its solution and what it costs).

    Args:
        memory_per_task: Training examples of each finished task kept in the episodic memory.
        memory_batch: Memory examples one step's gradient of a task uses (drawn afresh each step);
            None: all of that task's memory, as the paper.
        margin: Lower bound on the dual variables (GEM's `memory_strength`: 0.5 in its code; 0: the
            paper's plain projection).
    """

    record = "gem"

    def __init__(
        self, memory_per_task: int = 16, memory_batch: int | None = None, margin: float = 0.5
    ) -> None:
        if memory_per_task < 1:
            raise ValueError(f"{self.record}.memory_per_task must be >= 1, got {memory_per_task}")
        if memory_batch is not None and memory_batch < 1:
            raise ValueError(f"{self.record}.memory_batch must be >= 1 or None, got {memory_batch}")
        if margin < 0:
            raise ValueError(f"{self.record}.margin must be >= 0, got {margin}")
        self.memory_per_task, self.memory_batch, self.margin = memory_per_task, memory_batch, margin
        self.memory: list[tuple[int, Example]] = []
        self.counts: dict[str, dict[str, int]] = {}  # per task: optimizer steps, and projected ones
        self.rng = random.Random(0)

    def on_task_start(self, ctx: StrategyContext) -> None:
        # seeded per task (a resume restarts at a task's start): the same draws with or without one
        self.rng = random.Random(f"{self.record}-draw-{ctx.seed}-{ctx.task_index}")
        self.counts[ctx.task.name] = {"steps": 0, "projected": 0}

    def on_task_end(self, ctx: StrategyContext) -> None:
        rng = random.Random(f"{self.record}-keep-{ctx.seed}-{ctx.task_index}")
        train = ctx.task.train
        self.memory += [
            (ctx.task_index, ex) for ex in rng.sample(train, min(self.memory_per_task, len(train)))
        ]
        counts = self.counts.get(ctx.task.name, {"steps": 0, "projected": 0})
        rank_zero_info(
            f"clbench: {self.record}: {counts['projected']} of {counts['steps']} steps of {ctx.task.name} "
            f"projected; memory {len(self.memory)} examples ({self.record}/projections.json)"
        )
        if ctx.writes:
            path = Path(ctx.run_dir) / self.record / "projections.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.counts)

    def _draw(self, examples: list[Example]) -> list[Example]:
        if self.memory_batch is None or self.memory_batch >= len(examples):
            return examples
        return self.rng.sample(examples, self.memory_batch)

    def _gradient(self, ctx: StrategyContext, kept: list[tuple[int, Example]], params: Tensors) -> Tensors:
        """The mean-loss gradient over the given memory examples, at the current weights."""
        return mean_loss_grads(ctx.module, kept_batches(ctx, kept), params)

    def references(self, ctx: StrategyContext, params: Tensors) -> list[Tensors]:
        """One memory gradient per earlier task."""
        tasks = sorted({t for t, _ in self.memory})
        return [self._gradient(ctx, self._draw([m for m in self.memory if m[0] == t]), params) for t in tasks]

    def multipliers(self, g_dots: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """The coefficients of the reference gradients added to g (GEM's dual solution)."""
        return gem_multipliers(gram, g_dots, self.margin)

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        counts = self.counts.setdefault(ctx.task.name, {"steps": 0, "projected": 0})
        counts["steps"] += 1
        if not self.memory:
            return
        params = ctx.module.trainable_parameters()
        for p in params.values():
            if p.grad is None:  # a tensor the batch did not reach: its gradient is zero
                p.grad = torch.zeros_like(p)
        refs = self.references(ctx, params)
        grad = {name: p.grad for name, p in params.items()}
        g_dots = dots(grad, refs).cpu().numpy()
        if (g_dots >= 0).all():
            return
        add_combination_(grad, refs, self.multipliers(g_dots, gram(refs).cpu().numpy()).tolist())
        counts["projected"] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"memory": json_tensor({"memory": examples_json(self.memory), "counts": self.counts})}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        doc = tensor_json(state["memory"])
        self.memory, self.counts = json_examples(doc["memory"]), doc["counts"]


class AGEM(GEM):
    """A-GEM: one reference gradient on `memory_batch` examples drawn from the whole memory each step;
    a gradient at an obtuse angle to it loses its component along it.

    Args:
        memory_per_task: Training examples of each finished task kept in the episodic memory.
        memory_batch: Memory examples (of all earlier tasks together) behind each step's reference
            gradient; None: the whole memory.
    """

    record = "agem"

    def __init__(self, memory_per_task: int = 16, memory_batch: int | None = 8) -> None:
        super().__init__(memory_per_task, memory_batch, margin=0.0)

    def references(self, ctx: StrategyContext, params: Tensors) -> list[Tensors]:
        drawn = self._draw(list(range(len(self.memory))))
        return [self._gradient(ctx, [self.memory[i] for i in sorted(drawn)], params)]

    def multipliers(self, g_dots: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """-(g . g_ref) / (g_ref . g_ref): g minus its component along g_ref."""
        return -g_dots / gram[0]
