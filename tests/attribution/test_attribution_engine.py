"""Whole-model properties of the LRP engine: conservation, fidelity to HF, batching, refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_models import KINDS, VOCAB, build_model, padded_batch

from strategies.attribution.lrp import parameter_relevance, stream_parameter_relevance

# Mistral with a window shorter than the batch, so the sliding-window mask is exercised
OVERRIDES = {"mistral": {"sliding_window": 4}}


def _score(model, ids, mask):
    collected: dict[str, torch.Tensor] = {}
    seeds = stream_parameter_relevance(model, ids, mask, collected.__setitem__)
    return collected, seeds


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("kind", KINDS)
def test_relevance_of_all_parameters_sums_to_the_seed_logit(kind, lora, batch):
    model = build_model(kind, lora=lora, **OVERRIDES.get(kind, {}))
    relevance, seeds = _score(model, *batch)

    names = [n for n, _ in model.named_parameters()]
    assert sorted(relevance) == sorted(names)
    for name, p in model.named_parameters():
        assert relevance[name].shape == (4, *p.shape) and relevance[name].dtype == torch.float64
        if "norm" in name or ".ln_" in name:
            assert not relevance[name].any(), name
    total = sum(r.flatten(1).sum(1) for r in relevance.values())
    torch.testing.assert_close(total, seeds.logit, rtol=1e-5, atol=0)
    if lora:
        adapters = [r for n, r in relevance.items() if "lora_" in n]
        assert adapters and all(r.abs().sum() > 0 for r in adapters)


def test_tied_embeddings_add_both_uses():
    model = build_model("llama", tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = padded_batch()
    relevance, seeds = _score(model, ids, mask)
    assert "lm_head.weight" not in relevance  # named_parameters() yields the shared tensor once
    total = sum(r.flatten(1).sum(1) for r in relevance.values())
    torch.testing.assert_close(total, seeds.logit, rtol=1e-5, atol=0)
    # the seed row holds the lm_head half: 1/2 W[j] * h, on top of any lookup of token j
    emb = relevance["model.embed_tokens.weight"]
    assert all(emb[k, seeds.token[k]].abs().sum() > 0 for k in range(4))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_seed_is_the_models_own_argmax_logit(kind, attn):
    overrides = {"qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}}
    model = build_model(kind, **{**OVERRIDES, **overrides}.get(kind, {}))
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them under left padding
    with torch.no_grad():
        # the sdpa reference: HF eager in fp64 turns fully masked left-padding rows into nan
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    model.config._attn_implementation = attn  # scoring computes attention itself either way
    _, seeds = _score(model, ids, mask)
    at_seed = logits[torch.arange(4), seeds.position]  # (B, V)
    assert torch.equal(seeds.position, torch.tensor([8, 8, 5, 8]))
    assert torch.equal(seeds.token, at_seed.argmax(-1))
    # HF computes norms and softmax in fp32 even for fp64 models; scoring keeps fp64
    torch.testing.assert_close(
        seeds.logit, at_seed.gather(1, seeds.token[:, None])[:, 0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_relevance_equals_one_sample_at_a_time(kind):
    model = build_model(kind, lora=True)
    ids, mask = padded_batch()
    batched = parameter_relevance(model, ids, mask)
    for k in range(4):
        alone = parameter_relevance(model, ids[k : k + 1][mask[k : k + 1].bool()][None])
        for name, r in alone.items():
            torch.testing.assert_close(batched[name][k], r[0], rtol=1e-9, atol=1e-12, msg=name)


def test_streaming_hands_over_each_parameter_once_in_backward_order():
    model = build_model("llama")
    seen: list[str] = []
    stream_parameter_relevance(model, *padded_batch(), lambda name, r: seen.append(name))
    names = [n for n, _ in model.named_parameters()]
    assert sorted(seen) == sorted(names)
    # the last layer is finished before the first layer's weights arrive
    assert seen.index("model.layers.1.mlp.down_proj.weight") < seen.index(
        "model.layers.0.self_attn.q_proj.weight"
    )


def test_bf16_model_gives_fp32_relevance_that_nearly_conserves():
    model = build_model("llama").to(torch.bfloat16)
    relevance, seeds = _score(model, *padded_batch())
    assert all(r.dtype == torch.float32 for r in relevance.values())
    total = sum(r.flatten(1).sum(1) for r in relevance.values())
    assert torch.isfinite(total).all()
    torch.testing.assert_close(total, seeds.logit, rtol=0.1, atol=0.05)


def test_unsupported_architecture_is_refused_by_name():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(ValueError, match="gpt_neox"):
        parameter_relevance(model, torch.tensor([[3, 4, 5]]))


def test_lora_variant_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="LoRA"):
        parameter_relevance(model, torch.tensor([[3, 4, 5]]))


def test_zero_lora_b_gives_zero_adapter_relevance():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("qwen2"), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    relevance = parameter_relevance(model.double(), *padded_batch())
    assert all(not r.any() for n, r in relevance.items() if "lora_" in n)


def test_every_sample_needs_a_token():
    model = build_model("llama")
    with pytest.raises(ValueError, match="non-padding"):
        parameter_relevance(model, torch.tensor([[3, 4]]), torch.tensor([[0, 0]]))
