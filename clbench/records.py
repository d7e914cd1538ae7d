"""A run folder as every reader sees it: its results.json and its config.yaml, read in one place.

fit (--resume), compare (reuse, tables) and the studies (budget, selection) read finished runs
through `read_record`; only the runner writes results.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

FINISHED = ("complete", "diverged")  # a collapsed run is an outcome too: the same inputs collapse again


@dataclass(frozen=True)
class RunRecord:
    """What a run folder holds: `results` (results.json) and `config` (config.yaml, resolved; {} if
    absent)."""

    folder: Path
    results: dict
    config: dict

    @property
    def status(self) -> str | None:
        return self.results.get("status")

    @property
    def finished(self) -> bool:
        """Complete, or stopped as diverged: an outcome that a rerun on the same inputs repeats."""
        return self.status in FINISHED

    @property
    def identity(self) -> dict | None:
        identity = self.results.get("identity")
        return identity if isinstance(identity, dict) else None

    @property
    def strategy_args(self) -> dict:
        """The strategy's init arguments as config.yaml resolved them."""
        strategy = self.config.get("strategy") or {}
        return (strategy.get("init_args") or {}) if isinstance(strategy, dict) else {}

    @property
    def strategy_class(self) -> str:
        """The strategy's short name (registry or entry-point name, else the class name in lower
        case) from config.yaml's class_path, e.g. "o_lora"."""
        from strategies import name_for  # the lazy registry: no strategy is imported

        strategy = self.config.get("strategy") or {}
        path = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy)
        return name_for(str(path))

    @property
    def entry(self) -> str:
        """The comparison entry the run belongs to (`run.entry`, which compare sets); for runs
        recorded before that field, the part of `run.name` before "-seed", as compare named them."""
        run = self.config.get("run")
        run = run if isinstance(run, dict) else {}
        return run.get("entry") or str(run.get("name") or self.folder.name).rsplit("-seed", 1)[0]

    @property
    def seed(self) -> int | None:
        return self.config.get("seed_everything")

    @property
    def score_split(self) -> str:
        stream = self.config.get("stream")
        return (stream.get("score_split") if isinstance(stream, dict) else None) or "test"


def read_record(folder: Path) -> RunRecord | None:
    """The run in `folder`, or None when it holds no readable results.json (not started, or cut
    short while the file was replaced); touches nothing."""
    try:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or bytes that are not UTF-8
        return None
    if not isinstance(results, dict):
        return None
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        config = {}
    return RunRecord(folder, results, config if isinstance(config, dict) else {})


def comparison_runs(comparison: Path) -> list[Path]:
    """The run folders of a comparison folder (the folders in its runs/), in name order."""
    runs = comparison / "runs"
    return sorted(f for f in runs.iterdir() if f.is_dir()) if runs.is_dir() else []


def read_finished(folder: Path) -> RunRecord | None:
    """The run in `folder` if it finished (complete or diverged), else None."""
    record = read_record(folder)
    return record if record is not None and record.finished else None
