"""Rank 0 of a two-rank FSDP2 fit killed with SIGKILL, as the kernel's out-of-memory killer kills:
the surviving rank says so in one line, results.json stops claiming "running", and the run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from twoproc import ENV, clbench, fit_args, results, wait_for_first_task


def test_rank_1_reports_rank_0_s_death_in_one_line_and_the_run_resumes(toy_setup):
    run = toy_setup / "rank0-killed" / "run"
    cmd = [
        sys.executable,
        "-m",
        "clbench",
        *fit_args("rank0-killed", 2, "--trainer.strategy", "fsdp", "--strategy", "seqft"),
    ]
    err = toy_setup / "rank0-killed.err"
    with err.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=toy_setup, env=ENV, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
    try:
        wait_for_first_task(proc, run, lambda: err.read_text()[-3000:])
        proc.kill()  # rank 0 alone; rank 1, its child, lives on and finds it gone at its next collective
        proc.wait(timeout=30)
        deadline = time.time() + 120
        while _group_alive(proc.pid):
            assert time.time() < deadline, "rank 1 did not end after rank 0 died"
            time.sleep(0.1)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.read_text().strip().splitlines()
    assert lines == [
        f"clbench fit: stopped: rank 0 (process {proc.pid}) died without an error: killed (the kernel's "
        "out-of-memory killer sends SIGKILL; see dmesg); go on from its last finished task with: "
        "clbench fit --resume rank0-killed/run"
    ], "\n".join(lines[-40:])
    stopped = results(run)
    assert stopped["status"] == "interrupted" and f"rank 0 (process {proc.pid}) died" in stopped["error"]
    assert stopped["identity"]  # what rank 0 recorded is kept: --resume checks it
    clbench(toy_setup, "fit", "--resume", str(run))  # two ranks again, from the run's config.yaml
    assert results(run)["status"] == "complete"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
