"""Scoring a model on tasks' test splits with batched greedy generation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clbench.data.tasks import Task
from clbench.evaluation.metrics import score_predictions


def postprocess(text: str, mode: str) -> str:
    """Clean a generation before scoring: strip whitespace, or also keep only the first line."""
    text = text.strip()
    if mode == "first_line":
        text = text.split("\n", 1)[0].strip()
    return text


@dataclass
class TaskScore:
    """One task's score at one point of the stream, with what the reports need beside it.

    `stderr` is the standard error of the mean over test examples (sample std / sqrt(n)), so a
    reader can tell forgetting from noise.
    """

    task: str
    metric: str
    score: float
    n: int
    stderr: float
    valid_label_share: float | None = None
    majority_baseline: float | None = None


def score_task(task: Task, raw_predictions: list[str], out_file: Path | None = None) -> TaskScore:
    """Post-process, score and (optionally) write one task's predictions as JSONL."""
    preds = [postprocess(p, task.postprocess) for p in raw_predictions]
    refs = [ex.answer.strip() for ex in task.test]
    scores = score_predictions(task.metric, preds, refs, [ex.prompt for ex in task.test])
    valid = sum(p in task.labels for p in preds) / len(preds) if task.labels else None
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with out_file.open("w", encoding="utf-8") as f:
            for ex, raw, pred, s in zip(task.test, raw_predictions, preds, scores, strict=True):
                row = {"prompt": ex.prompt, "answer": ex.answer, "prediction": pred, "raw": raw, "score": s}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    mean = sum(scores) / len(scores)
    var = sum((x - mean) ** 2 for x in scores) / max(len(scores) - 1, 1)
    return TaskScore(
        task.name, task.metric, mean, len(scores), (var / len(scores)) ** 0.5, valid, task.majority_baseline()
    )
