"""--trainer.logger: any Lightning logger gets the whole run; unset keeps TensorBoard's layout."""

from __future__ import annotations

import csv
import json

import pytest
from test_fit import toy_config, write_config

from clbench.cli import main


def _config(trace_dir, tiny_model_dir, tmp_path, name: str) -> str:
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    for task in cfg["stream"]["tasks"]:
        task["epochs"] = 2
    cfg["run"].update(name=name, checkpoints="none")
    return str(write_config(tmp_path / f"{name}.yaml", cfg))


def test_a_csv_logger_gets_every_task_on_one_step_axis_and_the_scores(trace_dir, tiny_model_dir, tmp_path):
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"]
    logger += ["--trainer.logger.save_dir", str(tmp_path / "csv"), "--trainer.logger.name", "toy"]
    assert main(["fit", "--config", _config(trace_dir, tiny_model_dir, tmp_path, "csv"), *logger]) == 0
    run = tmp_path / "runs" / "csv"
    results = json.loads((run / "results.json").read_text())
    files = list((tmp_path / "csv" / "toy").rglob("metrics.csv"))
    assert len(files) == 1, files  # one logger, one version, for the whole run
    rows = list(csv.DictReader(files[0].read_text().splitlines()))
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    first = results["timings"]["steps"]["parity"]
    total = first + results["timings"]["steps"]["reverse"]
    assert loss_steps == sorted(loss_steps) and loss_steps[0] < first <= loss_steps[-1] < total
    scores = {int(r["step"]): float(r["score/reverse"]) for r in rows if r.get("score/reverse")}
    at_row = {0: 0, 1: first, 2: total}  # each row is logged at the run's steps when it was measured
    matrix = results["matrix"]
    assert scores == {at_row[r]: matrix[r][1] for r in at_row if matrix[r][1] is not None}
    assert total in scores
    summary = [r for r in rows if r.get("summary/OP")]
    assert len(summary) == 1 and abs(float(summary[0]["summary/OP"]) - results["summary"]["OP"]) < 1e-6
    assert not (run / "tensorboard").exists()  # the user's logger replaces the default


def test_unset_keeps_the_tensorboard_layout_and_false_logs_nothing(trace_dir, tiny_model_dir, tmp_path):
    assert main(["fit", "--config", _config(trace_dir, tiny_model_dir, tmp_path, "tb")]) == 0
    versions = sorted(p.name for p in (tmp_path / "runs" / "tb" / "tensorboard").iterdir())
    assert versions == ["scores", "task1-parity", "task2-reverse"]
    config = _config(trace_dir, tiny_model_dir, tmp_path, "off")
    assert main(["fit", "--config", config, "--trainer.logger", "false"]) == 0
    assert not (tmp_path / "runs" / "off" / "tensorboard").exists()
    assert json.loads((tmp_path / "runs" / "off" / "results.json").read_text())["status"] == "complete"


def test_an_empty_logger_list_logs_nothing_as_lightning_reads_it(tmp_path):
    from clbench.loggers import RunLoggers

    loggers = RunLoggers(tmp_path, [])
    assert loggers.for_task(0, "parity", 0) is False
    loggers.log({"score/parity": 1.0}, 1, 10)
    assert not (tmp_path / "tensorboard").exists()


CSV_OPTIONS = "its options: save_dir, name, version, prefix, flush_logs_every_n_steps"
LOGGERS = "Lightning's: CSVLogger, CometLogger, LitLogger, MLFlowLogger, TensorBoardLogger, WandbLogger"
BAD_LOGGERS = {
    "unknown class": (
        ["--trainer.logger", "CSVLoggr"],
        f"command line: trainer.logger: 'CSVLoggr' is not a logger; {LOGGERS} (or the dotted path",
    ),
    "misspelt option": (
        ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dirr", "logs"],
        f"command line: trainer.logger.save_dirr: not an option of CSVLogger; {CSV_OPTIONS}",
    ),
    "misspelt option in the config": (
        {"class_path": "CSVLogger", "init_args": {"nme": "x"}},
        f"bad-logger.yaml: trainer.logger.nme: not an option of CSVLogger; {CSV_OPTIONS}",
    ),
    "option of the wrong type": (
        ["--trainer.logger", "CSVLogger", "--trainer.logger.flush_logs_every_n_steps", "often"],
        "command line: trainer.logger.flush_logs_every_n_steps: expected int, got 'often'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LOGGERS))
def test_a_bad_logger_is_one_line_listing_what_is_accepted(case, trace_dir, tiny_model_dir, tmp_path, capsys):
    given, expected = BAD_LOGGERS[case]
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    if isinstance(given, dict):
        cfg["trainer"]["logger"], given = given, []
    path = write_config(tmp_path / "bad-logger.yaml", cfg)
    assert main(["fit", "--config", str(path), *given]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()
