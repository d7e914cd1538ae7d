"""The committed quickstart stream (data/quickstart/) is well formed and its splits do not leak.

Pure JSON checks, no model and no source packages: the builder (tools/build_quickstart_data.py) is
for developers, CI only reads the committed files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2] / "data" / "quickstart"
TASKS = ("FortuneTopic", "WordAnalogy", "WordNetDefWord", "PyNextLine")
SPLITS = ("train", "eval", "test")
FORTUNE_LABELS = {"computers", "food", "love", "politics", "startrek"}
ANALOGY = re.compile(r"^Analogy: (\S+) is to (\S+) as (\S+) is to \?\nAnswer:$")


def load(task: str, split: str) -> list[dict]:
    return json.loads((ROOT / task / f"{split}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_prompt_answer_lists(task):
    for split in SPLITS:
        rows = load(task, split)
        assert isinstance(rows, list) and rows, f"{task}/{split}"
        for i, row in enumerate(rows):
            assert isinstance(row, dict) and set(row) == {"prompt", "answer"}, f"{task}/{split}[{i}]"
            assert isinstance(row["prompt"], str) and row["prompt"].strip(), f"{task}/{split}[{i}]"
            assert isinstance(row["answer"], str) and row["answer"].strip(), f"{task}/{split}[{i}]"
            assert row["answer"] == row["answer"].strip(), f"{task}/{split}[{i}]: answer has outer spaces"
    assert len(load(task, "test")) >= 100
    assert len(load(task, "train")) >= 200


@pytest.mark.parametrize("task", TASKS)
def test_no_test_prompt_in_train(task):
    train = {r["prompt"] for r in load(task, "train")}
    for split in ("eval", "test"):
        assert not train & {r["prompt"] for r in load(task, split)}, f"{task}/{split} repeats train prompts"


def test_fortune_labels_in_declared_set_and_balanced():
    for split in SPLITS:
        rows = load("FortuneTopic", split)
        assert {r["answer"] for r in rows} == FORTUNE_LABELS, split
        for r in rows:
            assert r["prompt"].startswith("Fortune: ")
            assert r["prompt"].endswith(f"Topic (one of: {', '.join(sorted(FORTUNE_LABELS))}):")
    test = [r["answer"] for r in load("FortuneTopic", "test")]
    majority = max(test.count(label) for label in FORTUNE_LABELS) / len(test)
    assert majority <= 0.25  # balanced: five classes, majority baseline 0.2


def _analogies(split: str) -> list[tuple[str, str, str, str]]:
    out = []
    for r in load("WordAnalogy", split):
        m = ANALOGY.match(r["prompt"])
        assert m, r["prompt"]
        out.append((*m.groups(), r["answer"]))
    return out


def test_analogy_test_pairs_never_seen_in_training():
    train = _analogies("train")
    train_pairs = {(a, b) for a, b, _, _ in train} | {(c, d) for _, _, c, d in train}
    train_answers = {d.lower() for _, _, _, d in train}
    for split in ("eval", "test"):
        for a, b, c, d in _analogies(split):
            assert (c, d) not in train_pairs, f"{split}: answer pair {(c, d)} occurs in training"
            assert d.lower() not in train_answers, f"{split}: answer {d!r} is a training answer"
            assert (a, b) in train_pairs  # the demonstration pair is a training pair


def test_definition_answers_disjoint():
    answers = {s: [r["answer"] for r in load("WordNetDefWord", s)] for s in SPLITS}
    for split in SPLITS:
        assert len(answers[split]) == len(set(answers[split])), f"{split} repeats an answer word"
    assert not set(answers["train"]) & set(answers["test"])
    assert not set(answers["train"]) & set(answers["eval"])


def test_code_splits_come_from_disjoint_files():
    sources = json.loads((ROOT / "PyNextLine" / "sources.json").read_text(encoding="utf-8"))
    assert set(sources) == set(SPLITS)
    for split in SPLITS:
        assert len(sources[split]) == len(load("PyNextLine", split)), split
        assert all(isinstance(s, str) and s.endswith(".py") for s in sources[split])
    train = set(sources["train"])
    assert not train & set(sources["test"])
    assert not train & set(sources["eval"])
    assert not set(sources["eval"]) & set(sources["test"])


def test_readme_present():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for task in TASKS:
        assert f"`{task}`" in text
