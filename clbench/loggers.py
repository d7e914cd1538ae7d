"""Where a run's metrics go: the logger the user configures with `--trainer.logger` (any Lightning
logger: CSV, W&B, MLflow, TensorBoard), or, left unset, TensorBoard in the run folder laid out
one version per task plus "scores".

Every task trains with a fresh Trainer whose steps count from 0, and Lightning finalizes a
Trainer's logger when its fit ends. A user's logger sees one run instead: `TaskView` adds the
steps of the tasks before to each step (so "train/loss" is one curve over the whole stream and
step numbers only grow, as W&B requires) and defers finalize to the run's end. The per-row scores
and the summary go to the same logger, at the run's step count when they were measured.
"""

from __future__ import annotations

import importlib
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger


def lightning_loggers() -> list[str]:
    """The loggers Lightning ships, by the names `--trainer.logger` takes."""
    from lightning.pytorch import loggers

    return sorted(name for name in loggers.__all__ if name != "Logger")


def logger_class(name: str) -> type[Logger] | None:
    """The Logger class `--trainer.logger NAME` means (one of Lightning's by name, or a dotted path),
    None when there is none."""
    path = name if "." in name else f"lightning.pytorch.loggers.{name}"
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Logger) else None


class TaskView(Logger):
    """One task's view of the run's logger: steps offset by the earlier tasks', no finalize."""

    def __init__(self, inner: Logger, offset: int) -> None:
        super().__init__()
        self.inner, self.offset = inner, offset

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def log_dir(self) -> str | None:
        return getattr(self.inner, "log_dir", None)

    @property
    def experiment(self) -> Any:
        return self.inner.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, None if step is None else step + self.offset)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self.inner.log_hyperparams(params, *args, **kwargs)

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.save()  # the run, not this task, ends the logger (RunLoggers.finalize)


class RunLoggers:
    """The loggers of one run. `user`: what `--trainer.logger` instantiated (a logger or a list of
    them), None for the default TensorBoard layout, False for no logging at all."""

    def __init__(self, run_dir: Path, user: Logger | list[Logger] | bool | None) -> None:
        self.run_dir = run_dir
        self.user: list[Logger] | None = None
        self.enabled = user is not False and user != []  # Lightning reads [] as no logger too
        if isinstance(user, Logger):
            self.user = [user]
        elif isinstance(user, list) and user:
            self.user = list(user)

    def for_task(self, t: int, name: str, offset: int) -> list[Logger] | bool:
        """The Trainer's `logger` for task t, whose first step is the run's step `offset`."""
        if not self.enabled:
            return False
        if self.user is None:
            return [TensorBoardLogger(str(self.run_dir), name="tensorboard", version=f"task{t + 1}-{name}")]
        return [TaskView(logger, offset) for logger in self.user]

    def log(self, metrics: dict[str, float], row: int | None, steps: int) -> None:
        """Scores or the summary, outside any Trainer (rank 0 only: the caller writes): at `steps`,
        the run's optimizer steps so far, on a user's logger; at `row` in TensorBoard's "scores"."""
        if not self.enabled or not metrics:
            return
        if self.user is None:
            logger = TensorBoardLogger(str(self.run_dir), name="tensorboard", version="scores")
            logger.log_metrics(metrics, step=row)
            logger.finalize("success")
            return
        for logger in self.user:
            logger.log_metrics(metrics, step=steps)
            logger.save()

    def finalize(self, status: str) -> None:
        for logger in self.user or []:
            logger.finalize(status)
