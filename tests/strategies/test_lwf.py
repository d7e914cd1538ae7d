"""LwF: zero distillation loss at the previous model, positive once the model moves."""

import pytest
import torch

from strategies.lwf import LwF, answer_logits, distillation_kl


def batch_of(ctx):
    return next(iter(ctx.services.make_loader(ctx.task.train, False)))


def penalty_now(lwf, module, ctx, batch):
    module.train()
    outputs = module(batch)
    return lwf.training_penalty(ctx, batch, outputs)


def test_zero_at_the_previous_model_and_positive_after_it_moves(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(8, 8)
    lwf = LwF(alpha=1.0, temperature=2.0)
    ctx0 = make_ctx(module, stream, 0)
    lwf.on_task_start(ctx0)
    assert lwf.teacher is None and penalty_now(lwf, module, ctx0, batch_of(ctx0)) is None

    ctx1 = make_ctx(module, stream, 1)
    lwf.on_task_start(ctx1)
    batch = batch_of(ctx1)
    assert penalty_now(lwf, module, ctx1, batch).item() == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():
        module.model.lm_head.weight.add_(0.05 * torch.randn_like(module.model.lm_head.weight))
    moved = penalty_now(lwf, module, ctx1, batch)
    assert moved.item() > 1e-4
    assert moved.requires_grad and all(not p.requires_grad for p in lwf.teacher.parameters())


def test_teacher_is_frozen_through_a_real_task(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(8, 8)
    teachers = []

    class Recording(LwF):
        def on_task_start(self, ctx):
            super().on_task_start(ctx)
            teachers.append(self.teacher)

    lwf = Recording()
    fit_task(module, lwf, make_ctx(module, stream, 0), steps=2)
    after_task0 = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit_task(module, lwf, make_ctx(module, stream, 1), steps=3)
    assert teachers[0] is None and lwf.teacher is None  # none on task 0; dropped at task end
    teacher = dict(teachers[1].named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in after_task0.items())
    assert not torch.equal(module.model.lm_head.weight, teacher["model.embed_tokens.weight"])  # tied


def test_only_answer_positions_count():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3:] = 1
    labels[1, 4] = 2
    picked = answer_logits(logits, labels)
    assert picked.shape == (3, 7)
    torch.testing.assert_close(picked, torch.stack([logits[0, 2], logits[0, 3], logits[1, 3]]))
    other = logits.clone()
    other[:, 0] += 5.0  # a prompt position: no effect on the loss
    assert distillation_kl(answer_logits(other, labels), picked, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_the_formula():
    new, old, t = torch.randn(4, 6), torch.randn(4, 6), 3.0
    p, q = torch.softmax(old / t, -1), torch.softmax(new / t, -1)
    expected = t**2 * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_kl(new, old, t), expected)


def test_state_round_trip():
    lwf = LwF()
    assert lwf.state_dict() == {}
    lwf.load_state_dict({})  # the teacher is rebuilt from the restored model at the next task start


@pytest.mark.parametrize(
    ("kwargs", "option"), [({"alpha": -1.0}, "alpha"), ({"temperature": 0.0}, "temperature")]
)
def test_invalid_options_name_themselves(kwargs, option):
    with pytest.raises(ValueError, match=f"lwf.{option}"):
        LwF(**kwargs)
