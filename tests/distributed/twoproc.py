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


def fit(root: Path, out: str, ranks: int, *args: str) -> Path:
    """A run of the toy stream in `root/out/run`: `ranks` processes with the same global batch."""
    sharding = () if ranks == 1 else ("--trainer.devices", "2")
    batch = PER_RANK_BATCH * (2 // ranks)
    clbench(
        root,
        "fit",
        "--config",
        "toy.yaml",
        "--stream.batch_size",
        str(batch),
        "--run.output_dir",
        out,
        "--run.name",
        "run",
        *sharding,
        *args,
    )
    return root / out / "run"


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())
