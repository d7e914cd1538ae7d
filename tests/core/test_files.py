"""`clbench.files.exclusive`: the lock that lets one run compute a shared prior while others wait,
tested across real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from clbench.files import exclusive

HOLD = """
import sys, time
from pathlib import Path
from clbench.files import exclusive
with exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2]).touch()
"""


def holder(lock, done, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), str(done), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_exclusive_waits_for_the_holder_then_takes_the_lock(tmp_path):
    lock, done = tmp_path / "prior.safetensors.lock", tmp_path / "done"
    child = holder(lock, done, 1.0)
    waited = []
    with exclusive(lock, on_wait=lambda: waited.append(done.is_file())):
        assert done.is_file()  # entered only after the holder finished its block
    assert waited == [False]  # told once, while the holder was still at work
    assert child.wait(10) == 0
    with exclusive(lock, on_wait=lambda: waited.append("again")):
        pass
    assert waited == [False]  # free: no waiting
    assert lock.is_file()


def test_a_killed_holder_frees_the_lock(tmp_path):
    lock, done = tmp_path / "sub" / "x.lock", tmp_path / "done"  # the folder is made
    child = holder(lock, done, 600.0)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    start = time.monotonic()
    with exclusive(lock):
        assert not done.is_file()
    assert time.monotonic() - start < 5
