"""Every registered strategy, saved and restored into a fresh instance (through safetensors, as the
checkpoints and the resume state store it), behaves on the next task exactly as the original: the
examples it trains on, the penalty it adds, the gate it applies, the parameters it lets train."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from clbench.models import LoRA
from strategies import REGISTRY, load

OPTIONS = {
    "attribution": {"correct_threshold": 0.0, "max_prior_samples": 4, "prior_dtype": "float32"},
    "attribution_merge": {"correct_threshold": 0.0, "max_prior_samples": 4, "prior_dtype": "float32"},
    "ewc": {"fisher_batches": 2},
    "freeze": {"lower_layers": 1},
    "replay": {"past_task_ratio": 0.5},
    "ssr": {"demonstrations": 4, "shots": 2, "candidates": 8, "synthetic": 4},
    "gem": {"memory_per_task": 4, "margin": 0.5},
    "agem": {"memory_per_task": 4},
    "ogd": {"directions_per_task": 2},
    "mbpa": {"replay_rate": 0.5},
    "fisher_merge": {"fisher_batches": 2},
}
MODULE = {"o_lora": {"lora": LoRA(r=4, dropout=0.0)}}  # an adapter per task beside model.lora's
# the others keep nothing between tasks (o_lora's adapters and the soft prompts are model weights), or,
# gem / agem, show their memory only on a gradient that raises its loss (tests/strategies/test_gem.py),
# or, lfpt5, keep pseudo examples this vocabulary cannot write: it has no marker words
# (tests/strategies/test_lfpt5.py restores written ones)
# or, the merges (strategies/merging.py), train as seqft and act at the task's end
# (tests/strategies/test_merging.py restores their state into the next task's merge)
STATEFUL = {"attribution", "ewc", "replay", "ssr", "ogd", "mbpa"}


def build(name: str, tmp_path) -> object:
    options = dict(OPTIONS.get(name, {}))
    if name.startswith("attribution"):
        options["prior_dir"] = str(tmp_path / "priors")
    return load(name)(**options)


def behaviour(strategy, module, ctx) -> dict:
    """What the strategy does on task t: examples, trainable set, penalty and gated gradients."""
    for p in module.model.parameters():
        p.requires_grad_(True)
    strategy.on_task_start(ctx)
    examples = strategy.training_examples(ctx, ctx.task.train)
    batch = next(iter(ctx.services.make_loader(examples, False)))
    outputs = module(batch)
    penalty = strategy.training_penalty(ctx, batch, outputs)
    params = module.trainable_parameters()
    for p in params.values():
        p.grad = torch.ones_like(p)
    strategy.on_before_optimizer_step(ctx, None)
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return {
        "examples": [(ex.prompt, ex.answer) for ex in examples],
        "trainable": sorted(params),
        "penalty": None if penalty is None else penalty.item(),
        "grads": grads,
    }


def same(a: dict, b: dict) -> bool:
    scalars = all(a[k] == b[k] for k in ("examples", "trainable", "penalty"))
    return (
        scalars
        and a["grads"].keys() == b["grads"].keys()
        and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_restored_strategy_behaves_like_the_original(
    name, make_module, make_ctx, stream_of, fit_task, tmp_path
):
    module, stream = make_module(**MODULE.get(name, {})), stream_of(8, 8, 8)
    original = build(name, tmp_path)
    ctx0 = make_ctx(module, stream, 0)
    original.prepare_model(ctx0)
    original.setup(ctx0)
    fit_task(module, original, ctx0, steps=2)
    with torch.no_grad():  # the next task's weights differ from the anchor, so penalties are not zero
        for p in module.trainable_parameters().values():
            p.add_(0.01)
    state = {k: v.detach().contiguous().cpu() for k, v in original.state_dict().items()}
    if state:
        save_file(state, str(tmp_path / "strategy.safetensors"))
        state = load_file(str(tmp_path / "strategy.safetensors"))
    restored, untouched = build(name, tmp_path), build(name, tmp_path)
    for fresh in (restored, untouched):  # as a resumed run starts: structure, setup, then the state
        fresh.prepare_model(ctx0)
        fresh.setup(ctx0)
    restored.load_state_dict(state)
    ctx1 = make_ctx(module, stream, 1)
    expected = behaviour(original, module, ctx1)
    assert same(behaviour(restored, module, ctx1), expected)
    if name in STATEFUL:  # the check can tell: without the restored state the behaviour differs
        assert not same(behaviour(untouched, module, ctx1), expected)
