"""How long `clbench fit` takes to stop after SIGTERM, in each phase of a run.

    python tools/stop_latency.py --config configs/quickstart.yaml --strategy attribution \
        [--phases evaluation,training,prior-early,prior-late] [fit arguments ...]

Each phase starts a fresh fit in a temporary folder, waits until the run is in that phase,
sends SIGTERM and measures the seconds until the process has exited, with the status
results.json then records. Phases: evaluation (the start row, 15 s in), training (task 1, 5 s
in), prior-early / prior-late (attribution's prior for a task: side training, the correct-answer
filter's generation and LRP scoring, 5 s and 60 s after its lock appeared).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _tensorboard_task1(run: Path) -> bool:
    return any((run / "tensorboard").glob("task1-*"))


def _prior_lock(run: Path) -> bool:
    return any(run.parent.glob("priors/**/*.lock"))


def _running(run: Path) -> bool:
    try:
        return json.loads((run / "results.json").read_text())["status"] == "running"
    except (OSError, ValueError, KeyError):
        return False


# phase -> (condition on the run folder, seconds to wait after it holds)
PHASES: dict[str, tuple[Callable[[Path], bool], float]] = {
    "evaluation": (_running, 15.0),
    "training": (_tensorboard_task1, 5.0),
    "prior-early": (_prior_lock, 5.0),
    "prior-late": (_prior_lock, 60.0),
}


def measure(phase: str, fit_args: list[str], timeout: float) -> dict:
    """One fit stopped in `phase`: seconds from SIGTERM to exit, exit code, recorded status."""
    ready, delay = PHASES[phase]
    with tempfile.TemporaryDirectory(prefix="stop-latency-") as tmp:
        run = Path(tmp) / "runs" / "run"
        cmd = [sys.executable, "-m", "clbench", "fit", *fit_args]
        cmd += ["--run.output_dir", str(run.parent), "--run.name", "run"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(Path(tmp) / "fit.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + timeout
            while not ready(run):
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    return {
                        "phase": phase,
                        "error": "never reached: " + (Path(tmp) / "fit.log").read_text()[-300:],
                    }
                time.sleep(0.2)
            time.sleep(delay)
            if proc.poll() is not None:
                return {"phase": phase, "error": f"ended before the signal (exit {proc.returncode})"}
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait()
            took = time.monotonic() - sent
        status = json.loads((run / "results.json").read_text())
        return {
            "phase": phase,
            "seconds": round(took, 2),
            "exit": code,
            "status": status["status"],
            "error": status.get("error", ""),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for a phase")
    args, fit_args = p.parse_known_args()
    for phase in args.phases.split(","):
        print(json.dumps(measure(phase, fit_args, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
