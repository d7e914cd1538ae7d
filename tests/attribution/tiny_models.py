"""Tiny random causal LMs of every supported family, in float64, with and without LoRA.

A uniquely named module rather than conftest.py, which other test folders also have."""

from __future__ import annotations

import torch

from clbench.testing import TINY

VOCAB = 97
KINDS = ("llama", "mistral", "qwen2", "gpt2")
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build_model(kind: str, lora: bool = False, tied: bool = False, seed: int = 0, **overrides):
    """A 2-layer, 32-dim model of `kind` in fp64 and eval mode; LoRA B is random so adapters matter."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        **TINY,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            **overrides,
        )
        model = tf.GPT2LMHeadModel(config)
    else:
        config_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[kind]
        model = model_cls(config_cls(**{**common, **overrides}))
    model = model.double().eval()
    return add_lora(model, kind) if lora else model


def add_lora(model, kind: str):
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS.get(kind, LORA_TARGETS["llama"])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # away from the B = 0 init, where adapter relevance is exactly 0
    return model.double().eval()


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Four sequences of 9 slots: full, left-padded, right-padded, and short left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    mask[3, :7] = 0
    ids[mask == 0] = 0
    return ids, mask
