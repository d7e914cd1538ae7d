"""Shared fixtures for strategy tests: a tiny random Llama saved to disk, streams, contexts, fitting.

The model folder goes through CLModule's real loading path (AutoTokenizer / AutoModelForCausalLM).
Each task uses its own words (hence a word-level vocabulary, not tests/conftest.py's tiny model),
so a batch row can be traced back to the task it came from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toydata import ToyServices, quiet_trainer

from clbench.data.tasks import Example, Task, TaskStream
from clbench.module import CLModule
from clbench.strategy import CLStrategy, StrategyContext

SPECIALS = ["<pad>", "<unk>", "<eos>"]
TASK_WORDS = {
    "alpha": ["alpha", "red", "green", "blue", "one", "two"],
    "beta": ["beta", "cat", "dog", "fish", "three", "four"],
    "gamma": ["gamma", "sun", "moon", "star", "five", "six"],
}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [w for ws in TASK_WORDS.values() for w in ws]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def words_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama with tied embeddings and its word-level tokenizer, on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
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


def _make_ctx(module: CLModule, stream: TaskStream, t: int, run_dir: Path, batch_size: int = 4):
    """A context whose loader batches like training: the task's limits, raw prompts, left padding."""
    services = ToyServices(module, stream, t, batch_size)
    return StrategyContext(module, stream, task_index=t, run_dir=run_dir, seed=0, services=services)


def _fit_task(module: CLModule, strategy: CLStrategy, ctx: StrategyContext, steps: int = 3) -> None:
    """What the runner does for one task: start hook, training examples, a short fit, end hook."""
    module.attach(strategy, ctx)
    strategy.on_task_start(ctx)
    loader = ctx.services.make_loader(strategy.training_examples(ctx, ctx.task.train), True)
    quiet_trainer(steps).fit(module, train_dataloaders=loader)
    strategy.on_task_end(ctx)


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
    return lambda module, stream, t, batch_size=4: _make_ctx(module, stream, t, tmp_path, batch_size)


@pytest.fixture
def fit_task():
    """fit_task(module, strategy, ctx, steps=3): one task as the runner runs it."""
    return _fit_task


@pytest.fixture
def task_rows():
    """task_rows(batch, tokenizer): the task name of every row of a batch."""
    return _task_rows
