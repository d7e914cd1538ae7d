"""L2P: each input's frozen-encoder query picks the prompts of the nearest keys (cosine), those prompts go
in front of it, the keys are pulled toward the queries that chose them, and the model never moves."""

from __future__ import annotations

import json

import pytest
import torch

from clbench.data.collate import position_ids_for
from clbench.distributed import fsdp_root
from clbench.errors import ConfigError
from clbench.models import LoRA
from strategies import l2p
from strategies.l2p import KEYS, L2P, POOL, choose

M, LP, N = 6, 2, 2  # pool size, prompt length, prompts per input


def prepared(module, stream, make_ctx, t: int = 0, **options) -> L2P:
    options = {"pool_size": M, "prompt_length": LP, "top_n": N, **options}
    strategy = L2P(**options)
    strategy.prepare_model(make_ctx(module, stream, 0))
    strategy.setup(make_ctx(module, stream, 0))
    strategy.on_task_start(make_ctx(module, stream, t))
    return strategy


def soft(module, name: str) -> torch.nn.Parameter:
    return fsdp_root(module.model).clbench_soft_prompts.prompts[name]


def spread_keys(module, seed: int = 3) -> None:
    """Keys that split the toy inputs between prompts (the uniform start often gives every input the
    same top N): each key a random mix of the starting model's queries."""
    with torch.no_grad():
        soft(module, KEYS).copy_(
            torch.randn(M, soft(module, KEYS).shape[1], generator=torch.Generator().manual_seed(seed))
        )


def batch_of(ctx, answers: bool = True) -> dict:
    services = ctx.services
    loader = (
        services.make_loader(ctx.task.train, False)
        if answers
        else services.make_prompt_loader(ctx.task.train)
    )
    return next(iter(loader))


def queries_by_hand(start, ids, mask, over) -> torch.Tensor:
    """The starting model's last hidden states averaged over the `over` tokens, computed here."""
    with torch.no_grad():
        out = start.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), output_hidden_states=True
        )
    h, w = out.hidden_states[-1].double(), over.double().unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1)


def choice_by_hand(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    sim = torch.nn.functional.cosine_similarity(queries.double()[:, None], keys.double()[None], dim=-1)
    return torch.topk(sim, N, dim=1).indices.sort(dim=1).values


def forward_in_training(module, batch):
    module.train()
    with torch.enable_grad():
        return module(batch)


def test_a_pool_and_its_keys_are_model_parameters_and_only_they_train(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(8, 8)
    prepared(module, stream, make_ctx)
    assert module.prompt_names() == [POOL, KEYS]
    table = module.model.get_input_embeddings().weight
    pool, keys = soft(module, POOL), soft(module, KEYS)
    assert pool.shape == (M * LP, table.shape[1]) and keys.shape == (M, table.shape[1])
    assert all((table == row).all(-1).any() for row in pool.detach())  # vocabulary rows
    assert keys.abs().max() <= 1 and keys.std() > 0.3  # uniform in [-1, 1]
    assert sorted(module.trainable_parameters()) == [
        f"clbench_soft_prompts.prompts.{KEYS}",
        f"clbench_soft_prompts.prompts.{POOL}",
    ]
    again = L2P(pool_size=M, prompt_length=LP, top_n=N, key_lambda=0.0)
    again.prepare_model(make_ctx(module, stream, 0))  # as a resumed run's strategy: nothing added
    again.setup(make_ctx(module, stream, 0))
    again.on_task_start(make_ctx(module, stream, 1))
    assert module.prompt_names() == [POOL, KEYS]
    assert list(module.trainable_parameters()) == [f"clbench_soft_prompts.prompts.{POOL}"]  # no pull


def test_each_input_takes_the_prompts_of_the_keys_nearest_its_query(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(12, 12)
    start = make_module().eval()  # the starting model, built again: the encoder, independently
    strategy = prepared(module, stream, make_ctx)
    spread_keys(module)
    ctx = make_ctx(module, stream, 0, batch_size=12)
    batch = batch_of(ctx)
    forward_in_training(module, batch)
    seen_batch, queries, chosen = strategy._chosen
    assert seen_batch is batch
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100)  # the answer never enters the query
    expected_q = queries_by_hand(start, batch["input_ids"], batch["attention_mask"], prompt)
    torch.testing.assert_close(queries.double(), expected_q, rtol=1e-5, atol=1e-5)
    expected = choice_by_hand(expected_q, soft(module, KEYS).detach())
    assert torch.equal(chosen, expected)
    assert len({tuple(r) for r in expected.tolist()}) > 1  # the rows did not all choose alike
    # evaluation sees the prompt alone: the same queries, the same choice
    prompts_only = batch_of(ctx, answers=False)
    q_alone = queries_by_hand(
        start, prompts_only["input_ids"], prompts_only["attention_mask"], prompts_only["attention_mask"]
    )
    torch.testing.assert_close(q_alone, expected_q, rtol=1e-5, atol=1e-5)
    assert torch.equal(choice_by_hand(q_alone, soft(module, KEYS).detach()), expected)


def test_the_chosen_prompts_are_in_front_of_the_input(make_module, make_ctx, stream_of):
    """The prompted forward (evaluation: prompt only) equals an inputs_embeds forward with the chosen
    prompts' rows in front, built here; another choice gives other logits."""
    module, stream = make_module(), stream_of(12, 12)
    start = make_module().eval()
    prepared(module, stream, make_ctx)
    spread_keys(module)
    with torch.no_grad():
        soft(module, POOL).add_(torch.randn_like(soft(module, POOL)))  # prompts that clearly act
    batch = batch_of(make_ctx(module, stream, 1, batch_size=12), answers=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    choice = choice_by_hand(queries_by_hand(start, ids, mask, mask), soft(module, KEYS).detach())
    module.eval()
    with torch.no_grad():
        logits = module({"input_ids": ids, "attention_mask": mask}).logits
    pool = soft(module, POOL).detach().view(M, LP, -1)

    def by_hand(rows: torch.Tensor) -> torch.Tensor:
        lm = fsdp_root(module.model)
        embeds = torch.cat([rows, lm.get_input_embeddings()(ids)], 1)
        full = torch.cat([torch.ones(len(ids), rows.shape[1], dtype=mask.dtype), mask], 1)
        with torch.no_grad():
            return start.model(
                inputs_embeds=embeds, attention_mask=full, position_ids=position_ids_for(full)
            ).logits[:, rows.shape[1] :]

    real = mask.bool()
    expected = by_hand(pool[choice].flatten(1, 2))  # prompt after prompt, in index order
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-5)
    swapped = by_hand(pool[choice.flip(1)].flatten(1, 2))  # the same prompts in the other order
    assert not torch.allclose(logits[real], swapped[real], atol=1e-3)


def test_the_key_loss_is_lambda_times_the_mean_summed_cosine_distance(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(12, 12)
    start = make_module().eval()
    strategy = prepared(module, stream, make_ctx, key_lambda=0.7)
    spread_keys(module)
    ctx = make_ctx(module, stream, 0, batch_size=12)
    batch = batch_of(ctx)
    outputs = forward_in_training(module, batch)
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100)
    q = queries_by_hand(start, batch["input_ids"], batch["attention_mask"], prompt)
    keys = soft(module, KEYS)
    choice = choice_by_hand(q, keys.detach())
    expected = (
        0.7
        * sum(
            sum(
                1 - torch.nn.functional.cosine_similarity(q[b], keys.detach()[i].double(), dim=0)
                for i in choice[b]
            )
            for b in range(len(q))
        )
        / len(q)
    )
    with torch.enable_grad():
        penalty = strategy.training_penalty(ctx, batch, outputs)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-5, atol=1e-6)
    penalty.backward()
    pulled = keys.grad.abs().sum(1) > 0
    assert pulled.tolist() == [i in choice.flatten().tolist() for i in range(M)]  # only chosen keys move
    assert strategy._chosen is None  # used once: a later forward (evaluation) cannot reuse it


def test_only_the_chosen_prompts_get_a_gradient(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(12, 12)
    strategy = prepared(module, stream, make_ctx)
    spread_keys(module)
    batch = batch_of(make_ctx(module, stream, 0, batch_size=12))
    forward_in_training(module, batch).loss.backward()
    chosen = set(strategy._chosen[2].flatten().tolist())
    grad = soft(module, POOL).grad.view(M, LP, -1).abs().sum((1, 2))
    assert chosen != set(range(M))
    assert [bool(g > 0) for g in grad] == [i in chosen for i in range(M)]


def test_training_moves_the_pool_and_keys_only_and_records_the_choices(
    make_module, make_ctx, stream_of, fit_task, tmp_path
):
    module, stream = make_module(), stream_of(12, 12)
    strategy = L2P(pool_size=M, prompt_length=LP, top_n=N)
    strategy.prepare_model(make_ctx(module, stream, 0))
    strategy.setup(make_ctx(module, stream, 0))
    spread_keys(module)
    backbone = {n: p.detach().clone() for n, p in module.model.named_parameters() if "soft_prompts" not in n}
    for t in range(2):
        pool, keys = soft(module, POOL).detach().clone(), soft(module, KEYS).detach().clone()
        counts_before = strategy.selection.sum(0) if len(strategy.selection) else torch.zeros(M)
        fit_task(module, strategy, make_ctx(module, stream, t), steps=3)
        assert all(torch.equal(p, backbone[n]) for n, p in module.model.named_parameters() if n in backbone)
        row = strategy.selection[t]
        assert row.sum() == 12 * N  # 3 steps of 4 rows, N prompts each
        moved = (soft(module, POOL).detach() != pool).view(M, LP, -1).any(-1).any(-1)
        keys_moved = (soft(module, KEYS).detach() != keys).any(-1)
        if t == 0:  # never chosen yet: no gradient and no moments, so bit-identical
            assert moved.tolist() == (row > 0).tolist() and keys_moved.tolist() == (row > 0).tolist()
        else:  # chosen in task 0 or now: AdamW's carried moments may move it; the rest stay put
            assert not moved[(row + counts_before) == 0].any()
    record = json.loads((tmp_path / "l2p" / "selection.json").read_text())
    assert record["chosen_while_training"] == {
        task.name: strategy.selection[t].long().tolist() for t, task in enumerate(stream.tasks)
    }
    resumed = L2P(pool_size=M, prompt_length=LP, top_n=N)  # the counts are state: a resume keeps them
    resumed.load_state_dict(strategy.state_dict())
    assert torch.equal(resumed.selection, strategy.selection)


def test_diversified_selection_scales_each_distance_by_the_earlier_tasks_frequency(
    make_module, make_ctx, stream_of, fit_task, monkeypatch
):
    module, stream = make_module(), stream_of(12, 12)
    start = make_module().eval()
    strategy = L2P(pool_size=M, prompt_length=LP, top_n=N, diversify=True)
    strategy.prepare_model(make_ctx(module, stream, 0))
    strategy.setup(make_ctx(module, stream, 0))
    spread_keys(module)
    fit_task(module, strategy, make_ctx(module, stream, 0), steps=3)  # task 0: plain top-N
    frequency = strategy.selection[0] / strategy.selection[0].sum()
    assert (frequency == 0).sum() >= N  # prompts task 0 never chose, which task 1 should take
    strategy.on_task_start(make_ctx(module, stream, 1))
    ctx = make_ctx(module, stream, 1, batch_size=12)
    batch = batch_of(ctx)
    forward_in_training(module, batch)
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100)
    q = queries_by_hand(start, batch["input_ids"], batch["attention_mask"], prompt)
    keys = soft(module, KEYS).detach().double()
    distance = 1 - torch.nn.functional.cosine_similarity(q[:, None], keys[None], dim=-1)
    expected = torch.argsort(distance * frequency.double(), dim=1, stable=True)[:, :N].sort(dim=1).values
    assert torch.equal(strategy._chosen[2], expected)
    assert not torch.equal(expected, choice_by_hand(q, keys))  # the scaling changed the choice
    strategy._chosen = strategy._batch = None
    module.eval()  # evaluation: plain cosine, whatever was chosen in training
    seen = []
    monkeypatch.setattr(l2p, "choose", lambda *args: seen.append(args[3:]) or choose(*args))
    with torch.no_grad():
        module({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert seen == [(None,)] and strategy._chosen is None


def test_evaluation_forwards_leave_no_training_choice_behind(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(8, 8)
    strategy = prepared(module, stream, make_ctx)
    ctx = make_ctx(module, stream, 0)
    module.eval()
    texts = module.generate(batch_of(ctx, answers=False))
    assert len(texts) == 4 and strategy._chosen is None and strategy._counts.sum() == 0
    with pytest.raises(RuntimeError, match="chose no prompts"):  # a penalty without its forward
        strategy.training_penalty(ctx, batch_of(ctx), None)


def test_lora_is_refused_in_one_line(make_module, make_ctx, stream_of):
    module, stream = make_module(lora=LoRA(r=4, dropout=0.0)), stream_of(8, 8)
    with pytest.raises(ConfigError, match="unset model.lora"):
        L2P().prepare_model(make_ctx(module, stream, 0))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"pool_size": 0}, "pool_size"),
        ({"prompt_length": 0}, "prompt_length"),
        ({"top_n": 11}, "top_n"),
        ({"top_n": 0}, "top_n"),
        ({"key_lambda": -1.0}, "key_lambda"),
    ],
)
def test_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        L2P(**options)
