"""GatedAdamW, the update gate folded into AdamW's step: torch's AdamW bit for bit where nothing is
held, the former copy-then-lerp formula in between, a tensor held at 1 frozen (weight decay and
momentum included), and the removed update mass of a step that measures it."""

from __future__ import annotations

import pytest
import torch

from clbench.module import GatedAdamW
from clbench.strategy import UpdateGate

SHAPES = [(37, 19), (300,)]  # odd sizes: the vectorised kernels' tails too
LRS = [1e-2, 3e-3, 5e-3, 1e-3]  # a schedule: the learning rate changes between steps


def make_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def twins(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def adamw(params, weight_decay: float, gate=None) -> torch.optim.AdamW:
    """torch's AdamW, or GatedAdamW asking `gate` (the settings CLModule uses, TRACE's betas)."""
    kwargs = {"lr": LRS[0], "betas": (0.9, 0.95), "weight_decay": weight_decay}
    return torch.optim.AdamW(params, **kwargs) if gate is None else GatedAdamW(params, gate, **kwargs)


def train(optimizer: torch.optim.Optimizer, params, steps: int = len(LRS), first: int = 0) -> None:
    for step in range(first, first + steps):
        for group in optimizer.param_groups:
            group["lr"] = LRS[step % len(LRS)]
        set_grads(params, step)
        optimizer.step()


def random_gate(params, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=g).to(p.dtype) for p in params]


def states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer, pa, pb) -> bool:
    return all(torch.equal(a.state[x][k], b.state[y][k]) for x, y in zip(pa, pb) for k in a.state[x])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_held_zero_is_torch_adamw_bit_for_bit(dtype, weight_decay):
    plain, gated = make_params(dtype), make_params(dtype)
    held = {gated[0]: torch.zeros_like(gated[0])}  # the first through gated_adamw_, the second through torch
    ref, opt = adamw(plain, weight_decay), adamw(gated, weight_decay, lambda: UpdateGate(held))
    train(ref, plain)
    train(opt, gated)
    assert all(torch.equal(a, b) for a, b in zip(plain, gated))
    assert states_equal(ref, opt, plain, gated)
    assert not torch.equal(plain[0], make_params(dtype)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_held_tensors_move_as_the_former_copy_then_lerp(dtype):
    """theta_new = lerp(theta_step, theta_old, gate) with theta_step torch's AdamW step, as the
    strategy computed it before (a copy before the step, a lerp after); here bit for bit."""
    plain, gated = make_params(dtype), make_params(dtype)
    gate = random_gate(plain)
    ref = adamw(plain, 0.1)
    opt = adamw(gated, 0.1, lambda: UpdateGate(dict(zip(gated, gate))))
    for step in range(len(LRS)):
        old = [p.detach().clone() for p in plain]
        train(ref, plain, steps=1, first=step)
        with torch.no_grad():
            for p, o, r in zip(plain, old, gate):
                p.lerp_(o, r)
        train(opt, gated, steps=1, first=step)
    assert all(torch.equal(a, b) for a, b in zip(plain, gated))
    assert states_equal(ref, opt, plain, gated)  # the moments see the whole gradient, as before


def test_held_one_freezes_the_tensor_weight_decay_and_momentum_included():
    params = make_params(torch.float32)
    opt = adamw(params, 0.1, lambda: None)
    train(opt, params)  # momentum from earlier steps
    frozen, moments = params[0].detach().clone(), opt.state[params[0]]["exp_avg"].clone()
    other = params[1].detach().clone()
    opt.gate = lambda: UpdateGate({params[0]: torch.ones_like(params[0])})
    train(opt, params, first=len(LRS))
    assert torch.equal(params[0], frozen)
    assert not torch.equal(opt.state[params[0]]["exp_avg"], moments)  # its moments still follow g
    assert not torch.equal(params[1], other)


def test_a_measured_step_adds_the_removed_and_the_whole_update_mass():
    plain, gated = make_params(torch.float32), make_params(torch.float32)
    gate, mass = random_gate(plain), torch.zeros(2, dtype=torch.float64)
    ref = adamw(plain, 0.1)
    opt = adamw(gated, 0.1, lambda: UpdateGate(dict(zip(gated, gate)), mass))
    old = [p.detach().clone() for p in plain]
    train(ref, plain, steps=1)
    train(opt, gated, steps=1)
    # the former counter: |theta_step - theta_old| of each held tensor, reduced in float64
    moved = [(p - o).abs_() for p, o in zip(plain, old)]
    removed = sum((r * m).sum(dtype=torch.float64) for r, m in zip(gate, moved))
    total = sum(m.sum(dtype=torch.float64) for m in moved)
    assert mass.tolist() == [removed.item(), total.item()]
    assert 0 < mass[0] < mass[1]


def test_step_runs_the_closure_once_and_gives_the_gradients_back():
    params = make_params(torch.float32)
    set_grads(params, 0)
    grads, calls = [p.grad for p in params], []
    opt = adamw(params, 0.0, lambda: UpdateGate({params[0]: torch.full_like(params[0], 0.5)}))
    loss = opt.step(lambda: calls.append(1) or torch.tensor(3.0))
    assert calls == [1] and loss.item() == 3.0
    assert all(p.grad is g for p, g in zip(params, grads))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)


def test_step_hooks_run_once_per_step_even_after_a_plain_adamw():
    """torch wraps AdamW.step with the step hooks once any AdamW exists; GatedAdamW calling that wrapped
    parent ran every hook twice (a hook counting steps saw 4 for 2)."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # wraps AdamW.step, as any plain AdamW does
    params = make_params(torch.float32)
    opt, calls = adamw(params, 0.0, lambda: None), []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    train(opt, params, steps=2)
    assert calls == ["pre", "post"] * 2
