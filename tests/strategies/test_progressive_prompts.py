"""Progressive Prompts: a prompt per task in front of the earlier ones, only the newest training,
the model and the earlier prompts bit-identical, all of them acting at inference."""

from __future__ import annotations

import pytest
import torch

from clbench.data.collate import position_ids_for
from clbench.distributed import fsdp_root
from clbench.errors import ConfigError
from clbench.models import LoRA
from strategies.progressive_prompts import ProgressivePrompts


def prepared(module, stream, make_ctx, **options) -> ProgressivePrompts:
    strategy = ProgressivePrompts(**options)
    strategy.prepare_model(make_ctx(module, stream, 0))
    strategy.setup(make_ctx(module, stream, 0))
    return strategy


def prompt(module, name: str) -> torch.Tensor:
    return fsdp_root(module.model).clbench_soft_prompts.prompts[name].detach().clone()


def backbone(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "soft_prompts" not in n}


def batch_of(ctx) -> dict:
    return next(iter(ctx.services.make_loader(ctx.task.train, False)))


def test_a_prompt_per_task_from_vocabulary_rows_inactive_until_its_task(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(8, 8, 8)
    pp = prepared(module, stream, make_ctx, prompt_length=4)
    assert module.prompt_names() == pp.prompts == [f"progressive_task{t}" for t in range(3)]
    table = module.model.get_input_embeddings().weight
    for name in pp.prompts:  # each row is some token's embedding (the paper's init from the vocabulary)
        rows = prompt(module, name)
        assert rows.shape == (4, table.shape[1])
        assert all((table == row).all(-1).any() for row in rows)
    assert not torch.equal(prompt(module, pp.prompts[0]), prompt(module, pp.prompts[1]))
    assert fsdp_root(module.model).clbench_soft_prompts.active == []  # the starting model is evaluated
    pp.on_task_start(make_ctx(module, stream, 2))
    assert fsdp_root(module.model).clbench_soft_prompts.active == pp.prompts[::-1]  # newest first
    assert list(module.trainable_parameters()) == ["clbench_soft_prompts.prompts.progressive_task2"]


def test_only_the_new_prompt_trains_and_every_prompt_acts(make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(8, 8, 8)
    pp = prepared(module, stream, make_ctx, prompt_length=3)
    weights, start = backbone(module), {n: prompt(module, n) for n in pp.prompts}
    trained = {}
    for t in range(3):
        fit_task(module, pp, make_ctx(module, stream, t), steps=3)
        trained[t] = prompt(module, pp.prompts[t])
        assert not torch.equal(trained[t], start[pp.prompts[t]])  # task t trained its prompt
        for i in range(t):  # the earlier prompts are exactly what their task left
            assert torch.equal(prompt(module, pp.prompts[i]), trained[i])
        for i in range(t + 1, 3):  # the later ones wait untouched
            assert torch.equal(prompt(module, pp.prompts[i]), start[pp.prompts[i]])
        assert all(torch.equal(p, weights[n]) for n, p in backbone(module).items())  # the model is frozen
    # at inference: the model in front of [P2; P1; P0], as built by hand
    module.eval()
    batch = batch_of(make_ctx(module, stream, 0))
    with torch.no_grad():
        logits = module(batch).logits
        rows = torch.cat([trained[2], trained[1], trained[0]]).expand(batch["input_ids"].shape[0], -1, -1)
        embeds = torch.cat([rows, module.model.get_input_embeddings()(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(len(rows), 9, dtype=torch.long), batch["attention_mask"]], 1)
        module.set_prompts([])
        by_hand = module.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_for(mask))
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(logits[real], by_hand.logits[:, 9:][real], rtol=0, atol=1e-6)
        module.set_prompts(pp.active(1))  # without task 2's prompt the answers' logits move
        assert not torch.allclose(module(batch).logits[real], logits[real], atol=1e-4)


def test_a_second_instance_on_the_same_model_adds_nothing(make_module, make_ctx, stream_of):
    module, stream = make_module(), stream_of(8, 8)
    first = prepared(module, stream, make_ctx)
    before = {n: prompt(module, n) for n in first.prompts}
    again = prepared(module, stream, make_ctx)  # as a resumed run's strategy meets its model
    assert again.prompts == first.prompts == module.prompt_names()
    assert all(torch.equal(prompt(module, n), t) for n, t in before.items())


def test_lora_is_refused_in_one_line(make_module, make_ctx, stream_of):
    module, stream = make_module(lora=LoRA(r=4, dropout=0.0)), stream_of(8, 8)
    with pytest.raises(ConfigError, match="unset model.lora"):
        ProgressivePrompts().prepare_model(make_ctx(module, stream, 0))


def test_options_are_checked():
    with pytest.raises(ValueError, match="prompt_length"):
        ProgressivePrompts(prompt_length=0)
