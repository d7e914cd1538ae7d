"""Freeze: frozen tensors are bit-identical after real training steps, the others move."""

import pytest
import torch

from strategies.freeze import Freeze, layer_index, parse_layers


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def changed(before, module) -> set[str]:
    return {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}


def test_frozen_layers_are_bit_identical_after_training(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(12)
    before = snapshot(module)
    freeze = Freeze(layers="0", freeze_embeddings=True)
    fit_task(module, freeze, make_ctx(module, stream, 0), steps=3)
    moved = changed(before, module)
    frozen = {n for n in before if n.startswith("model.layers.0.") or n == "model.embed_tokens.weight"}
    assert frozen and not moved & frozen
    assert {n for n in before if n.startswith("model.layers.1.")} <= moved
    assert "model.norm.weight" in moved


def test_tied_lm_head_is_frozen_with_the_embeddings(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(12)
    assert module.model.get_output_embeddings().weight is module.model.get_input_embeddings().weight
    before = snapshot(module)
    fit_task(module, Freeze(freeze_embeddings=False, freeze_lm_head=True), make_ctx(module, stream, 0))
    assert not module.model.lm_head.weight.requires_grad
    assert torch.equal(module.model.lm_head.weight, before["model.embed_tokens.weight"])
    assert "model.layers.0.self_attn.q_proj.weight" in changed(before, module)


def test_from_task_leaves_earlier_tasks_free(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(12, 12)
    freeze = Freeze(lower_layers=1, freeze_embeddings=False, from_task=1)
    before = snapshot(module)
    fit_task(module, freeze, make_ctx(module, stream, 0))
    assert "model.layers.0.mlp.up_proj.weight" in changed(before, module)
    before = snapshot(module)
    fit_task(module, freeze, make_ctx(module, stream, 1))
    moved = changed(before, module)
    assert not {n for n in moved if n.startswith("model.layers.0.")}
    assert "model.layers.1.mlp.up_proj.weight" in moved


def test_pattern_and_lora_names(make_module, make_ctx, stream_of, fit_task):
    from clbench.models import LoRA

    module, stream = make_module(lora=LoRA(r=2, alpha=4, dropout=0.0)), stream_of(12)
    before = snapshot(module)
    freeze = Freeze(layers="1", pattern=r"mlp\.", freeze_embeddings=True)
    fit_task(module, freeze, make_ctx(module, stream, 0))
    moved = changed(before, module)
    assert moved and all("lora_" in n and ".layers.0." in n and ".mlp." not in n for n in moved)
    assert any(".layers.0.self_attn." in n for n in moved)


def test_layer_names_of_common_layouts():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("base_model.model.model.layers.7.self_attn.q_proj.lora_A.default.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None
    assert parse_layers("0-2, 5") == {0, 1, 2, 5}


def test_a_selection_matching_nothing_is_an_error(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(4)
    with pytest.raises(ValueError, match="match no parameter"):
        Freeze(layers="10-12").on_task_start(make_ctx(module, stream, 0))


def test_state_round_trip():
    freeze = Freeze(layers="0-3")
    assert freeze.state_dict() == {}
    freeze.load_state_dict(freeze.state_dict())  # stateless: on_task_start re-applies after a resume


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"layers": "3-1"}, "layers"),
        ({"layers": "a"}, "layers"),
        ({"lower_layers": 0}, "lower_layers"),
        ({"layers": "0", "lower_layers": 2}, "lower_layers"),
        ({"pattern": "("}, "pattern"),
        ({"from_task": -1}, "from_task"),
    ],
)
def test_invalid_options_name_themselves(kwargs, option):
    with pytest.raises(ValueError, match=f"freeze.{option}"):
        Freeze(**kwargs)
