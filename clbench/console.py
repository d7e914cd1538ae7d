"""What a person sees while a run goes: clbench's own lines and progress bars (training, and every
other long phase: evaluation, side training, scoring, generation) on the console; Lightning's banners
(accelerator, precision, tips), framework warnings and logs go to RUN_DIR/run.log, beside clbench's
lines, so nothing is lost and the console stays readable."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clbench import distributed as dist

LOG = logging.getLogger("clbench")
BARS = {"on": True}  # off with the run's trainer.enable_progress_bar false (show_bars)
QUIET = ("lightning.pytorch", "lightning.fabric", "py.warnings", "lm_eval")  # loggers sent to the run log


def say(message: str) -> None:
    """One clbench line: on the console (rank 0) and in the run log."""
    if dist.rank() == 0:
        print(message, flush=True)
    LOG.info(message)


def show_bars(on: bool) -> None:
    """clbench's own progress bars follow the Trainer's: `trainer.enable_progress_bar false` turns
    off every bar."""
    BARS["on"] = on


@contextmanager
def progress(desc: str | None, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A bar like Lightning's training bar (tqdm, stderr, rank 0 only) for a phase that would
    otherwise be silent for minutes; yields `advance(n)`. It leaves no line behind on a terminal:
    the phase's result line (`say`) follows it."""
    from tqdm.auto import tqdm

    hidden = desc is None or not BARS["on"] or dist.rank() != 0  # no description: no bar
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=hidden)
    try:
        yield bar.update
    finally:
        bar.refresh()  # the last count, whatever tqdm's update interval skipped
        bar.close()


@contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Inside: Lightning's loggers and Python warnings write to `path` only (nowhere on ranks that
    write no files, `path` None); outside, everything is as it was."""
    handler: logging.Handler = logging.FileHandler(path, encoding="utf-8") if path else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in (*QUIET, LOG.name)]
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    logging.captureWarnings(True)
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        handler.close()
