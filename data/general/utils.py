"""Loaders for the clb_* lm-eval tasks: the JSONL files beside this file, whatever the working directory.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)` (lm_eval/api/task.py, download()),
so the loaders take and ignore keyword arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_task(task: str) -> datasets.DatasetDict:
    """`HERE/<task>/{train,test}.jsonl` as a DatasetDict with train and test splits."""
    splits = {}
    for split in ("train", "test"):
        lines = (HERE / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in lines])
    return datasets.DatasetDict(splits)


def load_clb_arith(**kwargs) -> datasets.DatasetDict:
    return load_task("clb_arith")


def load_clb_currency(**kwargs) -> datasets.DatasetDict:
    return load_task("clb_currency")
