"""CLModule: optimizer state carried or reset between tasks, the learning-rate schedule, and generation
under Lightning's autocast (its cast cache off)."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from clbench.data.collate import LeftPadCollator, TokenizedTask
from clbench.data.tasks import Example, Task
from clbench.module import CLModule, lr_factor
from clbench.testing import quiet_trainer


def _fit(module: CLModule, steps: int) -> pl.Trainer:
    return _fit_with(module, steps)


def _fit_with(module: CLModule, steps: int, *callbacks: pl.Callback) -> pl.Trainer:
    task = Task("t", train=[], test=[])
    examples = [Example(f"Upper cat {i}:", "CAT") for i in range(16)]
    data = TokenizedTask(examples, task, module.tokenizer, "raw", True)
    loader = DataLoader(data, batch_size=4, collate_fn=LeftPadCollator(module.tokenizer.pad_token_id))
    trainer = quiet_trainer(steps)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("keep", [True, False])
def test_optimizer_state_kept_or_reset_between_tasks(tiny_model_dir, keep):
    module = CLModule(model=str(tiny_model_dir), lr=1e-3, keep_optimizer_state=keep)
    _fit(module, 3)
    trainer = _fit(module, 2)
    steps = {float(st["step"]) for st in trainer.optimizers[0].state.values()}
    assert steps == ({5.0} if keep else {2.0})  # AdamW's step count carried across the fresh Trainer


def test_the_next_task_takes_the_moments_and_keeps_its_own_lr_and_gate(tiny_model_dir):
    """set_optimizer_state_dict brings the last task's moments (the same tensors), not its param groups:
    task 1's linear decay ends at lr 0, task 2 starts at its own lr. They go in at the first step,
    when gradients exist, so torch runs no set-up step (a second, zero optimizer state) and the
    strategy sees one gate per real step."""
    from clbench.strategy import CLStrategy

    seen, steps = {}, []

    class Watch(CLStrategy):
        gates = 0

        def update_gate(self, ctx):
            Watch.gates += 1

        def on_before_optimizer_step(self, ctx, optimizer):
            if "lr" not in seen and module.trainer.max_steps == 2:  # task 2's first step
                seen["lr"] = optimizer.param_groups[0]["lr"]
                seen["moments"] = {id(v) for st in optimizer.state.values() for v in st.values()}
                seen["steps"] = {float(st["step"]) for st in optimizer.state.values()}

    class CountSteps(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_pre_hook(lambda *args: steps.append(1))

    module = CLModule(model=str(tiny_model_dir), lr=1e-3, schedule="linear")
    module.cl_strategy = Watch()
    first = _fit(module, 3)
    assert first.optimizers[0].param_groups[0]["lr"] == 0.0 and Watch.gates == 3
    carried = {id(v) for st in module.carried_optimizer_state.values() for v in st.values()}
    trainer = _fit_with(module, 2, CountSteps())
    assert seen["lr"] == 1e-3  # not task 1's decayed 0.0
    assert seen["moments"] == carried and seen["steps"] == {3.0}
    assert len(steps) == 2 and Watch.gates == 5  # no set-up step
    assert {float(st["step"]) for st in trainer.optimizers[0].state.values()} == {5.0}


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
    saved = {id(v) for st in module.carried_optimizer_state.values() for v in st.values()}
    assert saved == moments and len(saved) == 3 * len(module.trainable_parameters())
    # Lightning's teardown on one device or DDP swaps CPU copies into the optimizer's own state
    # dicts; what is carried must keep the tensors the GPU holds
    for st in optimizers[0].state.values():
        st["exp_avg"] = st["exp_avg"].to("meta")
    assert all(st["exp_avg"].device.type == "cpu" for st in module.carried_optimizer_state.values())


def test_generate_text_is_greedy_generation_of_raw_prompts_by_the_given_model(tiny_model_dir):
    """The same continuations as the evaluation's generate on the same tokens, by whichever model is
    given: a frozen copy keeps answering as the model did when it was copied."""
    import torch

    module = CLModule(model=str(tiny_model_dir), lr=1e-3)
    prompts = ["Upper cat:", "Reverse a much longer prompt than the first one:"]
    tokens = module.tokenizer(prompts, padding=True, return_tensors="pt")
    expected = module.generate({**tokens, "max_new_tokens": 5})
    assert module.generate_text(prompts, 5, batch_size=1) == expected
    frozen = module.frozen_copy()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert module.generate_text(prompts, 5, model=frozen) == expected
    assert module.generate_text(prompts, 5) != expected


def test_generate_text_reports_which_continuations_ended(tiny_model_dir):
    """ended=True: whether each row wrote EOS within max_new_tokens. A model made to answer EOS
    after one token and to repeat another token forever: the first row ends, the second runs to the
    limit (its text alone does not show that it was cut)."""
    import torch

    module = CLModule(model=str(tiny_model_dir), lr=1e-3)
    tok, model = module.tokenizer, module.model
    prompts = ["Upper cat", "Is 12 even? Answer:"]
    stop, go = (tok(p)["input_ids"][-1] for p in prompts)
    assert stop != go
    with torch.no_grad():  # the last hidden state is the last token's embedding, normalised
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.lm_head.weight
        embed[:, :2] = torch.tensor([1.0, -1.0])  # dim 0: every token; dim 1: + after `stop` only
        embed[stop, 1] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[:2] = 1.0
        head.zero_()
        head[tok.eos_token_id, 1] = 30.0  # EOS after `stop`
        head[go, 0] = 10.0  # else `go`, again and again (sampled too: the other logits are 0)
    texts, ends = module.generate_text(prompts, 4, ended=True)
    assert ends == [True, False] and texts == ["", tok.decode([go] * 4)]
    assert module.generate_text(prompts, 4) == texts  # without `ended`: the texts alone
    texts, ends = module.generate_text(prompts, 4, batch_size=1, temperature=1.0, seed=3, ended=True)
    assert ends == [True, False] and len(texts) == 2


def test_added_adapters_act_and_train_only_when_named(tiny_model_dir):
    from clbench.models import LoRA

    module = CLModule(model=str(tiny_model_dir), lr=1e-3, lora=LoRA(r=2))
    module.add_adapter("second")
    assert module.adapter_names() == ["default", "second"]
    with pytest.raises(ValueError, match="exists already"):
        module.add_adapter("second")

    def training() -> set[str]:
        return {n.split(".lora_")[1].split(".")[1] for n in module.trainable_parameters()}

    assert training() == {"default"}  # the new one starts frozen and inactive
    module.set_adapters(["default", "second"], trainable=["second"])
    assert module.model.base_model.active_adapters == ["default", "second"] and training() == {"second"}
    module.set_adapters(["default"])
    assert training() == set()
    with pytest.raises(ValueError, match="trainable within active"):
        module.set_adapters(["default"], trainable=["second"])
    with pytest.raises(ValueError, match="model.lora"):
        CLModule(model=str(tiny_model_dir)).add_adapter("x")


def test_sampled_text_depends_on_the_seed_only_and_leaves_the_global_generator(tiny_model_dir):
    import torch

    module = CLModule(model=str(tiny_model_dir), lr=1e-3)
    prompts = ["Upper cat:"] * 4 + ["Is 12 even? Answer:"] * 4
    torch.manual_seed(5)
    before = torch.get_rng_state()
    one = module.generate_text(prompts, 6, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert module.generate_text(prompts, 6, temperature=1.0, seed=3) == one
    assert module.generate_text(prompts, 6, temperature=1.0, seed=4) != one
    assert len(set(one[:4])) > 1  # sampled: the same prompt, other continuations


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


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", None)])
def test_precision_context_is_the_runs_precision_outside_the_training_step(tiny_model_dir, precision, dtype):
    """A strategy's own forward in an optimizer-step hook runs at the run's precision only through
    precision_context: Lightning's autocast covers training_step alone."""
    module = CLModule(model=str(tiny_model_dir), lr=1e-3)
    with module.precision_context():  # no Trainer: nothing
        assert not torch.is_autocast_enabled("cpu")
    seen = []

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            outside = torch.is_autocast_enabled("cpu")
            with pl_module.precision_context():
                on = torch.is_autocast_enabled("cpu")
                seen.append((outside, on, torch.get_autocast_dtype("cpu") if on else None))

    task = Task("t", train=[], test=[])
    data = TokenizedTask([Example("Upper cat:", "CAT")] * 4, task, module.tokenizer, "raw", True)
    loader = DataLoader(data, batch_size=4, collate_fn=LeftPadCollator(module.tokenizer.pad_token_id))
    trainer = pl.Trainer(
        max_steps=1,
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe()],
    )
    trainer.fit(module, train_dataloaders=loader)
    assert seen == [(False, dtype is not None, dtype)]
