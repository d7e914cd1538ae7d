"""EWC: the penalty is zero at the anchor, its gradient is lambda F (theta - theta*), Fisher is right."""

import pytest
import torch

from strategies.ewc import EWC, ewc_penalty


def ewc_after_task0(make_module, make_ctx, stream_of, **kwargs):
    module, stream = make_module(), stream_of(12, 12)
    ewc = EWC(**{"fisher_batches": 2, **kwargs})
    ewc.on_task_end(make_ctx(module, stream, 0))
    return module, stream, ewc


def test_penalty_is_zero_at_the_anchor(make_module, make_ctx, stream_of):
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of)
    ctx = make_ctx(module, stream, 1)
    assert set(ewc.fisher) == set(module.trainable_parameters())
    assert sum(f.sum() for f in ewc.fisher.values()) > 0
    assert ewc.training_penalty(ctx, {}, None).item() == 0.0


def test_penalty_gradient_is_lambda_fisher_times_displacement(make_module, make_ctx, stream_of):
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of, ewc_lambda=3.0)
    params = module.trainable_parameters()
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    penalty = ewc.training_penalty(make_ctx(module, stream, 1), {}, None)
    grads = torch.autograd.grad(penalty, list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = 3.0 * ewc.fisher[name] * (p.detach() - ewc.anchor[name])
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-9)
    value = sum(1.5 * (ewc.fisher[n] * (p.detach() - ewc.anchor[n]) ** 2).sum() for n, p in params.items())
    torch.testing.assert_close(penalty.detach(), value)


def test_fisher_is_the_mean_squared_batch_gradient(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(8)
    ctx = make_ctx(module, stream, 0)
    ewc = EWC(fisher_batches=None)
    torch.manual_seed(1)
    ewc.on_task_end(ctx)
    params = module.trainable_parameters()
    module.eval()
    torch.manual_seed(1)  # the same shuffled batches
    batches = list(ctx.services.make_loader(ctx.task.train, True))
    assert len(batches) == 2
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for b in batches:
        module.zero_grad()
        module(b).loss.backward()
        for name, p in params.items():
            expected[name] += p.grad.square() / len(batches)
    for name in params:
        torch.testing.assert_close(ewc.fisher[name], expected[name])


def test_per_sample_fisher_is_larger_than_per_batch(make_module, make_ctx, stream_of):
    # Per-example gradients do not cancel, so their mean square exceeds the squared batch mean.
    module, stream = make_module(), stream_of(8)
    per_batch, per_sample = EWC(fisher_batches=1), EWC(fisher_batches=1, per_sample=True)
    ctx = make_ctx(module, stream, 0)
    torch.manual_seed(0)
    per_batch.on_task_end(ctx)
    torch.manual_seed(0)
    per_sample.on_task_end(ctx)
    total = lambda ewc: sum(f.sum() for f in ewc.fisher.values())  # noqa: E731
    assert total(per_sample) > total(per_batch)


def test_online_fisher_decays_and_the_anchor_moves(make_module, make_ctx, stream_of, fit_task):
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of, gamma=0.5)
    first = {n: f.clone() for n, f in ewc.fisher.items()}
    ctx = make_ctx(module, stream, 1, batch_size=12)  # one batch: the Fisher does not depend on shuffling
    fit_task(module, ewc, ctx, steps=2)  # trains with the penalty, then adds task 1's Fisher
    new = EWC(fisher_batches=2).estimate_fisher(ctx, module.trainable_parameters())
    for name, p in module.trainable_parameters().items():
        torch.testing.assert_close(ewc.fisher[name], 0.5 * first[name] + new[name])
        assert torch.equal(ewc.anchor[name], p.detach().float())


def test_lora_regularises_only_the_adapters(make_module, make_ctx, stream_of):
    from clbench.models import LoRA

    module, stream = make_module(lora=LoRA(r=2, alpha=4, dropout=0.0)), stream_of(8)
    ewc = EWC(fisher_batches=1)
    ewc.on_task_end(make_ctx(module, stream, 0))
    assert ewc.fisher and all("lora_" in name for name in ewc.fisher)


def test_pure_penalty_ignores_unknown_parameters():
    p = torch.ones(3, requires_grad=True)
    fisher, anchor = {"a": torch.full((3,), 2.0)}, {"a": torch.zeros(3)}
    assert ewc_penalty({"a": p, "b": torch.ones(2)}, fisher, anchor, 4.0).item() == pytest.approx(12.0)


def test_state_round_trip(make_module, make_ctx, stream_of):
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of)
    restored = EWC()
    restored.load_state_dict(ewc.state_dict())
    assert restored.fisher.keys() == ewc.fisher.keys() and restored.anchor.keys() == ewc.anchor.keys()
    for name in ewc.fisher:
        assert torch.equal(restored.fisher[name], ewc.fisher[name])
        assert torch.equal(restored.anchor[name], ewc.anchor[name])
    assert all(v.dtype == torch.float32 for v in ewc.state_dict().values())


@pytest.mark.parametrize("kwargs", [{"ewc_lambda": -1.0}, {"gamma": 1.5}, {"fisher_batches": 0}])
def test_invalid_options_name_themselves(kwargs):
    with pytest.raises(ValueError, match=f"ewc.{next(iter(kwargs))}"):
        EWC(**kwargs)
