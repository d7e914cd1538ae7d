"""LRP rules as autograd functions on activations (docs/attribution.md section 1).

Relevance is tensor x modified gradient: R(t) = t * G(t). Every function here computes the
ordinary forward value and replaces the local backward with its LRP rule, so one autograd
backward from the seed logit carries G through the whole network:

- a product of two variable factors (Q @ K^T, A @ V, gate * up) gives each factor half of the
  ordinary vector-Jacobian product (Lemma 4.1: a product is homogeneous of degree 2);
- a nonlinearity y = f(x) taken by the identity rule R(x) = R(y) has G(x) = (y / x) * G(y),
  with y / x in closed form where one exists (SiLU -> sigmoid, GELU -> Phi, RMSNorm -> w / rms).

Sums, residuals, RoPE, the 1/sqrt(d) scale and GQA repeats are linear and keep their ordinary
gradient, so they need nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function


class _HalfMatmul(Function):
    """a @ b whose backward gives each factor half its ordinary gradient."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        return 0.5 * torch.matmul(g, b.transpose(-1, -2)), 0.5 * torch.matmul(a.transpose(-1, -2), g)


class _HalfMul(Function):
    """Elementwise a * b (same shapes) whose backward gives each factor half its gradient."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        half = 0.5 * g
        return half * b, half * a


class _IdentityRule(Function):
    """y = f(x) with R(x) = R(y): the backward multiplies G(y) by the saved ratio y / x."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        y, ratio = fn(x)
        ctx.save_for_backward(ratio)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


def half_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Bilinear product of two activations (Lemma 4.1)."""
    return _HalfMatmul.apply(a, b)


def half_mul(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise bilinear product, e.g. SwiGLU's act(gate) * up (Lemma 4.1)."""
    return _HalfMul.apply(a, b)


def identity_rule(x: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """Apply y, ratio = fn(x) with the identity rule; ratio must equal y / x elementwise."""
    return _IdentityRule.apply(x, fn)


def safe_ratio(y: Tensor, x: Tensor) -> Tensor:
    """y / x, 0 where x == 0 (a measure-zero event that would otherwise give inf * 0 = nan)."""
    return torch.where(x != 0, y / x, 0.0)  # the inf / nan of y / 0 are discarded by the where


def _tanh_gelu_ratio(x: Tensor) -> Tensor:
    # gelu_new / gelu_pytorch_tanh / gelu_fast: y = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * (1.0 + torch.tanh(c * (x + 0.044715 * x.pow(3))))


# activation name in the HF config -> closed form of y / x
_ACTIVATION_RATIOS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": torch.sigmoid,
    "swish": torch.sigmoid,
    "gelu": lambda x: 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0)))),
    "gelu_new": _tanh_gelu_ratio,
    "gelu_pytorch_tanh": _tanh_gelu_ratio,
    "gelu_fast": _tanh_gelu_ratio,
    "relu": lambda x: (x > 0).to(x.dtype),
}


def activation(x: Tensor, name: str, act: Callable[[Tensor], Tensor]) -> Tensor:
    """The model's own activation module `act` (exact forward values), identity-rule backward."""
    if name not in _ACTIVATION_RATIOS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATION_RATIOS)}")
    ratio = _ACTIVATION_RATIOS[name]
    return identity_rule(x, lambda t: (act(t), ratio(t)))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama-style RMSNorm as a whole: G(x) = weight / rms(x) * G(y), nothing to the weight."""

    def fn(t: Tensor) -> tuple[Tensor, Tensor]:
        # LlamaRMSNorm.forward's arithmetic (fp32 for half precision), but fp64 stays fp64 so that
        # y / x == weight / rms holds to the last bit in exact tests
        up = t.to(torch.promote_types(t.dtype, torch.float32))
        inv_rms = torch.rsqrt(up.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (up * inv_rms).to(t.dtype)
        return y, (weight * inv_rms.to(t.dtype)).to(y.dtype)

    return identity_rule(x, fn)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm as a whole: G(x) = (y / x) * G(y). The ratio is unbounded near x = 0 (section 4)."""

    def fn(t: Tensor) -> tuple[Tensor, Tensor]:
        y = F.layer_norm(t, t.shape[-1:], weight, bias, eps)
        return y, safe_ratio(y, t)

    return identity_rule(x, fn)


def softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Masked softmax over the last dim, identity rule with ratio A / S (0 on masked entries).

    `scores` are the scaled pre-softmax scores Q K^T / sqrt(d_head) (reading 3.1: E_r is the scaled
    matrix; the unscaled one loses relevance). Masked entries are filled with the dtype's minimum
    rather than -inf, so a fully masked row (a left-padding query) is uniform instead of nan; its
    output never reaches the seed, so its G is zero.
    """

    def fn(s: Tensor) -> tuple[Tensor, Tensor]:
        masked = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        # fp32 softmax like HF eager for half precision; fp64 stays fp64 for exact tests
        a = torch.softmax(masked, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
        return a, safe_ratio(a, s).masked_fill(~allowed, 0.0)

    return identity_rule(scores, fn)
