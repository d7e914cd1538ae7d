"""What a person sees while a run goes: clbench's own lines and the training progress bar on the
console; Lightning's banners (accelerator, precision, tips), framework warnings and logs go to
RUN_DIR/run.log, beside clbench's lines, so nothing is lost and the console stays readable."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clbench import distributed as dist

LOG = logging.getLogger("clbench")
QUIET = ("lightning.pytorch", "lightning.fabric", "py.warnings")  # loggers sent to the run log


def say(message: str) -> None:
    """One clbench line: on the console (rank 0) and in the run log."""
    if dist.rank() == 0:
        print(message, flush=True)
    LOG.info(message)


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
