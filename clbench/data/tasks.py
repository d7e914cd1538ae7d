"""Tasks and task streams: the data a continual-learning run walks through, in order."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction example; the loss covers `answer` (plus EOS), never `prompt`."""

    prompt: str
    answer: str


@dataclass
class Task:
    """A named task with its splits, how it is scored and how long its texts may be.

    `labels` is set for classification tasks (the closed answer set); reports then show
    the share of predictions that are a valid label and the majority-class baseline.
    `source` names where the task was read from, for error messages.
    """

    name: str
    train: list[Example]
    test: list[Example]
    eval: list[Example] = field(default_factory=list)
    metric: str = "exact_match"
    epochs: int = 1
    max_steps: int = -1
    max_prompt_tokens: int = 1024
    max_answer_tokens: int = 512
    max_new_tokens: int = 64
    postprocess: str = "strip"
    labels: list[str] | None = None
    source: str = ""

    def majority_baseline(self) -> float | None:
        """Accuracy of always answering the most common training label (classification only)."""
        if not self.labels or not self.test:
            return None
        counts: dict[str, int] = {}
        for ex in self.train:
            counts[ex.answer.strip()] = counts.get(ex.answer.strip(), 0) + 1
        top = max(counts, key=counts.get)
        return sum(ex.answer.strip() == top for ex in self.test) / len(self.test)


@dataclass
class TaskStream:
    """Ordered tasks; position t in `tasks` is task t + 1 of the accuracy matrix."""

    name: str
    tasks: list[Task]
    score_split: str = "test"  # the split each task's `test` holds: "eval" when choosing settings

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]
