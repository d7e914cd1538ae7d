"""Multitask: every task trains on the union of all tasks seen so far."""

from collections import Counter

import pytest

from strategies.multitask import Multitask


def test_trains_on_every_task_seen(make_module, make_ctx, stream_of, task_rows):
    module, stream = make_module(), stream_of(8, 6, 4)
    multitask = Multitask()
    expected_per_task = [{"alpha": 8}, {"alpha": 8, "beta": 6}, {"alpha": 8, "beta": 6, "gamma": 4}]
    for t, expected in enumerate(expected_per_task):
        ctx = make_ctx(module, stream, t)
        loader = ctx.services.make_loader(multitask.training_examples(ctx, ctx.task.train), True)
        assert Counter(name for batch in loader for name in task_rows(batch, module.tokenizer)) == expected


def test_cap_per_task_is_a_fixed_subset(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(10, 10, 3)
    multitask = Multitask(max_per_task=4)
    at1 = multitask.training_examples(make_ctx(module, stream, 1), stream.tasks[1].train)
    at2 = multitask.training_examples(make_ctx(module, stream, 2), stream.tasks[2].train)
    assert len(at1) == 8 and len(at2) == 11
    assert at2[:8] == at1  # task 0's and task 1's subsets do not change as tasks arrive
    assert set(at1[:4]) <= set(stream.tasks[0].train)


def test_a_real_fit_sees_all_tasks(make_module, make_ctx, stream_of, fit_task, task_rows):
    module, stream = make_module(), stream_of(4, 4)
    seen: Counter = Counter()

    class Recording(Multitask):
        def training_penalty(self, ctx, batch, outputs):
            seen.update(task_rows(batch, module.tokenizer))

    fit_task(module, Recording(), make_ctx(module, stream, 1), steps=2)
    assert seen == {"alpha": 4, "beta": 4}


def test_state_round_trip():
    multitask = Multitask(max_per_task=3)
    assert multitask.state_dict() == {}
    multitask.load_state_dict({})


def test_invalid_options_name_themselves():
    with pytest.raises(ValueError, match="multitask.max_per_task"):
        Multitask(max_per_task=0)
