"""Multitask (joint incremental) training: at task t, train on tasks 0..t together.

Not a continual-learning method but its reference point: the "MTL" upper bound of TRACE (Wang et
al. 2023, arXiv 2310.06762) and the joint-training baseline of most CL surveys (e.g. Wu et al.
2024, "Continual Learning for Large Language Models: A Survey"). Training again on all data seen
so far removes the continual constraint, so forgetting comes only from capacity and interference.
Each task trains with its own epochs / max_steps over the union, so later tasks cost more.
"""

from __future__ import annotations

import random

from clbench.data.tasks import Example
from clbench.strategy import CLStrategy, StrategyContext


def capped(examples: list[Example], cap: int | None, rng: random.Random) -> list[Example]:
    """At most `cap` examples, a seeded random subset when cutting."""
    if cap is None or len(examples) <= cap:
        return list(examples)
    return rng.sample(examples, cap)


class Multitask(CLStrategy):
    """Train every task on the union of the training examples of all tasks seen so far.

    Args:
        max_per_task: Cap on the examples each seen task contributes (a seeded, fixed subset per
            task); None takes every example. The current task is capped too.
    """

    def __init__(self, max_per_task: int | None = None) -> None:
        if max_per_task is not None and max_per_task < 1:
            raise ValueError(f"multitask.max_per_task must be a positive count or None, got {max_per_task}")
        self.max_per_task = max_per_task

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        union: list[Example] = []
        for i, task in enumerate(ctx.seen_tasks):
            # The current task's examples come from the runner (they may be filtered); earlier ones from
            # the stream. One seed per task index keeps each task's subset the same at every later task.
            source = examples if i == ctx.task_index else task.train
            union += capped(source, self.max_per_task, random.Random(f"multitask-{ctx.seed}-{i}"))
        return union
