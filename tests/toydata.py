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


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
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
        tie_word_embeddings=False,
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


def quiet_trainer(steps: int, accumulate: int = 1):
    """A CPU Lightning Trainer for a few steps, with no logger, checkpoint or progress bar."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
