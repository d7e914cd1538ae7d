"""MbPA++: keys from the frozen starting model, the K nearest memory examples, one adaptation step as
its formula says, the trained weights back bit for bit after every answer, sparse replay's count."""

import pytest
import torch

from clbench.encoding import mean_last_hidden
from clbench.gradients import mean_loss_grads
from clbench.strategy import kept_batches
from strategies.mbpa import MbPA, nearest


def test_nearest_is_by_euclidean_distance_ties_to_the_earlier_row():
    keys = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    assert nearest(keys, torch.tensor([0.1, 0.0]), 3) == [0, 2, 3]
    assert nearest(keys, torch.tensor([0.0, 0.0]), 3) == [0, 2, 3]  # 2 and 3 tie at 1: the earlier first


def after_two_tasks(make_module, make_ctx, stream_of, fit_task, **kwargs):
    module, stream = make_module(), stream_of(8, 8, 8)
    mbpa = MbPA(**{"neighbours": 3, "adapt_steps": 2, "adapt_lr": 0.5, **kwargs})
    mbpa.setup(make_ctx(module, stream, 0))
    for t in (0, 1):
        fit_task(module, mbpa, make_ctx(module, stream, t), steps=2)
    return module, stream, mbpa


def prompts_of(ctx, task_index: int) -> dict:
    return next(iter(ctx.services.make_prompt_loader(ctx.stream.tasks[task_index].train[:2])))


def test_memory_is_keyed_by_the_frozen_starting_model(make_module, make_ctx, stream_of, fit_task):
    module, stream, mbpa = after_two_tasks(make_module, make_ctx, stream_of, fit_task)
    assert [t for t, _ in mbpa.memory] == [0] * 8 + [1] * 8
    start = make_module()  # the same seed: the starting weights
    ctx = make_ctx(module, stream, 1)
    batch = next(iter(ctx.services.make_prompt_loader(stream.tasks[1].train)))
    expected = mean_last_hidden(start.model.eval(), batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(mbpa.keys[8:12], expected, rtol=1e-5, atol=1e-5)


def test_each_input_adapts_on_its_k_nearest_and_the_trained_weights_come_back(
    make_module, make_ctx, stream_of, fit_task, monkeypatch
):
    module, stream, mbpa = after_two_tasks(make_module, make_ctx, stream_of, fit_task)
    ctx = make_ctx(module, stream, 1)
    module.attach(mbpa, ctx)
    trained = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
    batch = prompts_of(ctx, 0)
    queries = mean_last_hidden(mbpa.encoder, batch["input_ids"], batch["attention_mask"])
    expected = [torch.cdist(q[None].double(), mbpa.keys.double())[0].argsort()[:3].tolist() for q in queries]
    adapted, real = [], mbpa.adapted

    def recording(ctx, examples, then, *args):
        def answer_and_check(row):  # the examples it adapted on, and whether the weights moved
            moved = any(not torch.equal(p, trained[n]) for n, p in module.trainable_parameters().items())
            adapted.append(([mbpa.memory.index(e) for e in examples], moved))
            return then(row)

        return real(ctx, examples, answer_and_check, *args)

    monkeypatch.setattr(mbpa, "adapted", recording)
    module.eval()
    with torch.inference_mode():  # as Lightning's predict loop calls it
        texts = mbpa.answer(ctx, batch)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert [sorted(i) for i, _ in adapted] == [sorted(i) for i in expected]
    assert all(moved for _, moved in adapted)
    for n, p in module.trainable_parameters().items():
        assert torch.equal(p, trained[n]), n  # bit for bit
    assert mbpa.cost["beta"]["prompts"] == 2 and mbpa.cost["beta"]["adapt_s"] > 0


def test_one_adaptation_step_is_theta_minus_lr_times_the_neighbours_gradient(
    make_module, make_ctx, stream_of, fit_task
):
    module, stream, mbpa = after_two_tasks(make_module, make_ctx, stream_of, fit_task, adapt_steps=1)
    ctx = make_ctx(module, stream, 1)
    params = module.trainable_parameters()
    kept = mbpa.memory[:3]
    grads = mean_loss_grads(module, kept_batches(ctx, kept), params)
    expected = {n: p.detach() - 0.5 * grads[n] for n, p in params.items()}
    seen = {}
    mbpa.adapted(ctx, kept, lambda: seen.update({n: p.detach().clone() for n, p in params.items()}))
    for n in params:
        torch.testing.assert_close(seen[n], expected[n], rtol=1e-5, atol=1e-6)


def test_without_memory_or_steps_the_model_answers_itself(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(8, 8)
    mbpa = MbPA()
    mbpa.setup(make_ctx(module, stream, 0))
    ctx = make_ctx(module, stream, 0)
    assert mbpa.answer(ctx, prompts_of(ctx, 0)) is None  # nothing in memory yet
    module, stream, mbpa = after_two_tasks(make_module, make_ctx, stream_of, fit_task, adapt_steps=0)
    assert mbpa.answer(make_ctx(module, stream, 1), prompts_of(make_ctx(module, stream, 1), 0)) is None


def test_sparse_replay_adds_the_rate_of_memory_examples(make_module, make_ctx, stream_of, fit_task):
    module, stream, mbpa = after_two_tasks(make_module, make_ctx, stream_of, fit_task, replay_rate=0.25)
    ctx = make_ctx(module, stream, 2)
    mixed = mbpa.training_examples(ctx, stream.tasks[2].train)
    assert len(mixed) == 8 + 2
    assert all(ex in [e for _, e in mbpa.memory] for ex in mixed[8:])
    assert mbpa.training_examples(ctx, stream.tasks[2].train) == mixed  # seeded per task


def test_state_round_trips(make_module, make_ctx, stream_of, fit_task):
    _, _, mbpa = after_two_tasks(make_module, make_ctx, stream_of, fit_task)
    again = MbPA()
    again.load_state_dict(mbpa.state_dict())
    assert again.memory == mbpa.memory and torch.equal(again.keys, mbpa.keys)


@pytest.mark.parametrize(
    "bad", [{"replay_rate": -1}, {"neighbours": 0}, {"adapt_steps": -1}, {"adapt_lr": 0}]
)
def test_bad_settings_name_the_option(bad):
    with pytest.raises(ValueError, match=f"mbpa.{next(iter(bad))}"):
        MbPA(**bad)
