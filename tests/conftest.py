"""Shared fixtures: a tiny random Llama saved like a hub model, and miniature TRACE folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clbench.testing import save_tiny_model, toy_tasks, write_trace_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The same numbers on every machine: configs that leave trainer.precision unset run in fp32 here,
# not in bf16 where a CPU happens to have it (clbench/precision.py; its tests unset this).
os.environ["CLBENCH_DEFAULT_PRECISION"] = "32-true"
# Tiny models run fastest on one thread; two threads on a shared 2-core machine spin and wait.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama and its tokenizer, loadable by `from_pretrained`."""
    corpus = [ex["prompt"] + " " + ex["answer"] for t in toy_tasks().values() for s in t.values() for ex in s]
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus * 4)


@pytest.fixture
def trace_dir(tmp_path) -> Path:
    """A miniature TRACE folder with three toy tasks."""
    return write_trace_folder(tmp_path / "TRACE", toy_tasks())
