"""EWC: the penalty is zero at the anchor, its gradient is lambda F (theta - theta*), Fisher is right;
the gradient added in the optimizer-step hook trains exactly as the penalty in the loss did."""

import pytest
import torch

from clbench.gradients import empirical_fisher
from clbench.testing import quiet_trainer
from strategies.ewc import EWC, ewc_penalty
from strategies.seqft import SeqFT


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


def displaced(module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))


def test_penalty_gradient_is_lambda_fisher_times_displacement(make_module, make_ctx, stream_of):
    """The hook adds lambda F (theta - theta*) to each gradient (the penalty's autograd gradient),
    and the value the loss carries is the penalty's, with no graph."""
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of, ewc_lambda=3.0)
    params = module.trainable_parameters()
    displaced(module)
    ctx = make_ctx(module, stream, 1)
    penalty = ewc.training_penalty(ctx, {}, None)
    assert not penalty.requires_grad
    value = sum(1.5 * (ewc.fisher[n] * (p.detach() - ewc.anchor[n]) ** 2).sum() for n, p in params.items())
    torch.testing.assert_close(penalty, value)
    reference = ewc_penalty(params, ewc.fisher, ewc.anchor, 3.0)  # the penalty in the graph
    torch.testing.assert_close(reference.detach(), value)
    autograd = torch.autograd.grad(reference, list(params.values()))
    before = {name: torch.randn_like(p) for name, p in params.items()}
    for name, p in params.items():
        p.grad = before[name].clone()
    ewc.on_before_optimizer_step(ctx, None)
    for (name, p), g in zip(params.items(), autograd, strict=True):
        expected = 3.0 * ewc.fisher[name] * (p.detach() - ewc.anchor[name])
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(p.grad, before[name] + expected, rtol=1e-6, atol=1e-9)


class GraphEWC(EWC):
    """The former mechanism, for reference: the penalty in every micro-batch's loss, its gradient
    through autograd, nothing added in the hook."""

    def training_penalty(self, ctx, batch, outputs):
        return ewc_penalty(ctx.module.trainable_parameters(), self.fisher, self.anchor, self.ewc_lambda)

    def on_before_optimizer_step(self, ctx, optimizer):
        pass


def recording(cls):
    """`cls` that keeps every step's final gradients (what Lightning then clips and AdamW uses)."""

    class Recording(cls):
        def on_before_optimizer_step(self, ctx, optimizer):
            super().on_before_optimizer_step(ctx, optimizer)
            self.grads.append({n: p.grad.clone() for n, p in ctx.module.trainable_parameters().items()})

    return Recording


@pytest.mark.parametrize(("accumulate", "clip"), [(1, None), (2, None), (1, 0.05), (2, 0.05)])
def test_steps_equal_the_penalty_in_the_loss(make_module, make_ctx, stream_of, accumulate, clip):
    """Three optimizer steps (momentum carried, the pull growing as the weights leave the anchor):
    the gradient added in the hook gives the gradients and weights of the penalty in the loss, with
    gradient accumulation (added once per step; 3 batches an epoch, so with 2 accumulated the second
    step has one micro-batch and half the pull, as the loss term gave it) and clipping (inside the
    clipped norm)."""
    _, stream, fitted = ewc_after_task0(make_module, make_ctx, stream_of, ewc_lambda=1e4)
    grads, weights = {}, {}
    for label, cls in (("graph", GraphEWC), ("hook", EWC), ("seqft", SeqFT)):
        module = make_module()
        strategy = recording(cls)() if cls is not SeqFT else cls()
        if cls is not SeqFT:
            strategy.ewc_lambda, strategy.grads = 1e4, []
            strategy.load_state_dict(fitted.state_dict())
        ctx = make_ctx(module, stream, 1)
        module.attach(strategy, ctx)
        strategy.on_task_start(ctx)
        torch.manual_seed(1)  # the same shuffled batches
        trainer = quiet_trainer(3, accumulate, clip)
        trainer.fit(module, train_dataloaders=ctx.services.make_loader(ctx.task.train, True))
        grads[label] = getattr(strategy, "grads", None)
        weights[label] = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
    assert len(grads["hook"]) == len(grads["graph"]) == 3
    for hook, graph in zip(grads["hook"], grads["graph"], strict=True):
        for name in graph:
            scale = graph[name].abs().max().item()  # the loss's and the pull's gradients may cancel
            torch.testing.assert_close(hook[name], graph[name], rtol=1e-5, atol=1e-6 * scale)
    last = grads["hook"][-1]
    if clip is not None:  # clipping really acted
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in last.values()])) > 10 * clip
    pulled = max((weights["hook"][n] - weights["seqft"][n]).abs().max().item() for n in last)
    assert pulled > 1e-3  # the penalty changes these steps
    for name in weights["graph"]:
        torch.testing.assert_close(weights["hook"][name], weights["graph"][name], rtol=1e-5, atol=1e-6)


def test_value_is_measured_every_penalty_every_steps(make_module, make_ctx, stream_of):
    """train/penalty is measured on steps 0, k, 2k, ... of a task (on the first micro-batch) and
    repeated in between; a new task measures again at once."""
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of, ewc_lambda=5.0)
    ewc.penalty_every = 2
    ctx = make_ctx(module, stream, 1)
    params = module.trainable_parameters()
    ewc.on_task_start(ctx)
    seen = []
    for step in range(5):
        displaced(module) if step else None
        for p in params.values():
            p.grad = torch.zeros_like(p)
        seen.append([ewc.training_penalty(ctx, {}, None).item() for _ in range(2)])  # two micro-batches
        ewc.on_before_optimizer_step(ctx, None)
        exact = ewc_penalty(params, ewc.fisher, ewc.anchor, 5.0).item()
        assert seen[-1][0] == seen[-1][1]
        assert (seen[-1][0] == pytest.approx(exact, rel=1e-6)) == (step % 2 == 0)
    assert seen[0][0] == 0.0 and seen[1][0] == 0.0 and seen[2][0] > 0.0 and seen[3][0] == seen[2][0]
    ewc.on_task_start(ctx)
    assert ewc.training_penalty(ctx, {}, None).item() == pytest.approx(exact, rel=1e-6)


def test_a_parameter_the_loss_does_not_reach_is_still_pulled(make_module, make_ctx, stream_of):
    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of, ewc_lambda=2.0)
    displaced(module)
    params = module.trainable_parameters()
    for p in params.values():
        p.grad = None
    ewc.on_before_optimizer_step(make_ctx(module, stream, 1), None)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, 2.0 * ewc.fisher[name] * (p.detach() - ewc.anchor[name]))


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


def test_the_fisher_scale_is_recorded_after_each_task(make_module, make_ctx, stream_of, tmp_path):
    """fisher.json: the accumulated Fisher's mean over every element and lambda x mean, per task."""
    import json

    module, stream, ewc = ewc_after_task0(make_module, make_ctx, stream_of, ewc_lambda=400.0)
    fisher = torch.cat([f.flatten() for f in ewc.fisher.values()])
    logged = json.loads((tmp_path / "ewc" / "fisher.json").read_text())
    entry = logged[stream.tasks[0].name]
    assert entry["elements"] == fisher.numel()
    assert entry["mean"] == pytest.approx(fisher.double().mean().item(), rel=1e-6)
    assert entry["lambda_times_mean"] == pytest.approx(400.0 * entry["mean"], rel=1e-9)
    assert entry["share_above_1e-10"] == pytest.approx((fisher > 1e-10).double().mean().item())
    resumed = EWC(fisher_batches=2)  # a resumed run's strategy: its log starts empty
    resumed.load_state_dict(ewc.state_dict())
    resumed.on_task_end(make_ctx(module, stream, 1))
    assert list(json.loads((tmp_path / "ewc" / "fisher.json").read_text())) == [t.name for t in stream.tasks]


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
    new = empirical_fisher(ctx, module.trainable_parameters(), batches=2)
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
