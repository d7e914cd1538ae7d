"""The scoring forward of each supported block family, on the Hugging Face modules' own weights.

Each forward recomputes what the HF model computes (eager attention, whatever implementation the
model was loaded with, and no dropout: scoring is always in eval semantics) out of the LRP-aware
pieces in rules.py and params.py, so that one ordinary autograd backward is the modified backward.
Nothing is patched or hooked on the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from strategies.attribution.lrp import rules
from strategies.attribution.lrp.params import gather_rows, linear, linear_spec
from strategies.attribution.lrp.sink import RelevanceSink


@dataclass
class Pass:
    """What every layer of one scoring pass needs."""

    sink: RelevanceSink
    anchor: Tensor  # scalar requiring grad: puts the embedding lookups into the graph
    valid: Tensor  # (B, T) bool, False on padding
    positions: Tensor  # (B, T) position ids, counted over non-padding tokens


@dataclass
class Architecture:
    """hidden: token ids -> last hidden states (B, T, d) before the final norm; final_norm on (B, d)."""

    hidden: Callable[[nn.Module, Tensor, Pass], Tensor]
    final_norm: Callable[[nn.Module, Tensor, Pass], Tensor]


def _allowed(valid: Tensor, window: int | None = None) -> Tensor:
    """(B, 1, T, T) keys each query may attend to: causal, not padding, inside a sliding window."""
    t = valid.shape[1]
    i = torch.arange(t, device=valid.device)
    ok = i[None, :] <= i[:, None]  # (T_query, T_key)
    if window is not None:
        ok = ok & (i[None, :] > i[:, None] - window)  # HF's sliding_window_overlay
    return ok[None, None] & valid[:, None, None, :]


def _attend(q: Tensor, k: Tensor, v: Tensor, scaling: float, allowed: Tensor) -> Tensor:
    """softmax(Q K^T * scaling) V on (B, H, T, D) heads: two products, each halving (Prop. 4.3)."""
    scores = rules.half_matmul(q, k.transpose(-1, -2)) * scaling
    return rules.half_matmul(rules.softmax(scores, allowed), v)


def _heads(y: Tensor, head_dim: int) -> Tensor:
    return y.view(*y.shape[:2], -1, head_dim).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)


def _merge_heads(y: Tensor) -> Tensor:
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)  # (B, H, T, D) -> (B, T, H*D)


def _proj(module: nn.Module, x: Tensor, ctx: Pass) -> Tensor:
    return linear(x, linear_spec(module, ctx.sink), ctx.sink)


# ---- Llama family: Llama 3.x, SmolLM2, Mistral, Qwen2 ----


def _rms(norm: nn.Module, x: Tensor, ctx: Pass) -> Tensor:
    ctx.sink.declare_zero(norm.weight)
    return rules.rms_norm(x, norm.weight.detach(), norm.variance_epsilon)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE, a constant rotation per position: linear, ordinary gradient."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _llama_attention(attn: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], ctx: Pass) -> Tensor:
    d = attn.head_dim
    q = _rope(_heads(_proj(attn.q_proj, x, ctx), d), *rope)
    k = _rope(_heads(_proj(attn.k_proj, x, ctx), d), *rope)
    v = _heads(_proj(attn.v_proj, x, ctx), d)
    k, v = _repeat_kv(k, attn.num_key_value_groups), _repeat_kv(v, attn.num_key_value_groups)
    # Qwen2 sets sliding_window per layer; Mistral reads it from the config for every layer
    window = (
        attn.sliding_window
        if hasattr(attn, "sliding_window")
        else getattr(attn.config, "sliding_window", None)
    )
    out = _attend(q, k, v, attn.scaling, _allowed(ctx.valid, window))
    return _proj(attn.o_proj, _merge_heads(out), ctx)


def _swiglu(mlp: nn.Module, x: Tensor, ctx: Pass) -> Tensor:
    gate = rules.activation(_proj(mlp.gate_proj, x, ctx), mlp.config.hidden_act, mlp.act_fn)
    return _proj(mlp.down_proj, rules.half_mul(gate, _proj(mlp.up_proj, x, ctx)), ctx)


def _llama_hidden(lm: nn.Module, ids: Tensor, ctx: Pass) -> Tensor:
    core = lm.model
    h = gather_rows(ids, _embedding(core.embed_tokens), ctx.sink, ctx.anchor)
    with torch.no_grad():
        rope = core.rotary_emb(h, ctx.positions)
    for layer in core.layers[: lm.config.num_hidden_layers]:
        h = h + _llama_attention(layer.self_attn, _rms(layer.input_layernorm, h, ctx), rope, ctx)
        h = h + _swiglu(layer.mlp, _rms(layer.post_attention_layernorm, h, ctx), ctx)
    return h


def _llama_final_norm(lm: nn.Module, h: Tensor, ctx: Pass) -> Tensor:
    return _rms(lm.model.norm, h, ctx)


# ---- GPT-2: LayerNorm, biases, Conv1D, learned positions ----


def _ln(norm: nn.Module, x: Tensor, ctx: Pass) -> Tensor:
    ctx.sink.declare_zero(norm.weight)
    ctx.sink.declare_zero(norm.bias)
    weight = None if norm.weight is None else norm.weight.detach()
    bias = None if norm.bias is None else norm.bias.detach()
    return rules.layer_norm(x, weight, bias, norm.eps)


def _gpt2_attention(attn: nn.Module, x: Tensor, allowed: Tensor, ctx: Pass) -> Tensor:
    q, k, v = _proj(attn.c_attn, x, ctx).split(attn.split_size, dim=2)
    d = attn.head_dim
    out = _attend(_heads(q, d), _heads(k, d), _heads(v, d), attn.scaling, allowed)
    return _proj(attn.c_proj, _merge_heads(out), ctx)


def _gpt2_mlp(mlp: nn.Module, x: Tensor, act_name: str, ctx: Pass) -> Tensor:
    hidden = rules.activation(_proj(mlp.c_fc, x, ctx), act_name, mlp.act)
    return _proj(mlp.c_proj, hidden, ctx)


def _gpt2_hidden(lm: nn.Module, ids: Tensor, ctx: Pass) -> Tensor:
    core, config = lm.transformer, lm.config
    if config.add_cross_attention:
        raise ValueError("parameter attribution does not support GPT-2 with cross-attention")
    # token + position embeddings: a sum, so each lookup keeps its own share (proportional split)
    h = gather_rows(ids, _embedding(core.wte), ctx.sink, ctx.anchor)
    h = h + gather_rows(ctx.positions, _embedding(core.wpe), ctx.sink, ctx.anchor)
    allowed = _allowed(ctx.valid)
    for block in core.h:
        h = _gpt2_attention(block.attn, _ln(block.ln_1, h, ctx), allowed, ctx) + h
        h = h + _gpt2_mlp(block.mlp, _ln(block.ln_2, h, ctx), config.activation_function, ctx)
    return h


def _gpt2_final_norm(lm: nn.Module, h: Tensor, ctx: Pass) -> Tensor:
    return _ln(lm.transformer.ln_f, h, ctx)


def _embedding(module: nn.Module) -> Tensor:
    if type(module) is not nn.Embedding:
        raise ValueError(f"parameter attribution does not support embedding type {type(module).__name__}")
    return module.weight


_LLAMA = Architecture(_llama_hidden, _llama_final_norm)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Architecture(_gpt2_hidden, _gpt2_final_norm),
}


def resolve(model: nn.Module) -> tuple[nn.Module, str, Architecture]:
    """The causal LM inside `model` (a peft wrapper is looked through), its type and its forward."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", type(lm).__name__)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"parameter attribution does not support model type {model_type!r} ({type(lm).__name__}); "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    if type(getattr(lm, "lm_head", None)) is not nn.Linear:
        raise ValueError(
            f"parameter attribution needs a causal LM with a plain nn.Linear lm_head, got {type(lm).__name__}"
        )
    return lm, model_type, ARCHITECTURES[model_type]
