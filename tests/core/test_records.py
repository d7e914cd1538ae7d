"""clbench.records: the one reader of run folders."""

from __future__ import annotations

import json

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
