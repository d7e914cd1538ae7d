"""OGD: the stored directions are orthonormal and span the earlier tasks' output gradients, and every
step's update is orthogonal to all of them."""

import random

import pytest
import torch

from clbench.gradients import grads_of, rows
from strategies.ogd import OGD, ground_truth_logit


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors.values()])


def after_two_tasks(make_module, make_ctx, stream_of, fit_task, per_task: int = 3):
    ogd = OGD(directions_per_task=per_task)
    module, stream = make_module(), stream_of(8, 8, 8)
    for t in (0, 1):
        fit_task(module, ogd, make_ctx(module, stream, t), steps=2)
    return ogd, module, stream


def test_directions_are_orthonormal_and_span_the_stored_examples_gradients(
    make_module, make_ctx, stream_of, fit_task
):
    ogd, module, stream = after_two_tasks(make_module, make_ctx, stream_of, fit_task)
    basis = torch.stack([flat(v) for v in ogd.basis])
    assert basis.shape[0] == 6 and ogd.kept == {"alpha": 3, "beta": 3}
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    # the last task's output gradient (at the final weights) lies in the span: its residual is ~0
    ctx = make_ctx(module, stream, 1)
    chosen = random.Random("ogd-0-1").sample(stream.tasks[1].train, 3)
    batch = next(iter(ctx.services.make_loader(chosen[:1], False)))
    module.eval()
    g = flat(
        grads_of(ground_truth_logit(module(batch).logits, batch["labels"]), module.trainable_parameters())
    )
    residual = g - basis.T @ (basis @ g)
    assert residual.norm() < 1e-4 * g.norm()


def test_the_update_is_orthogonal_to_every_stored_direction(make_module, make_ctx, stream_of, fit_task):
    ogd, module, stream = after_two_tasks(make_module, make_ctx, stream_of, fit_task)
    params = module.trainable_parameters()
    torch.manual_seed(2)
    for p in params.values():
        p.grad = torch.randn_like(p)
    g = flat({n: p.grad for n, p in params.items()})
    ogd.on_before_optimizer_step(make_ctx(module, stream, 2), None)
    z = flat({n: p.grad for n, p in params.items()})
    basis = torch.stack([flat(v) for v in ogd.basis])
    assert (basis @ z).abs().max() < 1e-5 * g.norm()
    torch.testing.assert_close(z, g - basis.T @ (basis @ g), rtol=1e-5, atol=1e-6)


def test_training_a_later_task_moves_the_stored_outputs_less_than_seqft(
    make_module, make_ctx, stream_of, fit_task
):
    """To first order a projected step leaves each stored example's output (its ground-truth logit)
    where it was; AdamW rescales the projected gradient per element, so only "less than without"
    holds, not "unchanged"."""
    from strategies.seqft import SeqFT

    def moved(project: bool) -> float:
        ogd, module, stream = after_two_tasks(make_module, make_ctx, stream_of, fit_task, per_task=8)
        batches = [
            b
            for t in (0, 1)
            for b in make_ctx(module, stream, t).services.make_loader(stream.tasks[t].train, False)
        ]

        def outputs() -> torch.Tensor:
            module.eval()
            with torch.no_grad():
                return torch.stack(
                    [
                        ground_truth_logit(module(row).logits, row["labels"])
                        for b in batches
                        for row in rows(b)
                    ]
                )

        before = outputs()
        fit_task(module, ogd if project else SeqFT(), make_ctx(module, stream, 2), steps=3)
        return (outputs() - before).abs().mean().item()

    assert moved(True) < 0.75 * moved(False)  # measured: 0.57


def test_state_round_trips(make_module, make_ctx, stream_of, fit_task):
    ogd, _, _ = after_two_tasks(make_module, make_ctx, stream_of, fit_task)
    again = OGD()
    again.load_state_dict(ogd.state_dict())
    assert again.kept == ogd.kept and len(again.basis) == len(ogd.basis)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(again.basis, ogd.basis, strict=True) for n in a)


def test_bad_settings_name_the_option():
    with pytest.raises(ValueError, match="ogd.directions_per_task"):
        OGD(directions_per_task=0)
