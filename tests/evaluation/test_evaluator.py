"""Scoring one task: post-processing, valid-label share, standard error, predictions file."""

import json

import pytest

from clbench.data.tasks import Example, Task
from clbench.evaluation.evaluator import postprocess, score_task


def test_score_task_reports_share_stderr_and_writes_predictions(tmp_path):
    train = [Example("p", "yes")] * 3 + [Example("p", "no")]
    test = [Example(f"q{i}", a) for i, a in enumerate(["yes", "no", "no", "yes"])]
    task = Task("t", train=train, test=test, labels=["no", "yes"])
    out = tmp_path / "t.jsonl"
    s = score_task(task, [" yes\n", "maybe", "no", "no "], out)
    assert s.score == pytest.approx(0.5) and s.n == 4
    assert s.valid_label_share == pytest.approx(0.75)  # "maybe" is not a label
    assert s.majority_baseline == pytest.approx(0.5)  # always "yes"
    # per-example scores 1, 0, 1, 0: sample std sqrt(1/3), divided by sqrt(4)
    assert s.stderr == pytest.approx((1 / 3) ** 0.5 / 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["yes", "maybe", "no", "no"] and rows[1]["raw"] == "maybe"


def test_postprocess_modes():
    assert postprocess("  a b \n c", "strip") == "a b \n c"
    assert postprocess("\n x = 1\n y = 2", "first_line") == "x = 1"
