"""Replay: the buffer keeps earlier tasks' examples and later batches hold them in proportion."""

import random
from collections import Counter

import pytest
import torch

from clbench.data.tasks import Example
from strategies.replay import Replay, draw, per_task_quotas, reservoir_add


def finish_tasks(strategy, make_ctx, module, stream, upto: int) -> None:
    for t in range(upto):
        strategy.on_task_end(make_ctx(module, stream, t))


def test_ratio_buffer_keeps_that_share_of_each_finished_task(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(40, 20, 10)
    replay = Replay(past_task_ratio=0.25)
    finish_tasks(replay, make_ctx, module, stream, 2)
    assert replay.buffer_counts() == {0: 10, 1: 5}
    task0 = set(stream.tasks[0].train)
    assert all(ex in task0 for t, ex in replay.buffer if t == 0)


def test_batches_hold_earlier_tasks_in_the_configured_proportion(make_module, make_ctx, stream_of, task_rows):
    module, stream = make_module(), stream_of(40, 40, 40)
    replay = Replay(past_task_ratio=0.5, replay_ratio=0.25)
    finish_tasks(replay, make_ctx, module, stream, 2)
    ctx = make_ctx(module, stream, 2)
    examples = replay.training_examples(ctx, ctx.task.train)
    assert len(examples) == 50  # 40 current + 0.25 * 40 replayed
    batches = list(ctx.services.make_loader(examples, True))
    counts = Counter(name for batch in batches for name in task_rows(batch, module.tokenizer))
    assert counts["gamma"] == 40
    assert counts["alpha"] + counts["beta"] == 10
    assert counts["alpha"] > 0 and counts["beta"] > 0


def test_without_replay_ratio_the_whole_buffer_is_mixed_in(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(20, 8)
    replay = Replay(past_task_ratio=0.5)
    ctx0 = make_ctx(module, stream, 0)
    assert replay.training_examples(ctx0, ctx0.task.train) == ctx0.task.train  # nothing to replay yet
    replay.on_task_end(ctx0)
    ctx1 = make_ctx(module, stream, 1)
    examples = replay.training_examples(ctx1, ctx1.task.train)
    assert examples[:8] == ctx1.task.train and sorted(examples[8:], key=str) == sorted(
        (ex for _, ex in replay.buffer), key=str
    )


def test_fixed_buffer_per_task_rebalances_quotas(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(20, 20, 20)
    replay = Replay(buffer_size=9)
    finish_tasks(replay, make_ctx, module, stream, 1)
    assert replay.buffer_counts() == {0: 9}
    before = [ex for _, ex in replay.buffer]
    finish_tasks(replay, make_ctx, module, stream, 3)
    assert replay.buffer_counts() == {0: 3, 1: 3, 2: 3}
    assert [ex for t, ex in replay.buffer if t == 0] == before[:3]  # shrinking keeps a subset


def test_reservoir_keeps_capacity_and_counts_the_stream(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(30, 30)
    replay = Replay(buffer_size=12, selection="reservoir")
    finish_tasks(replay, make_ctx, module, stream, 2)
    assert len(replay.buffer) == 12 and replay.seen == 60
    assert set(replay.buffer_counts()) == {0, 1}


def test_reservoir_sampling_is_uniform_over_the_stream():
    rng, hits = random.Random(0), Counter()
    items = [(0, Example(str(i), "")) for i in range(20)]
    for _ in range(2000):
        buffer: list = []
        reservoir_add(buffer, items, 5, 0, rng)
        hits.update(int(ex.prompt) for _, ex in buffer)
    assert min(hits.values()) > 350 and max(hits.values()) < 650  # expected 500 each


def test_helpers():
    assert per_task_quotas(10, 3) == [4, 3, 3]
    pool = [(0, Example(str(i), "")) for i in range(3)]
    out = draw(pool, 7, random.Random(0))
    assert len(out) == 7 and sorted(Counter(out).values()) == [2, 2, 3]  # two whole copies + one more


def test_state_round_trip(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(20, 20)
    replay = Replay(buffer_size=7, selection="reservoir")
    stream.tasks[0].train[0] = Example('alpha — ünïcode "quoted"', "one")
    finish_tasks(replay, make_ctx, module, stream, 2)
    restored = Replay(buffer_size=7, selection="reservoir")
    restored.load_state_dict(replay.state_dict())
    assert restored.buffer == replay.buffer and restored.seen == replay.seen
    assert all(v.dtype == torch.uint8 for v in replay.state_dict().values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"past_task_ratio": 0},
        {"past_task_ratio": 1.5},
        {"buffer_size": 0},
        {"replay_ratio": 0},
        {"selection": "fifo"},
    ],
)
def test_invalid_options_name_themselves(kwargs):
    with pytest.raises(ValueError, match=f"replay.{next(iter(kwargs))}"):
        Replay(**kwargs)
