"""Running clbench as a user does, in subprocesses: one process, or two ranks on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PER_RANK_BATCH = 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def clbench(root: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clbench", *args]
    out = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def fit_args(out: str, ranks: int, *args: str) -> list[str]:
    """`fit` of the toy stream into `out/run`: `ranks` processes with the same global batch."""
    sharding = ["--trainer.devices", "2"] if ranks == 2 else []
    batch = PER_RANK_BATCH * (2 // ranks)
    run = ["--stream.batch_size", str(batch), "--run.output_dir", out, "--run.name", "run"]
    return ["fit", "--config", "toy.yaml", *run, *sharding, *args]


def fit(root: Path, out: str, ranks: int, *args: str) -> Path:
    """A run of the toy stream in `root/out/run`: `ranks` processes with the same global batch."""
    clbench(root, *fit_args(out, ranks, *args))
    return root / out / "run"


def start_fit(root: Path, out: str, ranks: int, *args: str) -> subprocess.Popen:
    """`fit` started in a session of its own (os.killpg reaches every rank), output discarded."""
    cmd = [sys.executable, "-m", "clbench", *fit_args(out, ranks, *args)]
    quiet = subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=root, env=ENV, stdout=quiet, stderr=quiet, start_new_session=True)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())
