"""Experience replay: keep some training examples of finished tasks and mix them into later tasks.

Rehearsal in the sense of Robins 1995 ("Catastrophic forgetting, rehearsal and pseudorehearsal")
and Chaudhry et al. 2019 ("On Tiny Episodic Memories in Continual Learning", reservoir buffer).
TRACE (Wang et al. 2023, arXiv 2310.06762) keeps `past_task_ratio` = 0.1 of every finished
task's training set; it replays them in a separate pass after each task, whereas here they are
shuffled into the next task's training data (one loop, no extra phase).

The buffer holds (task index, example) pairs; it changes only in `on_task_end`, from the
finished task's own training split (never from replayed examples).
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from clbench.data.tasks import Example
from clbench.strategy import (
    CLStrategy,
    StrategyContext,
    examples_json,
    json_examples,
    json_tensor,
    tensor_json,
)

Entry = tuple[int, Example]
Rng = random.Random


def per_task_quotas(capacity: int, n_tasks: int) -> list[int]:
    """Split `capacity` slots over `n_tasks` as evenly as possible, earlier tasks taking the rest."""
    base, extra = divmod(capacity, n_tasks)
    return [base + (i < extra) for i in range(n_tasks)]


def reservoir_add(buffer: list[Entry], items: list[Entry], capacity: int, seen: int, rng: Rng) -> int:
    """Reservoir sampling (Vitter 1985): every item of the stream stays with equal probability.

    Mutates `buffer` and returns the new count of items seen.
    """
    for item in items:
        if len(buffer) < capacity:
            buffer.append(item)
        else:
            j = rng.randrange(seen + 1)
            if j < capacity:
                buffer[j] = item
        seen += 1
    return seen


def draw(pool: list[Entry], n: int, rng: Rng) -> list[Entry]:
    """n entries of `pool` without replacement, cycling through whole copies when n > len(pool)."""
    whole, rest = divmod(n, len(pool))
    return pool * whole + rng.sample(pool, rest)


class Replay(CLStrategy):
    """Mix a buffer of earlier tasks' training examples into the current task's training data.

    Args:
        past_task_ratio: Fraction of each finished task's training examples kept in the buffer
            (TRACE: 0.1); used when `buffer_size` is None.
        buffer_size: Fixed total buffer size in examples instead of a ratio; filled as `selection` says.
        selection: With `buffer_size`: "per_task" keeps an equal random quota of every finished task
            (rebalanced as tasks arrive); "reservoir" samples the stream of training examples uniformly.
        replay_ratio: Replayed examples per current-task example (0.25: a fifth of each epoch comes
            from the buffer); None mixes in the whole buffer once per task, as TRACE replays it all.
    """

    def __init__(
        self,
        past_task_ratio: float = 0.1,
        buffer_size: int | None = None,
        selection: Literal["per_task", "reservoir"] = "per_task",
        replay_ratio: float | None = None,
    ) -> None:
        if not 0.0 < past_task_ratio <= 1.0:
            raise ValueError(f"replay.past_task_ratio must be in (0, 1], got {past_task_ratio}")
        if buffer_size is not None and buffer_size < 1:
            raise ValueError(f"replay.buffer_size must be a positive number of examples, got {buffer_size}")
        if selection not in ("per_task", "reservoir"):
            raise ValueError(f"replay.selection must be 'per_task' or 'reservoir', got {selection!r}")
        if replay_ratio is not None and replay_ratio <= 0:
            raise ValueError(f"replay.replay_ratio must be positive or None, got {replay_ratio}")
        self.past_task_ratio, self.buffer_size = past_task_ratio, buffer_size
        self.selection, self.replay_ratio = selection, replay_ratio
        self.buffer: list[Entry] = []
        self.seen = 0  # training examples offered to the reservoir so far

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        if not self.buffer:
            return examples
        rng = random.Random(f"replay-draw-{ctx.seed}-{ctx.task_index}")
        n = len(self.buffer) if self.replay_ratio is None else round(self.replay_ratio * len(examples))
        return examples + [ex for _, ex in draw(self.buffer, n, rng)]

    def on_task_end(self, ctx: StrategyContext) -> None:
        t, train = ctx.task_index, ctx.task.train
        rng = random.Random(f"replay-keep-{ctx.seed}-{t}")
        # A shuffled copy: any prefix of it is a random subset, so quotas can shrink by truncation.
        new = [(t, ex) for ex in rng.sample(train, len(train))]
        if self.buffer_size is None:
            self.buffer += new[: max(1, round(self.past_task_ratio * len(train)))]
        elif self.selection == "reservoir":
            self.seen = reservoir_add(self.buffer, new, self.buffer_size, self.seen, rng)
        else:
            self.buffer = self._rebalanced(new)

    def _rebalanced(self, new: list[Entry]) -> list[Entry]:
        by_task: dict[int, list[Entry]] = {}
        for entry in self.buffer + new:
            by_task.setdefault(entry[0], []).append(entry)
        quotas = per_task_quotas(self.buffer_size, len(by_task))
        return [e for quota, task in zip(quotas, sorted(by_task), strict=True) for e in by_task[task][:quota]]

    def buffer_counts(self) -> dict[int, int]:
        """Buffered examples per task index."""
        counts: dict[int, int] = {}
        for t, _ in self.buffer:
            counts[t] = counts.get(t, 0) + 1
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Examples are strings: the buffer travels as the UTF-8 bytes of one JSON document.
        doc = {"seen": self.seen, "buffer": examples_json(self.buffer)}
        return {"buffer": json_tensor(doc)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        doc = tensor_json(state["buffer"])
        self.seen = doc["seen"]
        self.buffer = json_examples(doc["buffer"])
