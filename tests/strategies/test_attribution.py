"""Attribution gating: Eq. 10-11 against direct computations, the gate once per optimizer step, what
moves a gated parameter under each target, and the prior cache (reuse, refusal)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from clbench.files import exclusive
from clbench.gradients import gate_statistics
from clbench.module import CLModule
from clbench.strategy import CLStrategy, StrategyContext
from clbench.testing import ToyServices, quiet_trainer
from strategies.attribution import Attribution
from strategies.attribution import priors as priors_module
from strategies.attribution.importance import TopKMean, fold_max, normalise, task_prior
from strategies.attribution.lrp import parameter_relevance
from strategies.seqft import SeqFT

GATED = "model.layers.0.self_attn.q_proj.weight"


# -- Eq. 10-12 ----------------------------------------------------------------------------------
def test_normalise_is_eq10_per_sample_and_tensor():
    torch.manual_seed(0)
    r = torch.randn(3, 4, 5) * torch.tensor([1.0, 50.0, 0.0])[:, None, None]  # third sample all zero
    out = normalise(r, eps=1e-8)
    for k in range(3):
        mag = torch.log1p(r[k].abs())
        expected = torch.sign(r[k]) * mag / (mag.max() + 1e-8)
        torch.testing.assert_close(out[k], expected)
    assert out[1].abs().max().item() == pytest.approx(1.0, abs=1e-6) and out[2].abs().sum() == 0


@pytest.mark.parametrize("n, k", [(11, 4), (3, 5), (5, 5)])
def test_streaming_topk_mean_matches_a_direct_computation(n, k):
    torch.manual_seed(1)
    values = torch.randn(n, 6, 7)
    agg = TopKMean(k, torch.float32)
    for chunk in values.split({11: [2, 1, 3, 5], 3: [1, 2], 5: [5]}[n]):
        agg.add("w", chunk)
    direct = values.sort(0, descending=True).values[: min(n, k)].mean(0)  # fewer than K: all of them
    torch.testing.assert_close(agg.mean("w"), direct)


def test_fold_max_clamps_and_keeps_the_running_max():
    rbar = {}
    fold_max(rbar, {"w": torch.tensor([-0.5, 0.2, 0.9])})
    fold_max(rbar, {"w": torch.tensor([0.3, -1.0, 0.4])})
    assert torch.equal(rbar["w"], torch.tensor([0.3, 0.2, 0.9]))


def test_lrp_prior_of_one_sample_is_the_normalised_engine_relevance(make_module, stream_of, tmp_path):
    module, stream = make_module(), stream_of(1, 4)
    ctx = full_ctx(module, stream, 0, tmp_path)
    strat = Attribution(top_k=3, correct_threshold=0.0, prior_dir=str(tmp_path / "p"), prior_dtype="float32")
    strat.setup(ctx)
    strat.on_task_end(ctx)
    batch = next(iter(ctx.services.make_prompt_loader(stream.tasks[0].train)))
    direct = parameter_relevance(module.model, batch["input_ids"], batch["attention_mask"])
    for name, r in direct.items():
        torch.testing.assert_close(strat.rbar[name], normalise(r)[0].clamp(min=0))


def test_scoring_in_chunks_gives_the_prior_of_whole_batches(make_module, stream_of, tmp_path):
    module, stream = make_module(), stream_of(6)
    ctx = full_ctx(module, stream, 0, tmp_path)
    params = module.trainable_parameters()
    batches = list(ctx.services.make_prompt_loader(stream.tasks[0].train))
    whole, n_whole = task_prior(
        module.model, params, batches, "lrp", k=3, chunk=64, store_dtype=torch.float32
    )
    parts, n_parts = task_prior(module.model, params, batches, "lrp", k=3, chunk=1, store_dtype=torch.float32)
    assert n_whole == n_parts == 6
    for name in params:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-6)


# -- contexts and fitting -----------------------------------------------------------------------
def full_ctx(
    module: CLModule, stream, t: int, run_dir, fits: list | None = None, predict=None
) -> StrategyContext:
    """A context with the runner's services: loaders, greedy predict, and a counting side fit."""
    fits = [] if fits is None else fits

    def side_fit(task, examples):
        fits.append(task.name)
        hooks, saved = (module.cl_strategy, module.ctx), module.carried_optimizer_state
        module.attach(CLStrategy(), module.ctx)
        module.carried_optimizer_state = {}
        fit(module, services.make_loader(examples, True), steps=2)
        module.attach(*hooks)
        module.carried_optimizer_state = saved

    services = ToyServices(module, stream, t, 4, predict, side_fit)
    return StrategyContext(module, stream, t, run_dir, seed=7, services=services)


def fit(module: CLModule, loader: DataLoader, steps: int = 1, accumulate: int = 1) -> None:
    quiet_trainer(steps, accumulate).fit(module, train_dataloaders=loader)


def gated_fit(module, strategy, stream, make_ctx, batch_size=8, accumulate=1, steps=1, t=1):
    ctx = make_ctx(module, stream, t, batch_size)
    module.attach(strategy, ctx)
    fit(module, ctx.services.make_loader(stream.tasks[t].train[:8], False), steps, accumulate)


def fixed_gate(module, value=None, seed=0) -> Attribution:
    """An Attribution strategy whose Rbar is set by hand: random in [0, 1], or `value` for GATED."""
    torch.manual_seed(seed)
    strat = Attribution(gate_target="grad")
    strat.load_state_dict(
        {
            f"rbar.{n}": torch.rand_like(p)
            if value is None
            else torch.full_like(p, float(n == GATED) * value)
            for n, p in module.trainable_parameters().items()
        }
    )
    return strat


def params_of(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.trainable_parameters().items()}


# -- the gate -----------------------------------------------------------------------------------
def test_accumulated_batches_give_the_update_of_one_large_batch(make_module, stream_of, make_ctx):
    """accumulate_grad_batches=4 x batch 2 == batch 8, gate on: the gate is applied once per step."""
    stream = stream_of(8, 8)  # every example has the same token count, so loss means agree
    updates = []
    for batch_size, accumulate in ((8, 1), (2, 4)):
        module = make_module()
        before = params_of(module)
        gated_fit(module, fixed_gate(module), stream, make_ctx, batch_size, accumulate)
        updates.append({n: p - before[n] for n, p in params_of(module).items()})
    ungated = make_module()
    before = params_of(ungated)
    gated_fit(ungated, SeqFT(), stream, make_ctx)
    assert any(not torch.allclose(updates[0][n], p - before[n]) for n, p in params_of(ungated).items())
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=1e-4, atol=1e-6)


class GradProbe(Attribution):
    """Records the gated gradient of GATED at every step."""

    seen: list = []

    def on_before_optimizer_step(self, ctx, optimizer):
        super().on_before_optimizer_step(ctx, optimizer)
        self.seen.append(ctx.module.trainable_parameters()[GATED].grad.clone())


def _with_gate(strategy: Attribution, module, value: float | None) -> Attribution:
    strategy.load_state_dict(fixed_gate(module, value).state_dict())
    return strategy


def test_update_target_freezes_a_fully_gated_parameter_weight_decay_included(
    make_module, stream_of, make_ctx
):
    module, stream = make_module(weight_decay=0.1), stream_of(8, 8)
    gated_fit(module, SeqFT(), stream, make_ctx, t=0, steps=2)  # momentum from an earlier task
    before = params_of(module)
    gated_fit(module, _with_gate(Attribution(gate_target="update"), module, 1.0), stream, make_ctx, steps=2)
    after = params_of(module)
    assert torch.equal(after[GATED], before[GATED])
    assert not torch.equal(
        after["model.layers.0.self_attn.k_proj.weight"], before["model.layers.0.self_attn.k_proj.weight"]
    )


def test_grad_target_zeroes_the_gradient_but_weight_decay_still_moves(make_module, stream_of, make_ctx):
    module, stream = make_module(weight_decay=0.1), stream_of(8, 8)
    before = params_of(module)
    probe = _with_gate(GradProbe(gate_target="grad"), module, 1.0)
    probe.seen = []
    gated_fit(module, probe, stream, make_ctx)
    assert len(probe.seen) == 1 and probe.seen[0].abs().sum() == 0  # exactly zero gradient
    # fresh AdamW, m = 0: the step is the decoupled decay alone, theta (1 - lr wd)
    torch.testing.assert_close(params_of(module)[GATED], before[GATED] * (1 - 1e-2 * 0.1))
    assert not torch.equal(params_of(module)[GATED], before[GATED])


def test_grad_target_momentum_from_an_earlier_task_still_moves(make_module, stream_of, make_ctx):
    moved = {}
    for target in ("grad", "update"):
        module, stream = make_module(weight_decay=0.0), stream_of(8, 8)
        gated_fit(module, SeqFT(), stream, make_ctx, t=0, steps=2)  # AdamW moments kept across tasks
        before = params_of(module)[GATED]
        gated_fit(module, _with_gate(Attribution(gate_target=target), module, 1.0), stream, make_ctx, steps=2)
        moved[target] = (params_of(module)[GATED] - before).abs().max().item()
    assert moved["grad"] > 1e-4 and moved["update"] == 0.0


@pytest.mark.parametrize("target", ["grad", "update"])
def test_ungated_elements_move_exactly_as_under_seqft(make_module, stream_of, make_ctx, target):
    stream, results = stream_of(8, 8), []
    for gated in (False, True):
        module = make_module(weight_decay=0.1)
        gated_fit(module, SeqFT(), stream, make_ctx, t=0)
        strat = SeqFT()
        if gated:
            strat = _with_gate(Attribution(gate_target=target), module, 0.0)
            strat.rbar[GATED].view(-1)[0] = 1.0  # one gated element makes the tensor go through the gate
            strat.load_state_dict(strat.state_dict())
        gated_fit(module, strat, stream, make_ctx)
        results.append(params_of(module))
    assert torch.equal(results[0][GATED].view(-1)[1:], results[1][GATED].view(-1)[1:])  # bit-identical
    assert not torch.equal(results[0][GATED].view(-1)[0], results[1][GATED].view(-1)[0])
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]) or name == GATED


def test_gate_power_scales_the_update_and_the_removed_mass_is_measured(
    make_module, stream_of, make_ctx, tmp_path
):
    """Rbar 0.25 ** 0.5 = gate 0.5 on GATED: its step is half of seqft's, and gate.json's measured
    share of the update mass removed is 0.5 (GATED is the only gated tensor)."""
    stream, steps = stream_of(8, 8), {}
    for power in (None, 0.5):
        module = make_module(weight_decay=0.1)
        gated_fit(module, SeqFT(), stream, make_ctx, t=0)
        before = params_of(module)[GATED]
        strat = SeqFT()
        if power is not None:
            strat = _with_gate(Attribution("update", gate_power=power), module, 0.25)
        gated_fit(module, strat, stream, make_ctx)
        steps[power] = params_of(module)[GATED] - before
    torch.testing.assert_close(steps[0.5], 0.5 * steps[None], rtol=1e-4, atol=1e-7)
    assert strat._moved[1] > 0
    strat.on_task_end(full_ctx(module, stream, 1, tmp_path))  # the last task: no prior to score
    log = json.loads((tmp_path / "importance" / "gate.json").read_text())
    assert log[stream.tasks[1].name]["update_mass_removed"] == pytest.approx(0.5, rel=1e-6)
    assert strat._moved.abs().sum() == 0  # reset for the next task


def test_update_gate_is_the_copy_then_lerp_formula_and_measures_the_former_mass(
    make_module, stream_of, make_ctx
):
    """One step under a random gate on every tensor (weight decay, momentum from an earlier task):
    each parameter is lerp(theta_step, theta_old, gate), theta_step seqft's step from the same state
    (the former copy-then-lerp; here bit for bit), and the measured mass is the former counter's."""
    stream, after = stream_of(8, 8), {}
    for name in ("seqft", "update"):
        module = make_module(weight_decay=0.1)
        gated_fit(module, SeqFT(), stream, make_ctx, t=0, steps=2)
        before = params_of(module)
        strat = SeqFT() if name == "seqft" else _with_gate(Attribution("update"), module, None)
        gated_fit(module, strat, stream, make_ctx)
        after[name] = params_of(module)
    for n, p in after["update"].items():
        assert torch.equal(p, after["seqft"][n].lerp(before[n], strat.gate[n]))
    moved = {n: (p - before[n]).abs() for n, p in after["seqft"].items()}
    removed = sum((strat.gate[n] * m).sum(dtype=torch.float64) for n, m in moved.items())
    total = sum(m.sum(dtype=torch.float64) for m in moved.values())
    assert strat._moved.tolist() == [removed.item(), total.item()]


class MassProbe(Attribution):
    """Records whether each step's update gate asked for the removed mass."""

    def update_gate(self, ctx):
        gate = super().update_gate(ctx)
        self.measured.append(gate.mass is not None)
        return gate


def test_removed_mass_is_measured_on_every_kth_step_of_a_task(make_module, stream_of, make_ctx, tmp_path):
    module, stream = make_module(), stream_of(8, 8)
    probe = _with_gate(MassProbe("update"), module, 0.5)
    probe.mass_every, probe.measured = 2, []
    gated_fit(module, probe, stream, make_ctx, steps=3)
    assert probe.measured == [True, False, True]
    probe.on_task_end(full_ctx(module, stream, 1, tmp_path))
    entry = json.loads((tmp_path / "importance" / "gate.json").read_text())[stream.tasks[1].name]
    assert entry["update_mass_every"] == 2 and entry["update_mass_steps"] == 2
    assert entry["update_mass_removed"] == pytest.approx(0.5, rel=1e-6)
    gated_fit(module, probe, stream, make_ctx)
    assert probe.measured[-1]  # the next task starts measuring at its own step 0


def test_gate_statistics_by_hand():
    gate = {"a": torch.tensor([0.0, 0.05, 0.2, 0.95]), "b": torch.tensor([[0.6, 0.0]])}
    stats = gate_statistics(gate, thresholds=(0.1, 0.5, 0.9))
    assert stats["elements"] == 6 and stats["mean"] == pytest.approx(1.8 / 6)
    shares = [stats[f"share_above_{t}"] for t in (0.1, 0.5, 0.9)]
    assert shares == [0.5, 2 / 6, 1 / 6]


# -- priors and the cache -----------------------------------------------------------------------
def run_priors(module, stream, run_dir, prior_dir, fits, **kwargs) -> Attribution:
    strat = Attribution(
        prior_dir=str(prior_dir), **{"correct_threshold": 0.0, "max_prior_samples": 4, **kwargs}
    )
    strat.setup(full_ctx(module, stream, 0, run_dir, fits))
    for t in range(len(stream)):
        strat.on_task_end(full_ctx(module, stream, t, run_dir, fits))
    return strat


def test_stored_prior_is_reused_without_a_second_single_task_training(make_module, stream_of, tmp_path):
    stream, fits = stream_of(6, 6, 6), []
    module = make_module()
    before, rng = params_of(module), torch.get_rng_state()
    first = run_priors(module, stream, tmp_path / "run1", tmp_path / "priors", fits)
    assert fits == ["beta"]  # task 1 scored in place, the last task not at all
    assert all(torch.equal(p, before[n]) for n, p in params_of(module).items())  # continual weights back
    assert torch.equal(torch.get_rng_state(), rng)  # and the random-number state
    assert len(list((tmp_path / "priors").glob("*.safetensors"))) == 2
    computed = json.loads((tmp_path / "run1" / "importance" / "used.json").read_text())["maps"]
    assert [sorted(m["seconds"]) for m in computed] == [["filter", "score"], ["filter", "score", "side_fit"]]
    assert all(v >= 0 for m in computed for v in m["seconds"].values())
    second = run_priors(make_module(), stream, tmp_path / "run2", tmp_path / "priors", fits)
    assert fits == ["beta"]
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    used = json.loads((tmp_path / "run2" / "importance" / "used.json").read_text())["maps"]
    assert [(m["task"], m["reused"]) for m in used] == [("alpha", True), ("beta", True)]
    assert not any("seconds" in m for m in used)  # nothing computed in this run
    run_priors(make_module(), stream, tmp_path / "run3", tmp_path / "priors", fits, top_k=2)
    assert fits == ["beta", "beta"]  # other settings, another prior


def test_a_prior_another_process_is_computing_is_waited_for_then_reused(
    make_module, stream_of, tmp_path, monkeypatch
):
    """A run that needs a prior whose lock is held (another run is computing it) waits, then finds
    the file and reuses it; checking for the file before taking the lock would compute it again."""
    stream, fits, priors = stream_of(6, 6, 6), [], tmp_path / "priors"
    run_priors(make_module(), stream, tmp_path / "run1", priors, fits)
    stored = sorted(priors.glob("*.safetensors"))
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in stored:  # as if another run were still computing them
        path.rename(aside / path.name)
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with contextlib.ExitStack() as locks:
            for path in stored:
                locks.enter_context(exclusive(path.with_name(f"{path.name}.lock")))
            held.set()
            release.wait(30)
            for path in stored:
                (aside / path.name).rename(path)  # saved, then the locks go

    said: list[str] = []
    monkeypatch.setattr(priors_module, "say", lambda line: (said.append(line), release.set()))
    thread = threading.Thread(target=other_run)
    thread.start()
    assert held.wait(30)
    run_priors(make_module(), stream, tmp_path / "run2", priors, fits)
    thread.join(30)
    assert said == [f"clbench: waiting for {stored[0].name}: another run is computing it"]
    used = json.loads((tmp_path / "run2" / "importance" / "used.json").read_text())["maps"]
    assert [m["reused"] for m in used] == [True, True] and fits == ["beta"]  # no second side training


def test_gate_json_describes_the_gate_each_later_task_trains_under(make_module, stream_of, tmp_path):
    strat = run_priors(make_module(), stream_of(6, 6, 6), tmp_path / "r", tmp_path / "p", [], gate_power=0.5)
    log = json.loads((tmp_path / "r" / "importance" / "gate.json").read_text())
    assert list(log) == ["beta", "gamma"] and [e["after"] for e in log.values()] == ["alpha", "beta"]
    final = torch.cat([r.flatten() for r in strat.rbar.values()]).double().sqrt()  # Rbar ** 0.5
    assert log["gamma"]["mean"] == pytest.approx(final.mean().item(), rel=1e-6)
    assert log["gamma"]["share_above_0.5"] == pytest.approx((final > 0.5).double().mean().item())
    assert log["gamma"]["mean"] >= log["beta"]["mean"] > 0  # Rbar only grows


def test_prior_of_another_model_is_refused(words_model_dir, stream_of, tmp_path):
    from transformers import LlamaForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(words_model_dir, folder)
    stream = stream_of(4, 4)
    run_priors(CLModule(model=str(folder)), stream, tmp_path / "r1", tmp_path / "priors", [])
    config = LlamaForCausalLM.from_pretrained(folder).config
    config.intermediate_size = 48  # same name, other shapes
    LlamaForCausalLM(config).save_pretrained(folder)
    with pytest.raises(ValueError, match="computed for another model"):
        run_priors(CLModule(model=str(folder)), stream, tmp_path / "r2", tmp_path / "priors", [])


def test_only_correctly_answered_samples_count(make_module, stream_of, tmp_path):
    module, stream = make_module(), stream_of(6, 6)
    answers = lambda task, exs: [ex.answer if i % 2 == 0 else "wrong" for i, ex in enumerate(exs)]  # noqa: E731
    strat = Attribution(prior_dir=str(tmp_path / "p"), correct_threshold=1.0)
    strat.setup(full_ctx(module, stream, 0, tmp_path))
    strat.on_task_end(full_ctx(module, stream, 0, tmp_path, predict=answers))
    used = json.loads((tmp_path / "importance" / "used.json").read_text())["maps"]
    assert used[0]["samples_used"] == 3


@pytest.mark.parametrize("estimator", ["grad_x_weight", "fisher", "magnitude", "random"])
def test_estimators_give_bounded_priors_of_every_trainable_tensor(
    make_module, stream_of, tmp_path, estimator
):
    stream = stream_of(4, 4)
    strat = run_priors(make_module(), stream, tmp_path / "r", tmp_path / "p", [], estimator=estimator)
    lrp = run_priors(make_module(), stream, tmp_path / "r2", tmp_path / "p", [])
    assert strat.rbar.keys() == lrp.rbar.keys()
    assert all(0 <= r.min() and r.max() <= 1 for r in strat.rbar.values())
    if estimator == "random":  # the LRP gate, permuted within each tensor
        for name, r in strat.rbar.items():
            assert torch.equal(r.flatten().sort().values, lrp.rbar[name].flatten().sort().values)
        assert not torch.equal(strat.rbar[GATED], lrp.rbar[GATED])
    else:
        assert sum(r.sum() for r in strat.rbar.values()) > 0


def test_magnitude_prior_is_eq10_of_the_single_task_weights_and_needs_no_answers(
    make_module, stream_of, tmp_path
):
    """Task 1's single-task model is the continual model: its prior is |theta| through Eq. 10, and
    no generation runs (a predict that fails would be called for the correct-sample filter)."""
    module, stream = make_module(), stream_of(4, 4)

    def no_predict(task, exs):
        raise AssertionError("magnitude must not generate")

    strat = Attribution(estimator="magnitude", prior_dir=str(tmp_path / "p"), correct_threshold=1.0)
    strat.setup(full_ctx(module, stream, 0, tmp_path))
    strat.on_task_end(full_ctx(module, stream, 0, tmp_path, predict=no_predict))
    for name, p in module.trainable_parameters().items():
        expected = normalise(p.detach().abs()[None])[0]
        torch.testing.assert_close(strat.rbar[name], expected)
    assert strat.rbar[GATED].max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q", [0.01, 0.3, 1.0])
def test_budget_gate_protects_the_top_share_of_each_tensor(make_module, q):
    """Gate 1 on exactly ceil(q n) elements of each tensor, those with the highest Rbar; a tensor
    with Rbar zero everywhere is not gated."""
    module = make_module()
    rbar = fixed_gate(module).rbar
    zero = next(n for n in rbar if n != GATED)
    rbar[zero] = torch.zeros_like(rbar[zero])
    strat = Attribution("update", budget=q)
    strat.load_state_dict({f"rbar.{n}": r for n, r in rbar.items()})
    for name, g in strat.gate.items():
        r = rbar[name].flatten()
        if name == zero:
            assert g.sum() == 0
            continue
        k = math.ceil(q * r.numel())
        assert set(g.unique().tolist()) <= {0.0, 1.0} and int(g.sum()) == k
        assert r[g.flatten() == 1].min() >= r.topk(k).values.min()  # rand: no ties
    stats = gate_statistics(strat.gate)
    assert 0 < stats["mean"] <= q + 1e-3


def test_budget_with_the_random_estimator_is_a_seeded_uniform_choice(make_module, stream_of, tmp_path):
    """Random at a budget: as many elements per tensor as LRP's choice, other ones, fixed by the seed."""
    stream = stream_of(4, 4)
    q, prior = 0.2, tmp_path / "p"
    lrp = run_priors(make_module(), stream, tmp_path / "a", prior, [], budget=q)
    rnd = [
        run_priors(
            make_module(), stream, tmp_path / f"r{i}", tmp_path / "p", [], budget=q, estimator="random"
        )
        for i in (0, 1)
    ]
    assert torch.equal(rnd[0].gate[GATED], rnd[1].gate[GATED])
    assert rnd[0].gate[GATED].sum() == lrp.gate[GATED].sum() > 0
    overlap = (rnd[0].gate[GATED] * lrp.gate[GATED]).sum() / lrp.gate[GATED].sum()
    assert overlap < 0.6  # a uniform choice of 20% overlaps LRP's by about 20%


def test_continual_source_trains_no_side_model_and_records_maps(make_module, stream_of, tmp_path):
    fits = []
    strat = run_priors(
        make_module(), stream_of(4, 4, 4), tmp_path / "r", tmp_path / "p", fits, source="continual"
    )
    assert fits == [] and strat.tasks_folded == 2
    assert len(list((tmp_path / "r" / "importance" / "continual").glob("*.safetensors"))) == 2


def test_lora_adapters_are_the_gated_tensors(make_module, stream_of, tmp_path):
    from clbench.models import LoRA

    module = make_module(lora=LoRA(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    strat = run_priors(module, stream_of(4, 4), tmp_path / "r", tmp_path / "p", [])
    assert strat.rbar.keys() == module.trainable_parameters().keys()
    assert all("lora_" in n for n in strat.rbar)
    # B = 0 at the start and no training here: LoRA relevance is exactly zero (docs reading 3.7)
    assert all(r.sum() == 0 for r in strat.rbar.values())


def test_state_dict_round_trips(make_module):
    module = make_module()
    strat = fixed_gate(module)
    strat.tasks_folded = 2
    fresh = Attribution()
    fresh.load_state_dict(strat.state_dict())
    again = fresh.state_dict()
    assert again.keys() == strat.state_dict().keys() and int(again["tasks_folded"]) == 2
    assert all(torch.equal(again[k], v) for k, v in strat.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"gate_target": "loss"}, "gate_target"),
        ({"top_k": 0}, "top_k"),
        ({"estimator": "shap"}, "estimator"),
        ({"correct_threshold": 2.0}, "correct_threshold"),
        ({"max_prior_samples": 0}, "max_prior_samples"),
        ({"gate_power": 0.0}, "gate_power"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": 0.1, "gate_power": 0.5}, "budget"),
    ],
)
def test_bad_options_name_themselves(kwargs, option):
    with pytest.raises(ValueError, match=f"attribution.{option}"):
        Attribution(**kwargs)


class WaitingSpy(list):
    """The side-fit record of full_ctx; also notes, during each side fit, whether the module still
    holds its optimizer moments and which offloaded sets are on disk."""

    def __init__(self, module, folder) -> None:
        super().__init__()
        self.module, self.folder, self.seen = module, folder, []

    def append(self, task) -> None:
        on_disk = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
        self.seen.append((bool(self.module.carried_optimizer_state), on_disk))
        super().append(task)


def test_offload_to_disk_gives_the_same_priors_and_restores_weights_and_moments(
    make_module, stream_of, make_ctx, tmp_path
):
    """Priors computed with the starting weights, continual weights and AdamW moments on disk equal
    those computed in memory; the continual weights and moments come back exactly, and the
    offload folder is gone after the last task. "auto" (the default) parks on disk on the CPU."""
    stream, results = stream_of(6, 6, 6), {}
    for where in ("memory", "disk", "auto"):
        module = make_module()
        gated_fit(module, SeqFT(), stream, make_ctx, t=0, steps=2)
        weights = params_of(module)
        moments = {
            n: {k: v.clone() for k, v in st.items()} for n, st in module.carried_optimizer_state.items()
        }
        assert moments  # there is carried state to park
        spy = WaitingSpy(module, tmp_path / where / "offload" / "rank0")
        strat = run_priors(module, stream, tmp_path / where, tmp_path / f"p-{where}", spy, offload=where)
        on_disk = ["continual", "moments", "rbar", "start"] if where != "memory" else []
        assert spy.seen == [(False, on_disk)]  # the moments left the module; on disk, as files
        assert all(torch.equal(p, weights[n]) for n, p in params_of(module).items())
        state = module.carried_optimizer_state
        assert state.keys() == moments.keys()
        assert all(torch.equal(state[n][k], v) for n, st in moments.items() for k, v in st.items())
        assert not (tmp_path / where / "offload").exists()
        results[where] = strat.rbar
    for name, r in results["memory"].items():
        assert torch.equal(results["disk"][name], r) and torch.equal(results["auto"][name], r)
