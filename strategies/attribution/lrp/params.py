"""Operations that consume parameters, with per-sample parameter relevance in their backward.

The forward saves the layer input x_k (a forward hook, in effect) and the backward receives the
modified gradient G_k of the output (a backward hook): for a linear layer y = x W^T + b,

    R_k(W) = 1/2 W * (G_k^T x_k)    (Prop. 4.2: x @ W is a product, W keeps half)
    R_k(b) = b * sum_t G_k[t]       (reading 3.2: a bias is degree 1, no halving)

computed for all samples k at once with one batched matmul, in fp32 (fp64 for fp64 models), and
handed to the sink one layer at a time. Parameters enter detached: scoring never touches .grad.

LoRA (peft), W~ = W + s B A, uses the "merged" bracketing of reading 3.7: the layer is the product
x @ W~ (x gets half, W~ gets half), W~ splits proportionally into W and s B A, and the product B A
halves again, so R(W) = W * G(W~), R(B) = 1/2 s B * (G(W~) A^T), R(A) = 1/2 s A * (B^T G(W~)),
with G(W~) = 1/2 G^T x. A and B each get a quarter of the adapter's share of the layer's product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from strategies.attribution.lrp.sink import RelevanceSink


@dataclass
class Adapter:
    """One active LoRA adapter: delta W = scaling * B @ A, A (r, in), B (out, r)."""

    a: Tensor
    b: Tensor
    scaling: float


@dataclass
class LinearSpec:
    """A linear map y = x W^T + b (nn.Linear) or y = x W + b (GPT-2 Conv1D), plus LoRA adapters."""

    weight: Tensor
    bias: Tensor | None
    transposed: bool = False
    adapters: list[Adapter] = field(default_factory=list)


def linear_spec(module: nn.Module, sink: RelevanceSink) -> LinearSpec:
    """Read a Linear, a GPT-2 Conv1D or a peft LoRA layer over either; refuse anything else."""
    if type(module) is nn.Linear:
        return LinearSpec(module.weight, module.bias)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return LinearSpec(module.weight, module.bias, transposed=True)
    if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
        return _lora_spec(module, sink)
    raise ValueError(f"parameter attribution does not support layer type {type(module).__name__}")


def _lora_spec(module: nn.Module, sink: RelevanceSink) -> LinearSpec:
    spec = linear_spec(module.get_base_layer(), sink)
    # mirror peft's forward: disabled or merged adapters do not run (a merged delta is inside W)
    running = [] if module.disable_adapters or module.merged else list(module.active_adapters)
    for name in module.lora_A:
        a, b = module.lora_A[name], module.lora_B[name]
        if name not in running:
            sink.declare_zero(a.weight)
            sink.declare_zero(b.weight)
            continue
        if name in getattr(module, "lora_variant", {}) or b.bias is not None:
            raise ValueError(
                f"parameter attribution supports plain LoRA only (adapter {name!r} is a variant)"
            )
        spec.adapters.append(Adapter(a.weight, b.weight, float(module.scaling[name])))
    return spec


def linear(x: Tensor, spec: LinearSpec, sink: RelevanceSink) -> Tensor:
    """Apply the layer to x (B, T, in); its parameters' relevance goes to the sink in the backward."""
    for p in _params(spec):
        sink.use(p)
    return _Linear.apply(x, spec, sink)


def _params(spec: LinearSpec) -> list[Tensor]:
    found = [spec.weight] + ([spec.bias] if spec.bias is not None else [])
    return found + [t for ad in spec.adapters for t in (ad.a, ad.b)]


def _base_forward(x: Tensor, spec: LinearSpec) -> Tensor:
    w = spec.weight.detach()
    b = None if spec.bias is None else spec.bias.detach()
    if not spec.transposed:
        return F.linear(x, w, b)
    out = x.reshape(-1, x.shape[-1]) @ w if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
    return out.view(*x.shape[:-1], w.shape[-1])


class _Linear(Function):
    @staticmethod
    def forward(ctx, x: Tensor, spec: LinearSpec, sink: RelevanceSink) -> Tensor:
        ctx.save_for_backward(x)
        ctx.spec, ctx.sink = spec, sink
        y = _base_forward(x, spec)
        out_dtype = y.dtype
        for ad in spec.adapters:
            # same arithmetic as peft: result + lora_B(lora_A(x)) * scaling, cast back at the end
            xa = x.to(ad.a.dtype)
            y = y + F.linear(F.linear(xa, ad.a.detach()), ad.b.detach()) * ad.scaling
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        spec, sink = ctx.spec, ctx.sink
        _report_relevance(x, g, spec, sink)
        return _input_grad(g, spec).to(x.dtype), None, None


def _input_grad(g: Tensor, spec: LinearSpec) -> Tensor:
    """Half the ordinary input gradient of x @ W~: x is one factor of the product."""
    w = spec.weight.detach()
    grad = g @ (w.T if spec.transposed else w)
    for ad in spec.adapters:
        ga = (g.to(ad.b.dtype) @ ad.b.detach()) @ ad.a.detach()
        grad = grad + (ad.scaling * ga).to(grad.dtype)
    return 0.5 * grad


def _report_relevance(x: Tensor, g: Tensor, spec: LinearSpec, sink: RelevanceSink) -> None:
    acc = sink.dtype
    xs, gs = x.to(acc).flatten(1, -2), g.to(acc).flatten(1, -2)  # (B, T, in), (B, T, out)
    if spec.bias is not None:
        sink.add(spec.bias, spec.bias.detach().to(acc) * gs.sum(1))
    # G^T x per sample in nn.Linear layout (B, out, in); W~ keeps half of it, G(W~) = 1/2 G^T x.
    # The halves are folded into the small factors so the big maps are touched once.
    gtx = torch.bmm(gs.transpose(1, 2), xs)
    for ad in spec.adapters:
        a, b = ad.a.detach().to(acc), ad.b.detach().to(acc)
        quarter_s = 0.25 * ad.scaling  # 1/2 (W~ of the layer product) * 1/2 (the product B A)
        sink.add(ad.b, b * (gtx @ (quarter_s * a.T)))  # (B, out, r)
        sink.add(ad.a, a * ((quarter_s * b.T) @ gtx))  # (B, r, in)
    if spec.transposed:
        gtx = gtx.transpose(1, 2)  # (B, in, out), Conv1D layout
    sink.add(spec.weight, gtx.mul_(0.5 * spec.weight.detach().to(acc)))


def gather_rows(rows: Tensor, table: Tensor, sink: RelevanceSink, anchor: Tensor) -> Tensor:
    """table[rows] (embedding lookup, lm_head seed row); R of each looked-up row = row * G.

    A lookup is a constant selection (reading 3.6), so the relevance reaching the output is the
    relevance of the rows themselves. `anchor` is a scalar requiring grad that makes the output
    part of the autograd graph without giving the (detached) table a gradient.
    """
    sink.use(table)
    return _Gather.apply(anchor, rows, table, sink)


class _Gather(Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, rows: Tensor, table: Tensor, sink: RelevanceSink) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.table, ctx.sink = table, sink
        return F.embedding(rows, table.detach()) if table.dim() == 2 else table.detach()[rows]

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[None, None, None, None]:
        (rows,) = ctx.saved_tensors
        table, sink = ctx.table, ctx.sink
        values = table.detach()[rows].to(sink.dtype) * g.to(sink.dtype)
        sink.add_rows(table, rows, values)
        return None, None, None, None
