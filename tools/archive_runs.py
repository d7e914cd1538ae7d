"""Keep the small files of finished runs in the repository, so a study outlives the machine it ran on.

    .venv/bin/python tools/archive_runs.py runs/study runs/study-b --to results/quickstart-study

For every finished run (results.json status "complete") of the given comparison folders, copies
config.yaml, results.json, results.md and the strategy's small records (every JSON file of under
1 MB in a folder of the run's own: importance/gate.json, ewc/fisher.json, gem/projections.json,
mbpa/inference.json, merge/ties.json, a plugin's) to <to>/<comparison name>/runs/<run>/.
`clbench analyze budget` and `clbench analyze select` read the copies as they read the originals,
and copying a run folder back into a comparison folder lets `clbench compare` reuse it instead of training it
again (it reuses a finished run whose config is the invocation's). Predictions, TensorBoard
files, priors and checkpoints stay behind (large, and not needed for the tables).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT = ("config.yaml", "results.json", "results.md")
NOT_RECORDS = {"predictions", "general", "tensorboard", "checkpoints", "resume"}  # samples, logs, weights
MAX_RECORD_BYTES = 1 << 20


def kept_files(run: Path) -> list[str]:
    """The run's files that are kept, relative to it: KEPT and the strategy's small JSON records."""
    records = [
        f"{p.parent.name}/{p.name}"
        for p in sorted(run.glob("*/*.json"))
        if p.parent.name not in NOT_RECORDS and p.stat().st_size < MAX_RECORD_BYTES
    ]
    return [name for name in KEPT if (run / name).is_file()] + records


def archive(comparison: Path, to: Path) -> int:
    """Copy the kept files of each finished run; returns how many runs were copied."""
    copied = 0
    for run in sorted((comparison / "runs").glob("*-seed*")):
        results = run / "results.json"
        if not results.is_file() or json.loads(results.read_text()).get("status") != "complete":
            continue
        target = to / comparison.name / "runs" / run.name
        for name in kept_files(run):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, target / name)
        copied += 1
    return copied


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("comparisons", nargs="+", type=Path)
    p.add_argument("--to", type=Path, required=True)
    args = p.parse_args()
    for comparison in args.comparisons:
        print(f"{comparison}: {archive(comparison, args.to)} finished runs -> {args.to / comparison.name}")


if __name__ == "__main__":
    main()
