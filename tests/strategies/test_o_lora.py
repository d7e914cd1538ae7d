"""O-LoRA: one adapter per task, the earlier ones frozen and acting, the penalty as the paper writes it."""

import json

import pytest
import torch

from clbench.models import LoRA
from strategies.o_lora import OLoRA, down_projections, orthogonality


@pytest.fixture
def lora_module(make_module):
    return lambda: make_module(lora=LoRA(r=4, alpha=8, dropout=0.0))


def prepared(strategy, module, stream, make_ctx):
    strategy.prepare_model(make_ctx(module, stream, 0))
    strategy.setup(make_ctx(module, stream, 0))
    return strategy


def adapter_tensors(module, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if f".{adapter}." in n}


def batch_of(ctx):
    return next(iter(ctx.services.make_loader(ctx.task.train, False)))


def test_one_adapter_per_task_each_untrained_and_inactive_until_its_task(lora_module, make_ctx, stream_of):
    module, stream = lora_module(), stream_of(8, 8, 8)
    o_lora = prepared(OLoRA(), module, stream, make_ctx)
    assert o_lora.adapters == ["default", "o_lora_task1", "o_lora_task2"]
    assert module.adapter_names() == o_lora.adapters
    for name in o_lora.adapters:
        tensors = adapter_tensors(module, name)
        assert len(tensors) == 2 * 14  # A and B of 7 linear layers in each of 2 blocks
        assert all(not t.any() for n, t in tensors.items() if ".lora_B." in n)  # B = 0: no effect yet
    o_lora.on_task_start(make_ctx(module, stream, 1))
    assert module.model.base_model.active_adapters == ["default", "o_lora_task1"]
    assert {n.split(".lora_")[1].split(".")[1] for n in module.trainable_parameters()} == {"o_lora_task1"}


def test_without_lora_it_says_what_to_set(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(4, 4)
    with pytest.raises(ValueError, match="model.lora"):
        OLoRA().prepare_model(make_ctx(module, stream, 0))


def test_penalty_and_its_gradient_match_a_hand_computation(lora_module, make_ctx, stream_of):
    module, stream = lora_module(), stream_of(8, 8, 8)
    lam1, lam2 = 0.7, 0.3
    o_lora = prepared(OLoRA(lambda_1=lam1, lambda_2=lam2), module, stream, make_ctx)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random adapters everywhere, B included, so every term is non-trivial
        for n, p in module.model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    ctx = make_ctx(module, stream, 2)
    o_lora.on_task_start(ctx)
    named = dict(module.model.named_parameters())
    expected = torch.zeros((), dtype=torch.float64)
    grads = {}
    for name, a_t in named.items():
        if ".lora_A.o_lora_task2." not in name:
            continue
        a_t = a_t.detach().double()
        grad = torch.zeros_like(a_t)
        for old in ("default", "o_lora_task1"):
            a_i = named[name.replace("o_lora_task2", old)].detach().double()
            overlap = torch.einsum("jl,kl->jk", a_i, a_t)  # A_i^T A_t with A as d_in x r: (r, r)
            expected += lam1 * (overlap**2).sum()
            grad += 2 * lam1 * overlap.T @ a_i
        grads[name] = grad + 2 * lam2 * a_t
    for name, p in named.items():
        if ".o_lora_task2." in name:
            expected += lam2 * (p.detach().double() ** 2).sum()
    penalty = o_lora.training_penalty(ctx, batch_of(ctx), None)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(named[name].grad.double(), grad, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for n, p in named.items() if ".o_lora_task2." not in n)  # old ones frozen


def test_earlier_adapters_stay_bit_identical_and_keep_acting(lora_module, make_ctx, stream_of, fit_task):
    module, stream = lora_module(), stream_of(8, 8, 8)
    o_lora = prepared(OLoRA(lambda_1=1.0, lambda_2=0.01), module, stream, make_ctx)
    fit_task(module, o_lora, make_ctx(module, stream, 0), steps=3)
    first = adapter_tensors(module, "default")
    assert any(t.any() for n, t in first.items() if ".lora_B." in n)  # task 0 trained its adapter
    untouched = adapter_tensors(module, "o_lora_task2")
    fit_task(module, o_lora, make_ctx(module, stream, 1), steps=3)
    assert all(torch.equal(t, adapter_tensors(module, "default")[n]) for n, t in first.items())
    assert all(torch.equal(t, adapter_tensors(module, "o_lora_task2")[n]) for n, t in untouched.items())
    second = adapter_tensors(module, "o_lora_task1")
    fit_task(module, o_lora, make_ctx(module, stream, 2), steps=3)
    assert all(torch.equal(t, adapter_tensors(module, "default")[n]) for n, t in first.items())
    assert all(torch.equal(t, adapter_tensors(module, "o_lora_task1")[n]) for n, t in second.items())
    # inference sums every adapter: dropping the last one changes the model's answer logits
    assert module.model.base_model.active_adapters == o_lora.adapters
    module.eval()
    batch = batch_of(make_ctx(module, stream, 0))
    with torch.no_grad():
        all_three = module(batch).logits
        module.set_adapters(o_lora.adapters[:2])
        two = module(batch).logits
    assert not torch.allclose(all_three, two)


def overlap_after_task1(lora_module, make_ctx, stream_of, fit_task, lambda_1: float) -> tuple[float, float]:
    """||A_0 A_1^T||^2 summed over modules at the start and at the end of task 1 (the same seed)."""
    module, stream = lora_module(), stream_of(8, 8)
    o_lora = prepared(OLoRA(lambda_1=lambda_1), module, stream, make_ctx)
    fit_task(module, o_lora, make_ctx(module, stream, 0), steps=4)

    def overlap() -> float:
        named = dict(module.model.named_parameters())
        old, new = down_projections(named, "default"), down_projections(named, "o_lora_task1")
        return orthogonality({m: a.detach() for m, a in old.items()}, new).item()

    before = overlap()
    fit_task(module, o_lora, make_ctx(module, stream, 1), steps=12)
    return before, overlap()


def test_orthogonality_term_drives_the_overlap_down(lora_module, make_ctx, stream_of, fit_task, tmp_path):
    start, plain = overlap_after_task1(lora_module, make_ctx, stream_of, fit_task, lambda_1=0.0)
    start_again, orthogonal = overlap_after_task1(lora_module, make_ctx, stream_of, fit_task, lambda_1=5.0)
    assert start == start_again > 0  # the same adapters at the start of task 1
    assert orthogonal < 0.2 * start and orthogonal < 0.2 * plain
    recorded = json.loads((tmp_path / "o_lora" / "overlap.json").read_text())
    assert recorded["beta"]["alpha"] == pytest.approx(orthogonal, rel=1e-5)


def test_nothing_to_add_on_the_first_task_without_lambda_2(lora_module, make_ctx, stream_of):
    module, stream = lora_module(), stream_of(8, 8)
    o_lora = prepared(OLoRA(lambda_1=1.0), module, stream, make_ctx)
    ctx = make_ctx(module, stream, 0)
    o_lora.on_task_start(ctx)
    assert o_lora.training_penalty(ctx, batch_of(ctx), None) is None
    assert o_lora.state_dict() == {}  # the adapters are model weights: they checkpoint and resume with it


@pytest.mark.parametrize("kwargs", [{"lambda_1": -1.0}, {"lambda_2": -0.1}])
def test_invalid_options_name_themselves(kwargs):
    with pytest.raises(ValueError, match=f"o_lora.{next(iter(kwargs))}"):
        OLoRA(**kwargs)
