"""Tiny offline building blocks for tests: a byte-level tokenizer, a random Llama, toy tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer (any text encodes) with BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, tied: bool = False, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
        **overrides,
    )
    return LlamaForCausalLM(config)


def toy_tasks(n_train: int = 24, n_test: int = 8, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Three tiny tasks with different answer formats, so they interfere like real ones."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "map", "red", "tea", "pen", "box", "owl", "fig"]

    def parity(_):
        a = rng.randrange(100)
        return {"prompt": f"Is {a} even? Answer:", "answer": "yes" if a % 2 == 0 else "no"}

    def reverse(_):
        w = rng.choice(words)
        return {"prompt": f"Reverse {w}:", "answer": w[::-1]}

    def upper(_):
        w = rng.choice(words)
        return {"prompt": f"Upper {w}:", "answer": w.upper()}

    out = {}
    for name, make in (("parity", parity), ("reverse", reverse), ("upper", upper)):
        out[name] = {
            "train": [make(i) for i in range(n_train)],
            "eval": [make(i) for i in range(4)],
            "test": [make(i) for i in range(n_test)],
        }
    return out


def write_trace_folder(root: Path, tasks: dict[str, dict[str, list[dict]]]) -> Path:
    for name, splits in tasks.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            (root / name / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


def quiet_trainer(steps: int, accumulate: int = 1, clip: float | None = None):
    """A CPU Lightning Trainer for a few steps, with no logger, checkpoint or progress bar."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


class ToyServices:
    """The runner's services (clbench.strategy.Services) for strategy tests: raw prompts, left
    padding, `batch_size` rows, greedy prediction through the module, and an optional side fit."""

    def __init__(self, module, stream, t: int, batch_size: int = 4, predict=None, side_fit=None) -> None:
        self.module, self.stream, self.t, self.batch_size = module, stream, t, batch_size
        self._predict, self._side_fit = predict, side_fit

    def _loader(self, examples, task, with_answer: bool, shuffle: bool):
        from torch.utils.data import DataLoader

        from clbench.data.collate import LeftPadCollator, TokenizedTask

        task = task or self.stream.tasks[self.t]
        data = TokenizedTask(examples, task, self.module.tokenizer, "raw", with_answer=with_answer)
        collate = LeftPadCollator(self.module.tokenizer.pad_token_id)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def make_loader(self, examples, shuffle: bool, task=None):
        return self._loader(examples, task, True, shuffle)

    def make_prompt_loader(self, examples, task=None):
        return self._loader(examples, task, False, False)

    def predict(self, task, examples):
        if self._predict is not None:
            return self._predict(task, examples)
        from clbench.evaluation.evaluator import postprocess

        batches = self.make_prompt_loader(examples, task)
        return [postprocess(x, task.postprocess) for b in batches for x in self.module.generate(b)]

    def side_fit(self, task, examples):
        if self._side_fit is None:
            raise AssertionError("this test gives no side fit")
        self._side_fit(task, examples)

    def training_settings(self, task):
        from clbench.strategy import TrainingSettings

        m = self.module
        return TrainingSettings(
            m.lr,
            m.weight_decay,
            tuple(m.betas),
            m.warmup_steps,
            m.schedule,
            task.epochs,
            task.max_steps,
            self.batch_size,
            1,
            1,
            self.batch_size,
            "32-true",
            None,
        )

    def frozen_copy(self):
        return self.module.frozen_copy()

    def generate_text(self, prompts, max_new_tokens, model=None, temperature=0.0, seed=0):
        return self.module.generate_text(prompts, max_new_tokens, model, self.batch_size, temperature, seed)
