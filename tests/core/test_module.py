"""CLModule: optimizer state carried or reset between tasks, the learning-rate schedule, and generation
under Lightning's autocast (its cast cache off)."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from toydata import quiet_trainer

from clbench.data.collate import LeftPadCollator, TokenizedTask
from clbench.data.tasks import Example, Task
from clbench.module import CLModule, lr_factor


def _fit(module: CLModule, steps: int) -> pl.Trainer:
    task = Task("t", train=[], test=[])
    examples = [Example(f"Upper cat {i}:", "CAT") for i in range(16)]
    data = TokenizedTask(examples, task, module.tokenizer, "raw", True)
    loader = DataLoader(data, batch_size=4, collate_fn=LeftPadCollator(module.tokenizer.pad_token_id))
    trainer = quiet_trainer(steps)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("keep", [True, False])
def test_optimizer_state_kept_or_reset_between_tasks(tiny_model_dir, keep):
    module = CLModule(model=str(tiny_model_dir), lr=1e-3, keep_optimizer_state=keep)
    _fit(module, 3)
    trainer = _fit(module, 2)
    steps = {float(st["step"]) for st in trainer.optimizers[0].state.values()}
    assert steps == ({5.0} if keep else {2.0})  # AdamW's step count carried across the fresh Trainer


def test_lr_factor_shapes():
    assert lr_factor(0, 4, 100, "constant") == 0.25 and lr_factor(3, 4, 100, "constant") == 1.0
    assert lr_factor(50, 0, 100, "constant") == 1.0
    assert lr_factor(50, 0, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 0, 100, "cosine") == pytest.approx(0.0)


def test_a_finished_fit_keeps_one_copy_of_the_moments(tiny_model_dir):
    """The carried moments are the optimizer's own tensors, and the finished Trainer lets go of them."""
    from clbench.module import call_trainer

    module = CLModule(model=str(tiny_model_dir), lr=1e-3)
    task = Task("t", train=[], test=[])
    data = TokenizedTask(
        [Example(f"Upper cat {i}:", "CAT") for i in range(8)], task, module.tokenizer, "raw", True
    )
    loader = DataLoader(data, batch_size=4, collate_fn=LeftPadCollator(module.tokenizer.pad_token_id))
    trainer = quiet_trainer(2)
    optimizers = []
    trainer.fit = lambda m, **kw: (pl.Trainer.fit(trainer, m, **kw), optimizers.append(trainer.optimizers[0]))
    call_trainer(trainer, "fit", module, train_dataloaders=loader)
    assert trainer.strategy.optimizers == []
    moments = {id(v) for st in optimizers[0].state.values() for v in st.values()}
    saved = {id(v) for st in module._saved_optimizer_state.values() for v in st.values()}
    assert saved == moments and len(saved) == 3 * len(module.trainable_parameters())


def test_generation_keeps_its_weight_casts_and_its_tokens(tiny_model_dir, monkeypatch):
    """Under an autocast with the cache off and inference mode (Lightning's bf16-mixed predict),
    generate runs with the cache on and out of inference mode (where the cache is never used), and
    answers exactly what it answered with every weight cast again at every step."""
    module = CLModule(model=str(tiny_model_dir))
    tok = module.tokenizer
    tok.padding_side = "left"
    batch = dict(tok(["Upper cat 1:", "Reverse dog tea:"], return_tensors="pt", padding=True))
    batch["max_new_tokens"] = 6
    seen, generate = [], module.model.generate

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_cache_enabled() and not torch.is_inference_mode_enabled())
        return generate(*args, **kwargs)

    monkeypatch.setattr(module.model, "generate", recording)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        cached = module.generate(batch)
        with monkeypatch.context() as m:  # the former behaviour: the cache stays off
            m.setattr("clbench.module.cached_casts", lambda device: contextlib.nullcontext())
            uncached = module.generate(batch)
    assert seen == [True, False]
    assert cached == uncached and any(cached)
