"""Shared fixtures for strategy tests: a tiny random Llama saved to disk, streams, contexts, fitting.

The model folder goes through CLModule's real loading path (AutoTokenizer / AutoModelForCausalLM).
Each task uses its own words (hence a word-level vocabulary, not tests/conftest.py's tiny model),
so a batch row can be traced back to the task it came from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clbench import testing
from clbench.data.tasks import Example, Task, TaskStream
from clbench.module import CLModule
from clbench.testing import make_context, tiny_llama, word_tokenizer

TASK_WORDS = {
    "alpha": ["alpha", "red", "green", "blue", "one", "two"],
    "beta": ["beta", "cat", "dog", "fish", "three", "four"],
    "gamma": ["gamma", "sun", "moon", "star", "five", "six"],
}


@pytest.fixture(scope="session")
def words_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama with tied embeddings and its word-level tokenizer, on disk."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = word_tokenizer([w for words in TASK_WORDS.values() for w in words])
    tiny_llama(len(tok), tied=True, max_position_embeddings=64, bos_token_id=None).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def make_module(words_model_dir):
    def make(**kwargs) -> CLModule:
        torch.manual_seed(0)
        return CLModule(model=str(words_model_dir), **{"lr": 1e-2, **kwargs})

    return make


def task_of(name: str, n: int) -> Task:
    """n examples made of the task's own words: prompt '<name> w w', answer one word."""
    words = TASK_WORDS[name]
    prompts = [f"{name} {words[1 + i % 3]} {words[1 + (i // 3) % 3]}" for i in range(n)]
    train = [Example(prompt, words[4 + i % 2]) for i, prompt in enumerate(prompts)]
    return Task(name=name, train=train, test=train[:2], max_new_tokens=2)


def _stream_of(*sizes: int) -> TaskStream:
    names = list(TASK_WORDS)
    return TaskStream(name="tiny", tasks=[task_of(names[i], n) for i, n in enumerate(sizes)])


def _task_rows(batch: dict, tokenizer) -> list[str]:
    """The task each batch row came from, read from its first (task-name) prompt token."""
    firsts = {tokenizer.convert_tokens_to_ids(name): name for name in TASK_WORDS}
    return [next(firsts[i] for i in row.tolist() if i in firsts) for row in batch["input_ids"]]


@pytest.fixture
def stream_of():
    """stream_of(n0, n1, ...): a stream whose task i has n_i examples."""
    return _stream_of


@pytest.fixture
def make_ctx(tmp_path):
    """make_ctx(module, stream, t, batch_size=4): the context of task t."""
    return lambda module, stream, t, batch_size=4: make_context(module, stream, t, tmp_path, batch_size)


@pytest.fixture
def fit_task():
    """fit_task(module, strategy, ctx, steps=3): one task as the runner runs it."""
    return testing.fit_task


@pytest.fixture
def task_rows():
    """task_rows(batch, tokenizer): the task name of every row of a batch."""
    return _task_rows
