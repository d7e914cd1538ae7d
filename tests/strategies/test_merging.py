"""Merging at each task's end (strategies/merging.py, attribution's "merge" target): every rule against
a hand computation on small tensors, TIES's trim counts and sign election, MagMax's choice per
element, Fisher merging's formula, attribution merging's exact ends (whole runs, and linear merging's:
tests/core/test_merge_runs.py) and the state a resume needs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from clbench.gradients import empirical_fisher
from clbench.strategy import StrategyContext
from strategies.attribution.merge import AttributionMerge
from strategies.attribution.priors import PriorSource
from strategies.merging import (
    TIES,
    FisherMerge,
    LinearMerge,
    MagMax,
    fisher_merge_,
    kth_largest,
    ties_mean,
)


class Weights:
    """A module stand-in: named tensors that all train."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.params = {n: torch.nn.Parameter(t.clone()) for n, t in tensors.items()}

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.params


def run_tasks(strategy, start: torch.Tensor, ends: list[torch.Tensor], stream, run_dir) -> list[torch.Tensor]:
    """Each task as the runner runs it, the training replaced by setting the weights to `ends[t]`:
    start hook, weights, end hook; the weights after each task's merge."""
    module = Weights(w=start)
    ctxs = [StrategyContext(module, stream, t, run_dir) for t in range(len(ends))]
    strategy.setup(ctxs[0])
    after = []
    for ctx, end in zip(ctxs, ends, strict=True):
        strategy.on_task_start(ctx)
        with torch.no_grad():
            module.params["w"].copy_(end)
        strategy.on_task_end(ctx)
        after.append(module.params["w"].detach().clone())
    return after


def record(run_dir, name: str) -> dict:
    return json.loads((run_dir / "merge" / f"{name}.json").read_text())


# -- TIES ---------------------------------------------------------------------------------------
def test_kth_largest_is_exact_and_keeps_the_reference_count():
    """The threshold is an element's value, the (floor(k n) + 1)-th largest: ties-merging's kthvalue at
    n - floor(k n), whatever the tensors' split, with zeros, ties and values an ulp apart."""
    torch.manual_seed(0)
    one = torch.rand(1000)
    tensors = [
        one[:300],
        torch.zeros(50),
        one[300:].clone(),
        torch.full((7,), 0.5),
        torch.tensor([0.5 + 6e-8]),
    ]
    flat = torch.cat(tensors)
    n = flat.numel()
    for top_k in (0.01, 0.2, 0.5, 0.9, 1.0):
        k = min(int(n * top_k) + 1, n)
        got = kth_largest(lambda: iter(tensors), k, flat.device, sharded=False)
        reference = flat.kthvalue(max(n - int(n * top_k), 1)).values.item()  # ties-merging's topk_values_mask
        assert got == reference == flat.sort(descending=True).values[k - 1].item()
    for k in range(1, n + 1, 37):
        assert (
            kth_largest(lambda: iter(tensors), k, flat.device, False)
            == flat.sort(descending=True).values[k - 1]
        )


# theta_0 integers and task vectors in halves: every sum and mean below is exact in fp32
THETA0 = torch.arange(10, dtype=torch.float32)
TAU = [
    torch.tensor([4.0, -3, 2, 0, 3, 0, 0, 0, 0, 0.5]),  # 4th largest |x| is 2: keeps e0 e1 e2 e4
    torch.tensor([-1.0, -4, 3, 0, -3, 5, 0, 0, 0, 0]),  # 3: keeps e1 e2 e4 e5
    torch.tensor([-5.0, 2, -2, 2, 0, 0, 2, 0, 0, 0]),  # 2, four times: the tie keeps five
]


def test_ties_trims_elects_and_averages_by_hand(stream_of, tmp_path):
    """top_k 0.3 of 10 elements: the 4th largest magnitude is each vector's threshold (5 kept at a tie).
    After two tasks element 4's trimmed entries (+3, -3) sum to 0 and it takes the majority sign (+:
    three positive sums, one negative), so the mean of its positive entries; after three, the disjoint
    means of the entries of each elected sign."""
    ties = TIES(top_k=0.3, scale=1.0)
    after = run_tasks(ties, THETA0, [THETA0 + t for t in TAU], stream_of(1, 1, 1), tmp_path)
    expected = [
        [4.0, -3, 2, 0, 3, 0, 0, 0, 0, 0],
        [4.0, -3.5, 2.5, 0, 3, 5, 0, 0, 0, 0],
        [-5.0, -3.5, 2.5, 2, 3, 5, 2, 0, 0, 0],
    ]
    for got, want in zip(after, expected, strict=True):
        assert torch.equal(got, THETA0 + torch.tensor(want))
    log = record(tmp_path, "ties")
    assert [log[t]["kept"] for t in ("alpha", "beta", "gamma")] == [4, 4, 5]
    assert [log[t]["threshold"] for t in ("alpha", "beta", "gamma")] == [2.0, 3.0, 2.0]
    assert all(log[t]["elements"] == 10 for t in log)
    assert [log[t]["conflicts"] for t in ("alpha", "beta", "gamma")] == [0, 1, 4]  # entries of both signs


def test_ties_scale_and_the_finetuned_start(stream_of, tmp_path):
    """lambda scales the merged vector; with start_from "finetuned" each task starts from the last
    task's own weights, not from the merge."""
    ties = TIES(top_k=0.3, scale=0.5, start_from="finetuned")
    module = Weights(w=THETA0)
    stream = stream_of(1, 1)
    ctxs = [StrategyContext(module, stream, t, tmp_path) for t in (0, 1)]
    ties.setup(ctxs[0])
    ties.on_task_start(ctxs[0])
    with torch.no_grad():
        module.params["w"].copy_(THETA0 + TAU[0])
    ties.on_task_end(ctxs[0])
    assert torch.equal(module.params["w"], THETA0 + 0.5 * torch.tensor([4.0, -3, 2, 0, 3, 0, 0, 0, 0, 0]))
    ties.on_task_start(ctxs[1])
    assert torch.equal(module.params["w"], THETA0 + TAU[0])  # theta', not the merge


def test_ties_mean_ties_go_to_the_majority_sign():
    """A zero sum takes the majority sign; a majority of 0 takes the negative entries, as the reference
    does (its where(sign > 0, tau > 0, tau < 0))."""
    sums = (torch.tensor([3.0, 0, 1, 0]), torch.tensor([-3.0, -2, 0, 0]))
    counts = (torch.tensor([1, 0, 1, 0], dtype=torch.uint8), torch.tensor([2, 1, 0, 0], dtype=torch.uint8))
    assert torch.equal(ties_mean(sums, counts, 1.0), torch.tensor([3.0, -2, 1, 0]))
    assert torch.equal(ties_mean(sums, counts, -1.0), torch.tensor([-1.5, -2, 1, 0]))
    assert torch.equal(ties_mean(sums, counts, 0.0), torch.tensor([-1.5, -2, 1, 0]))


# -- MagMax and linear ---------------------------------------------------------------------------
def test_magmax_takes_the_largest_magnitude_per_element(stream_of, tmp_path):
    """Per element the task vector of largest |tau| so far, the later one at a tie, scaled onto theta_0."""
    taus = [torch.tensor([1.0, -2, 3, 0]), torch.tensor([-2.0, 2, 1, 0.5]), torch.tensor([0.0, -3, -3, 0])]
    theta0 = torch.tensor([10.0, 20, 30, 40])
    magmax = MagMax(scale=0.5, start_from="merged")
    after = run_tasks(magmax, theta0, [theta0 + t for t in taus], stream_of(1, 1, 1), tmp_path)
    chosen = [[1.0, -2, 3, 0], [-2.0, 2, 3, 0.5], [-2.0, -3, -3, 0.5]]
    for got, want in zip(after, chosen, strict=True):
        assert torch.equal(got, theta0 + 0.5 * torch.tensor(want))
    assert [e["replaced"] for e in record(tmp_path, "magmax").values()] == [4, 3, 2]


def test_linear_merge_by_hand_and_at_its_ends(stream_of, tmp_path):
    prev, trained = torch.tensor([1.0, 2, -4]), torch.tensor([3.0, 2, 0])
    after = run_tasks(LinearMerge(alpha=0.25), prev, [trained], stream_of(1), tmp_path)
    assert torch.equal(after[0], torch.tensor([1.5, 2, -3]))
    torch.manual_seed(0)
    prev, trained = torch.randn(1000), torch.randn(1000)
    assert torch.equal(run_tasks(LinearMerge(alpha=1.0), prev, [trained], stream_of(1), tmp_path)[0], trained)
    assert torch.equal(run_tasks(LinearMerge(alpha=0.0), prev, [trained], stream_of(1), tmp_path)[0], prev)


# -- Fisher merging ------------------------------------------------------------------------------
def test_fisher_merge_formula_by_hand():
    theta = torch.tensor([5.0, 3, 3])
    fisher_merge_(
        theta, torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    )
    torch.testing.assert_close(theta, torch.tensor([(1 + 15) / 4, (2 + 1.5) / 2.5, (0.5 + 1.5) / 1.0]))


def fisher_merged(strategy: FisherMerge, ends: list, fishers: list, stream, tmp_path) -> list:
    """Task t ends at ends[t] with the Fisher fishers[t]: per task, its merge and its record."""
    module, merges = Weights(w=torch.zeros(len(ends[0]))), []
    for t, (end, f) in enumerate(zip(ends, fishers, strict=True)):
        strategy.on_task_start(StrategyContext(module, stream, t, tmp_path))
        with torch.no_grad():
            module.params["w"].copy_(torch.tensor(end))
        entry = strategy.merge(module.params, {"w": torch.tensor(f)})
        merges.append((module.params["w"].detach().clone(), entry))
    return merges


def test_fisher_merge_normalises_floors_and_folds(stream_of, tmp_path):
    """Task 1 keeps theta' and its Fisher (divided by its L2 norm, unfloored); task 2 merges
    (F_acc theta_prev + F~_2 theta') / (F_acc + F~_2), F~_2 its Fisher floored, and adds the
    unfloored F_2 to F_acc."""
    strategy = FisherMerge(normalize=True, fisher_floor=0.1)
    ends, fishers = [[1.0, 1, 1], [5.0, 3, 3]], [[3.0, 4, 0], [0.0, 0, 2]]
    merged, entry = fisher_merged(strategy, ends, fishers, stream_of(1, 1), tmp_path)[-1]
    f1, f2 = torch.tensor([0.6, 0.8, 0.0]), torch.tensor([0.0, 0.0, 1.0])  # F/||F||
    floored = torch.tensor([0.1, 0.1, 1.0])  # F_2 floored at 0.1, in its own term only
    by_hand = (f1 * torch.tensor(ends[0]) + floored * torch.tensor(ends[1])) / (f1 + floored)
    torch.testing.assert_close(merged, by_hand)
    assert merged[2].item() == 3.0  # F_acc is 0 there: theta' (the floor of F_1 no longer pulls it)
    torch.testing.assert_close(strategy.fisher["w"], f1 + f2)
    assert entry == {
        "fisher_norm": 2.0,
        "floored_share": pytest.approx(2 / 3),
        "new_weight_mean": pytest.approx((0.1 / 0.7 + 0.1 / 0.9 + 1 / 1.0) / 3),
    }


def test_fisher_merge_takes_the_newest_theta_where_no_fisher_sees_an_element(stream_of, tmp_path):
    """Zero Fisher everywhere: every task's merge is its own theta' (the floor is on the new task's
    term only, as the paper's code floors the target model's Fisher), not the mean of all of them."""
    strategy = FisherMerge(normalize=True)
    ends = [[1.0, -4.0], [2.0, 0.5], [3.0, 7.0]]
    merges = fisher_merged(strategy, ends, [[0.0, 0.0]] * 3, stream_of(1, 1, 1), tmp_path)
    assert [merged.tolist() for merged, _ in merges] == ends  # not 1, 1.5, 2 (the mean so far)
    assert torch.equal(strategy.fisher["w"], torch.zeros(2))
    assert merges[-1][1] == {"fisher_norm": 0.0, "floored_share": 1.0, "new_weight_mean": 1.0}


def test_fisher_merge_uses_the_tasks_empirical_fisher(make_module, make_ctx, stream_of):
    """F_t is EWC's empirical Fisher on the task's own data at theta' (per example by default)."""
    module, stream = make_module(), stream_of(8, 8)
    ctx = make_ctx(module, stream, 0)
    strategy = FisherMerge(fisher_batches=1, fisher_floor=1e-6)
    strategy.on_task_start(ctx)
    torch.manual_seed(1)  # the same shuffled batch (the toy services' loader draws from the global RNG)
    strategy.on_task_end(ctx)
    torch.manual_seed(1)
    fisher = empirical_fisher(ctx, module.trainable_parameters(), batches=1, per_sample=True)
    norm = sum(f.double().square().sum() for f in fisher.values()).sqrt().item()
    for name, f in fisher.items():
        torch.testing.assert_close(strategy.fisher[name], f / norm)  # F_acc: unfloored


# -- attribution merging ---------------------------------------------------------------------------
def no_prior(monkeypatch) -> None:
    """Priors as if none were needed: the test sets Rbar itself."""
    monkeypatch.setattr(PriorSource, "prior", lambda self, ctx, needed: None)


def test_attribution_merge_is_exact_at_gates_0_and_1(stream_of, tmp_path, monkeypatch):
    """theta <- lerp(theta', theta_prev, Rbar): theta' bit for bit where Rbar is 0, theta_prev where it
    is 1, and theta_prev + (1 - Rbar)(theta' - theta_prev) between."""
    no_prior(monkeypatch)
    torch.manual_seed(0)
    prev, trained = torch.randn(3000), torch.randn(3000)
    rbar = torch.rand(3000)
    rbar[:1000], rbar[1000:2000] = 0.0, 1.0
    strategy = AttributionMerge(prior_dir=str(tmp_path / "priors"))
    strategy.load_state_dict({"rbar.w": rbar})
    (after,) = run_tasks(strategy, prev, [trained], stream_of(1), tmp_path)
    assert torch.equal(after[:1000], trained[:1000]) and torch.equal(after[1000:2000], prev[1000:2000])
    between = prev + (1 - rbar) * (trained - prev)
    torch.testing.assert_close(after[2000:], between[2000:])
    assert not torch.equal(after[2000:], trained[2000:])


# -- state ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: TIES(top_k=0.3),
        lambda: TIES(top_k=0.3, start_from="finetuned"),
        lambda: MagMax(),
        lambda: FisherMerge(),
    ],
    ids=["ties", "ties-finetuned", "magmax", "fisher_merge"],
)
def test_restored_state_merges_the_next_task_as_the_original(make, stream_of, tmp_path, monkeypatch):
    """Saved through safetensors after two tasks and restored into a fresh strategy (whose setup sees
    the starting weights, as a resumed run's does), the third task starts from the same weights
    (theta' with start_from "finetuned") and merges to the same bits. (Fisher
    merging's Fisher here: a function of the weights, for a stand-in model without data.)"""
    fisher = lambda ctx, params, *args: {n: (p.detach() - 3).abs() + 0.5 for n, p in params.items()}  # noqa: E731
    monkeypatch.setattr("strategies.merging.empirical_fisher", fisher)
    stream = stream_of(1, 1, 1)
    original = make()
    merged = run_tasks(original, THETA0, [THETA0 + t for t in TAU[:2]], stream, tmp_path)[-1]
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(tmp_path / "s.safetensors"))
    restored = make()
    restored.setup(StrategyContext(Weights(w=THETA0), stream, 0, tmp_path))
    restored.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    results = []
    for strategy in (original, restored):
        module = Weights(w=merged)  # where the second task's merge left the model
        ctx = StrategyContext(module, stream, 2, tmp_path)
        strategy.on_task_start(ctx)
        started = module.params["w"].detach().clone()
        with torch.no_grad():
            module.params["w"].add_(TAU[2])
        strategy.on_task_end(ctx)
        results.append((started, module.params["w"].detach().clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"cls": LinearMerge, "alpha": 1.5}, "linear_merge.alpha"),
        ({"cls": TIES, "top_k": 0.0}, "ties.top_k"),
        ({"cls": TIES, "start_from": "start"}, "ties.start_from"),
        ({"cls": MagMax, "scale": 0.0}, "magmax.scale"),
        ({"cls": FisherMerge, "fisher_floor": 0.0}, "fisher_merge.fisher_floor"),
        ({"cls": FisherMerge, "fisher_batches": 0}, "fisher_merge.fisher_batches"),
    ],
)
def test_invalid_options_name_themselves(kwargs, option):
    cls = kwargs.pop("cls")
    with pytest.raises(ValueError, match=option):
        cls(**kwargs)
