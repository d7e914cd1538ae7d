"""The committed general-ability suite (data/general/) loads as lm-eval local tasks and is sound.

No model download and no babel: `--check` falls back to the committed CLDR table (checked by its
sha256) when babel is not importable; lm-eval runs on a tiny random model.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[2]
ROOT = REPO / "data" / "general"
TASKS = ("clb_arith", "clb_currency")


def load(task: str, split: str) -> list[dict]:
    lines = (ROOT / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def task_yaml(task: str) -> dict:
    text = (ROOT / f"{task}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text.replace("!function ", ""))  # the tag is lm-eval's, not plain YAML


@pytest.fixture(scope="module")
def task_dict():
    """Both tasks as lm-eval's TaskManager builds them, from another working directory."""
    import os

    import lm_eval.tasks

    cwd = os.getcwd()
    os.chdir("/")
    try:
        tm = lm_eval.tasks.TaskManager(include_path=str(ROOT))
        return lm_eval.tasks.get_task_dict(list(TASKS), tm)
    finally:
        os.chdir(cwd)


def test_builder_check_passes_on_committed_files():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_general_data.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "up to date" in out.stdout


def test_taskmanager_finds_both_tasks_and_loads_docs_offline(task_dict):
    assert set(task_dict) == set(TASKS)
    for name in TASKS:
        docs = list(task_dict[name].test_docs())
        assert len(docs) == len(load(name, "test")) == 100
        assert len(list(task_dict[name].fewshot_docs())) == len(load(name, "train")) == 10


def test_readme_states_sizes_and_defaults():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in TASKS:
        fewshot = task_yaml(name)["num_fewshot"]
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.endswith(f"| {len(load(name, 'train'))} / {len(load(name, 'test'))} | {fewshot} |"), row
    assert "4-way `multiple_choice`" in text


def test_currency_choices_distinct_and_gold_among_them(task_dict):
    task = task_dict["clb_currency"]
    for doc in list(task.test_docs()) + list(task.fewshot_docs()):
        choices = task.doc_to_choice(doc)
        assert len(choices) == 4 and len(set(choices)) == 4, doc
        gold = task.doc_to_target(doc)
        assert isinstance(gold, int) and 0 <= gold < 4 and choices[gold] == doc["choices"][doc["label"]]


def test_currency_gold_is_the_countrys_unit_in_the_source_table():
    table = (ROOT / "clb_currency" / "source.tsv").read_text(encoding="utf-8").splitlines()[1:]
    unit = {line.split("\t")[1]: line.split("\t")[3].split()[-1].lower() for line in table}
    test, train = load("clb_currency", "test"), load("clb_currency", "train")
    for doc in test + train:
        assert doc["choices"][doc["label"]] == unit[doc["country"]], doc
    assert not {d["country"] for d in test} & {d["country"] for d in train}


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expr: str) -> int:
    """An independent evaluator of the builder's `a op b` (no eval)."""
    node = ast.parse(expr, mode="eval").body
    assert isinstance(node, ast.BinOp) and type(node.op) in OPS
    return OPS[type(node.op)](node.left.value, node.right.value)


def test_arith_target_is_what_the_filter_extracts_from_a_correct_answer():
    cfg = task_yaml("clb_arith")
    regex = re.compile(cfg["filter_list"][0]["filter"][0]["regex_pattern"])
    ignore = cfg["metric_list"][0]["regexes_to_ignore"]
    for doc in load("clb_arith", "test") + load("clb_arith", "train"):
        expr, _, shown = doc["solution"].rpartition(" = ")
        assert shown == f"{doc['answer']}." and evaluate(expr) == int(doc["answer"]), doc
        generated = f" {doc['solution']}"  # what a right model writes after "Answer:"
        assert regex.findall(generated)[-1] == doc["answer"], doc
        reference = doc["solution"]
        for pattern in ignore:  # as lm-eval's exact_match treats the reference
            reference = re.sub(pattern, "", reference)
        assert reference == doc["answer"], doc


def test_simple_evaluate_runs_both_tasks_on_a_tiny_model(tmp_path, monkeypatch):
    import lm_eval
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM

    from clbench.testing import tiny_llama, tiny_tokenizer

    corpus = [d["question"] + " " + d["solution"] for d in load("clb_arith", "train")]
    tok = tiny_tokenizer(corpus)
    tok.padding_side = "left"
    model = tiny_llama(len(tok)).eval()
    monkeypatch.chdir(tmp_path)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=256),
        tasks=list(TASKS),
        task_manager=lm_eval.tasks.TaskManager(include_path=str(ROOT)),
        limit=4,
    )
    res = out["results"]
    assert 0.0 <= res["clb_arith"]["exact_match,last-number"] <= 1.0
    assert 0.0 <= res["clb_currency"]["acc,none"] <= 1.0 and "acc_norm,none" in res["clb_currency"]
