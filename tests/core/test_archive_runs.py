"""tools/archive_runs.py keeps the small files of finished runs only, laid out as a comparison folder."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("archive_runs", ROOT / "tools" / "archive_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_run(root: Path, name: str, status: str) -> Path:
    run = root / "runs" / name
    (run / "importance").mkdir(parents=True)
    (run / "predictions").mkdir()
    (run / "results.json").write_text(json.dumps({"status": status}))
    (run / "config.yaml").write_text("seed_everything: 1\n")
    (run / "importance" / "gate.json").write_text("{}")
    (run / "predictions" / "after_1.jsonl").write_text("{}\n")
    (run / "gem").mkdir()
    (run / "gem" / "projections.json").write_text("{}")  # any strategy's record, a plugin's too
    (run / "gem" / "huge.json").write_text(" " * (1 << 20))  # not a record: too large
    (run / "general" / "after_0").mkdir(parents=True)
    (run / "general" / "after_0" / "x.json").write_text("{}")  # lm-eval samples stay behind
    return run


def test_only_finished_runs_and_their_small_files_are_kept(tmp_path):
    comparison = tmp_path / "study"
    make_run(comparison, "lrp-q20-seed1", "complete")
    make_run(comparison, "lrp-q20-seed2", "running")
    assert load_tool().archive(comparison, tmp_path / "kept") == 1
    kept = tmp_path / "kept" / "study" / "runs"
    assert [p.name for p in kept.iterdir()] == ["lrp-q20-seed1"]
    files = sorted(str(p.relative_to(kept / "lrp-q20-seed1")) for p in kept.rglob("*") if p.is_file())
    assert files == ["config.yaml", "gem/projections.json", "importance/gate.json", "results.json"]


def test_the_archive_is_not_ignored_by_git():
    """A `runs/` pattern in .gitignore once hid every archived run, and a study died with its machine."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    kept = "results/quickstart-study/study/runs/lrp-q20-seed1234/results.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", kept], cwd=ROOT).returncode
    assert ignored == 1, f"{kept} is ignored by .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/x/results.json"], cwd=ROOT).returncode == 0
