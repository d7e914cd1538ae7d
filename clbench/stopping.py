"""SIGTERM stops a fit within seconds, whatever it is doing.

The Python handler raises SystemExit in the main thread, so the run records "interrupted" on its
way out; but Python runs handlers only between bytecodes of the main thread, and a fit can sit in
one long C call (a large matmul or a collective under load) or in a clean-up that waits. So the
signal also wakes a watchdog thread through the interpreter's wakeup fd (written by the C-level
handler at once, in whichever thread the kernel picked): if the process has not ended
`grace_s` seconds later, the watchdog marks the run's results.json "interrupted" itself and ends
the process with status 143, as the kill intended. Files a kill can cut short are written to be
safe for that (atomic renames, the resume state's complete marker).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clbench.files import write_json

GRACE_S = 5.0


class StopWatch:
    """Where the watchdog records a forced stop: the run folder, once it is known."""

    run_dir: Path | None = None


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def alive(pid: object) -> bool:
    """Whether process `pid` runs on this machine (a zombie, killed and not yet waited for, does not)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # the state follows the command name in parentheses, which may itself hold spaces
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def mark_interrupted(run_dir: Path | None, reason: str) -> bool:
    """results.json says "interrupted" with `reason` when it still said "running", everything else it
    recorded kept (for a process that is not the run's writer or cannot wait for the loop); whether
    it did."""
    results = run_dir / "results.json" if run_dir is not None else None
    if results is None or not results.is_file():
        return False
    try:
        state = json.loads(results.read_text(encoding="utf-8"))
        if state.get("status") != "running":
            return False
        state.update(status="interrupted", error=reason)
        write_json(results, state)
    except (OSError, ValueError):
        return False
    return True


def force_stop(run_dir: Path | None, grace_s: float) -> None:
    """Mark the run interrupted (keeping what its last results.json recorded) and end the process."""
    mark_interrupted(run_dir, f"SIGTERM: forced exit {grace_s:g} s after it")
    print(f"clbench: SIGTERM: still running {grace_s:g} s after it; exiting now", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


@contextmanager
def sigterm_stops(grace_s: float = GRACE_S) -> Iterator[StopWatch]:
    """For the block (main thread only): SIGTERM raises SystemExit, and ends the process after
    `grace_s` seconds if that did not. Yields the StopWatch to tell it the run folder."""
    watch = StopWatch()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    finished = threading.Event()

    def watchdog() -> None:
        try:
            while data := os.read(read_fd, 64):
                if signal.SIGTERM in data and not finished.wait(grace_s):
                    force_stop(watch.run_dir, grace_s)
        finally:
            os.close(read_fd)

    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = signal.signal(signal.SIGTERM, _terminated)
    thread = threading.Thread(target=watchdog, name="clbench-sigterm", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        finished.set()
        signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watchdog reads end-of-file and ends
