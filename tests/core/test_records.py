"""clbench.records: the one reader of run folders."""

from __future__ import annotations

import json
from pathlib import Path

from clbench.records import read_finished, read_record


def test_a_run_folder_reads_as_a_record_and_only_finished_runs_count_as_finished(tmp_path):
    run = tmp_path / "ewc-seed1"
    run.mkdir()
    assert read_record(run) is None  # nothing written yet
    (run / "results.json").write_text('{"status": "running"')  # cut short while being replaced
    assert read_record(run) is None
    config = "strategy:\n  class_path: strategies.ewc.EWC\n  init_args: {ewc_lambda: 10.0}\nstream: {}\n"
    (run / "config.yaml").write_text(config)
    statuses = (("running", False), ("interrupted", False), ("diverged", True), ("complete", True))
    for status, finished in statuses:
        (run / "results.json").write_text(json.dumps({"status": status, "identity": {"config_sha256": "x"}}))
        record = read_record(run)
        assert record.status == status and record.finished is finished
        assert (read_finished(run) is not None) is finished
    assert record.strategy_class == "ewc" and record.strategy_args == {"ewc_lambda": 10.0}
    assert record.score_split == "test" and record.identity == {"config_sha256": "x"}


def test_odd_files_read_as_no_record_or_empty_fields_not_as_a_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(b"\xff\xfe not utf-8")
    assert read_record(run) is None
    (run / "results.json").write_text(json.dumps({"status": "complete", "identity": "not a mapping"}))
    (run / "config.yaml").write_bytes(b"\xff\xfe")
    record = read_record(run)
    assert record.config == {} and record.identity is None and record.score_split == "test"
    (run / "config.yaml").write_text("stream: [1, 2]\nstrategy: seqft\n")
    assert read_record(run).score_split == "test" and read_record(run).strategy_class == "seqft"


def test_the_code_a_run_is_identified_by_leaves_out_only_what_no_fit_imports():
    """Editing the test kit or a study keeps finished runs reusable, which is right only while no
    module a fit can import (directly or inside a function) imports them; cli.py dispatches to
    `analyze` and is the one exception."""
    import ast

    import clbench
    import strategies
    from clbench.identity import NOT_IN_A_FIT, _sources

    core, plugins = Path(clbench.__file__).parent, Path(strategies.__file__).parent
    hashed = _sources(core) + _sources(plugins)
    assert core / "runner.py" in hashed and core / "compare" / "launch.py" in hashed
    assert core / "testing.py" not in hashed and core / "studies" / "budget.py" not in hashed
    excluded = tuple(f"clbench.{name.removesuffix('.py')}" for name in NOT_IN_A_FIT)
    offenders = []
    for path in hashed:
        if path == core / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path}: {n}" for n in names if n.startswith(excluded)]
    assert offenders == []
