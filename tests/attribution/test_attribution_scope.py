"""Scoring leaves the model exactly as it found it: modes, flags, .grad, attention, training gradients."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, padded_batch

from strategies.attribution.lrp import parameter_relevance, stream_parameter_relevance


def _train_grads(model, ids, mask) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # dropout masks
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _state(model) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "attn": model.config._attn_implementation,
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_gradients_after_scoring_are_bit_identical(kind):
    model = build_model(kind, lora=True, attn_pdrop=0.1) if kind == "gpt2" else build_model(kind, lora=True)
    model.train()
    model.base_model.model.lm_head.weight.requires_grad_(True)  # a mix of trainable and frozen
    ids, mask = padded_batch()
    before = _train_grads(model, ids, mask)
    state = _state(model)
    grads = {n: p.grad for n, p in model.named_parameters()}

    parameter_relevance(model, ids, mask)

    assert _state(model) == state
    assert all(p.grad is grads[n] for n, p in model.named_parameters())  # .grad untouched
    after = _train_grads(model, ids, mask)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_scoring_under_no_grad_or_inference_mode_and_a_failing_consumer_leave_the_model_intact():
    model = build_model("qwen2")
    model.config._attn_implementation = "sdpa"
    state = _state(model)

    def boom(name, relevance):
        raise RuntimeError("consumer failed")

    with torch.no_grad(), pytest.raises(RuntimeError, match="consumer failed"):
        stream_parameter_relevance(model, *padded_batch(), boom)
    assert _state(model) == state
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        ids, mask = padded_batch()
        relevance = parameter_relevance(model, ids, mask)  # and it still works afterwards
    assert len(relevance) == len(list(model.parameters()))
