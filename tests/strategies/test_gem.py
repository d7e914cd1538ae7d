"""GEM and A-GEM: the projected gradient satisfies every memory constraint and is the QP's solution
(checked against solvers that share nothing with GEM's), A-GEM's is its closed form, and the memory
holds what it should."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, nnls

from clbench.gradients import gram, mean_loss_grads
from strategies.gem import AGEM, GEM, gem_multipliers


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors.values()])


def violated_case(seed: int, k: int = 3, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """k memory gradients and a gradient at an obtuse angle to at least one of them."""
    rng = np.random.default_rng(seed)
    memories = rng.normal(size=(k, n))
    g = rng.normal(size=n) - 2 * memories[0]
    assert (memories @ g < 0).any()
    return memories, g


@pytest.mark.parametrize("seed", range(5))
def test_the_projection_is_the_closest_gradient_meeting_every_constraint(seed):
    memories, g = violated_case(seed)
    v = gem_multipliers(memories @ memories.T, memories @ g, margin=0.0)
    z = g + memories.T @ v
    assert (memories @ z >= -1e-9).all()  # no memory loss rises, to first order
    # the primal QP, min ||z - g||^2 subject to G z >= 0, by SLSQP (no NNLS, no dual)
    primal = minimize(
        lambda x: 0.5 * ((x - g) ** 2).sum(),
        np.zeros_like(g),  # feasible
        jac=lambda x: x - g,
        constraints=[{"type": "ineq", "fun": lambda x: memories @ x, "jac": lambda x: memories}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert primal.success
    np.testing.assert_allclose(z, primal.x, atol=1e-6)


def test_the_margin_bounds_the_dual_and_solves_it():
    memories, g = violated_case(7)
    gram, q = memories @ memories.T, memories @ g
    v = gem_multipliers(gram, q, margin=0.5)
    assert (v >= 0.5 - 1e-12).all()
    dual = minimize(
        lambda x: 0.5 * x @ gram @ x + q @ x,
        np.full(3, 0.5),
        jac=lambda x: gram @ x + q,
        bounds=[(0.5, None)] * 3,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12},
    )
    np.testing.assert_allclose(v, dual.x, atol=1e-6)


def test_linearly_dependent_memories_are_solved_too():
    memories, g = violated_case(3)
    memories = np.vstack([memories, 2 * memories[0]])  # a rank-deficient Gram matrix
    z = g + memories.T @ gem_multipliers(memories @ memories.T, memories @ g, margin=0.0)
    assert (memories @ z >= -1e-9).all()
    np.testing.assert_allclose(np.linalg.norm(z - g), _projection_distance(memories, g), rtol=1e-6)


def _projection_distance(memories: np.ndarray, g: np.ndarray) -> float:
    """||z - g|| at the optimum from the dual as plain NNLS on the explicit vectors."""
    v, _ = nnls(memories.T, -g)
    return float(np.linalg.norm(memories.T @ v))


def after_two_tasks(strategy, make_module, make_ctx, stream_of, fit_task):
    module, stream = make_module(), stream_of(8, 8, 8)
    for t in (0, 1):
        fit_task(module, strategy, make_ctx(module, stream, t), steps=2)
    ctx = make_ctx(module, stream, 2)
    strategy.on_task_start(ctx)
    return module, stream, ctx


def memory_gradient(strategy, ctx, t: int) -> torch.Tensor:
    examples = [ex for k, ex in strategy.memory if k == t]
    batches = list(ctx.services.make_loader(examples, False, ctx.stream.tasks[t]))
    return flat(mean_loss_grads(ctx.module, batches, ctx.module.trainable_parameters()))


def set_grad(module, vector: torch.Tensor) -> None:
    start = 0
    for p in module.trainable_parameters().values():
        p.grad = vector[start : start + p.numel()].view_as(p).to(p.dtype).clone()
        start += p.numel()


def grad_vector(module) -> torch.Tensor:
    return flat({n: p.grad for n, p in module.trainable_parameters().items()})


def test_memory_keeps_the_configured_examples_of_each_finished_task(
    make_module, make_ctx, stream_of, fit_task
):
    gem = GEM(memory_per_task=3)
    module, stream, _ = after_two_tasks(gem, make_module, make_ctx, stream_of, fit_task)
    assert [t for t, _ in gem.memory] == [0, 0, 0, 1, 1, 1]
    for t, ex in gem.memory:
        assert ex in stream.tasks[t].train
    again = GEM()
    again.load_state_dict(gem.state_dict())
    assert again.memory == gem.memory and again.counts == gem.counts


def test_gem_in_the_model_meets_every_constraint_and_equals_an_independent_qp(
    make_module, make_ctx, stream_of, fit_task
):
    gem = GEM(memory_per_task=4, margin=0.0)
    module, _, ctx = after_two_tasks(gem, make_module, make_ctx, stream_of, fit_task)
    refs = torch.stack([memory_gradient(gem, ctx, t) for t in (0, 1)])
    g = -refs[0] + 0.3 * refs[1]  # raises task 0's memory loss
    set_grad(module, g.float())
    gem.on_before_optimizer_step(ctx, None)
    z = grad_vector(module)
    assert (refs @ z >= -1e-6 * refs.norm(dim=1) * z.norm()).all()
    v, _ = nnls(refs.T.numpy(), -g.float().double().numpy())  # the dual as NNLS on the full vectors
    expected = g.float().double() + refs.T @ torch.from_numpy(v)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-6)
    assert gem.counts[ctx.task.name] == {"steps": 1, "projected": 1}


def test_gem_leaves_a_gradient_that_raises_no_memory_loss_untouched(
    make_module, make_ctx, stream_of, fit_task
):
    gem = GEM(memory_per_task=4)
    module, _, ctx = after_two_tasks(gem, make_module, make_ctx, stream_of, fit_task)
    g = (memory_gradient(gem, ctx, 0) + memory_gradient(gem, ctx, 1)).float()
    set_grad(module, g)
    before = grad_vector(module)
    gem.on_before_optimizer_step(ctx, None)
    assert torch.equal(grad_vector(module), before)
    assert gem.counts[ctx.task.name] == {"steps": 1, "projected": 0}


def test_agem_equals_its_closed_form(make_module, make_ctx, stream_of, fit_task):
    agem = AGEM(memory_per_task=4, memory_batch=None)  # the whole memory: no draw
    module, _, ctx = after_two_tasks(agem, make_module, make_ctx, stream_of, fit_task)
    examples = {t: [ex for k, ex in agem.memory if k == t] for t in (0, 1)}
    batches = [
        b for t, exs in examples.items() for b in ctx.services.make_loader(exs, False, ctx.stream.tasks[t])
    ]
    ref = flat(mean_loss_grads(module, batches, module.trainable_parameters()))
    g = -ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=ref.dtype) * 1e-3
    set_grad(module, g.float())
    agem.on_before_optimizer_step(ctx, None)
    g = g.float().double()
    expected = g - (g @ ref) / (ref @ ref) * ref
    torch.testing.assert_close(grad_vector(module), expected, rtol=1e-4, atol=1e-7)
    assert abs(float(grad_vector(module) @ ref)) < 1e-5 * ref.norm() * g.norm()  # orthogonal now


def test_agem_draws_memory_batch_examples_per_step(make_module, make_ctx, stream_of, fit_task, monkeypatch):
    agem = AGEM(memory_per_task=4, memory_batch=3)
    module, _, ctx = after_two_tasks(agem, make_module, make_ctx, stream_of, fit_task)
    seen = []
    monkeypatch.setattr(agem, "_gradient", lambda c, kept, p: seen.append(kept) or {})
    agem.references(ctx, module.trainable_parameters())
    assert len(seen[0]) == 3 and all(entry in agem.memory for entry in seen[0])


@pytest.mark.parametrize("bad", [{"memory_per_task": 0}, {"memory_batch": 0}, {"margin": -1.0}])
def test_bad_settings_name_the_option(bad):
    with pytest.raises(ValueError, match=f"gem.{next(iter(bad))}"):
        GEM(**bad)


def test_gram_is_every_pairs_whole_model_dot_product():
    g = torch.Generator().manual_seed(4)
    vectors = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    flats = torch.stack([flat(v) for v in vectors])
    torch.testing.assert_close(gram(vectors), flats @ flats.T, rtol=1e-6, atol=1e-6)
