"""The continual-learning strategy interface (not Lightning's `trainer.strategy`).

A strategy overrides two or three of these hooks. The runner and `CLModule` call them in
this order for each task t of the stream:

    on_task_start(ctx)
    training_examples(ctx, examples)          -> what this task trains on
    per batch:  training_penalty(ctx, batch, outputs) -> added to the loss
    per optimizer step: on_before_optimizer_step(ctx, optimizer)   (grads final, unscaled)
                        on_after_optimizer_step(ctx, optimizer)
    on_task_end(ctx)                           (before the evaluation of row t)

Hooks return what they contribute instead of mutating the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clbench.data.tasks import Example, Task, TaskStream

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from clbench.module import CLModule


@dataclass
class StrategyContext:
    """What a strategy may see: the module, the stream, where it is, and a loader factory.

    `make_loader(examples, shuffle)` batches examples exactly as training does (same
    tokenizer, prompt format, collator and batch size), for Fisher estimates and the like.
    `make_prompt_loader(examples)` batches prompts only (left-padded, no answer), as
    generation sees them. `predict(task, examples)` returns the model's greedy answers,
    post-processed as the evaluator does. `fit(task, examples)` trains `module` on examples
    with a fresh Trainer and the task's epochs, with no strategy hooks and without touching
    the continual optimizer state (for side models such as single-task importance priors).
    """

    module: CLModule
    stream: TaskStream
    task_index: int
    run_dir: Path
    make_loader: Callable[[list[Example], bool], DataLoader]
    seed: int = 0
    trainer: pl.Trainer | None = None
    make_prompt_loader: Callable[[list[Example]], DataLoader] | None = None
    predict: Callable[[Task, list[Example]], list[str]] | None = None
    fit: Callable[[Task, list[Example]], None] | None = None

    @property
    def task(self) -> Task:
        return self.stream.tasks[self.task_index]

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model being trained (a peft model when LoRA is on)."""
        return self.module.model

    @property
    def seen_tasks(self) -> list[Task]:
        """Tasks 0..t, the current one included."""
        return self.stream.tasks[: self.task_index + 1]


class CLStrategy:
    """Base class of continual-learning strategies: every hook is a no-op by default,
    which is exactly naive sequential fine-tuning."""

    def setup(self, ctx: StrategyContext) -> None:
        """Once per run, before the first task (and again after a resume)."""

    def on_task_start(self, ctx: StrategyContext) -> None:
        """Before task t trains."""

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        """The examples task t trains on; replay or multitask add earlier tasks' here."""
        return examples

    def training_penalty(
        self, ctx: StrategyContext, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """A term added to the training loss of this batch (e.g. EWC), or None."""
        return None

    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after all accumulated backward passes, grads unscaled."""

    def on_after_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        """Right after the optimizer stepped (e.g. to gate the update itself)."""

    def on_task_end(self, ctx: StrategyContext) -> None:
        """After task t trained, before the matrix row t is evaluated."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the run (flat name -> tensor, safetensors-ready)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""
