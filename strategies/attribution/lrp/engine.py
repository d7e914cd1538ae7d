"""Parameter-level LRP (arXiv 2605.05285 section 4.1): per-sample relevance of every parameter.

One scoring pass = the architecture's LRP-aware forward (architectures.py) up to the seed logit,
then one autograd backward whose local rules are the LRP rules; each parameter-consuming op
reports its per-sample relevance to a sink as the backward reaches it. The seed of sample k is its
argmax next-token logit Z[m_k, j_k] at its last non-padding position m_k, with R(Z) = Z, so for
every sample the relevance of all parameters sums to its seed logit (norm weights get 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from strategies.attribution.lrp import rules
from strategies.attribution.lrp.architectures import Pass, resolve
from strategies.attribution.lrp.params import gather_rows
from strategies.attribution.lrp.sink import Consumer, RelevanceSink


@dataclass
class Seeds:
    """The logit each sample's relevance starts from.

    Args:
        logit: (B,) seed value Z[m, j], in the accumulation dtype; sum of R over all parameters.
        token: (B,) argmax next token j.
        position: (B,) last non-padding position m.
    """

    logit: Tensor
    token: Tensor
    position: Tensor


@contextmanager
def scoring_scope(model: nn.Module) -> Iterator[None]:
    """Leave the model exactly as found, even on exception: modes, requires_grad, .grad, attention.

    The scoring forward patches and hooks nothing and feeds parameters in detached, so this is a
    guard rather than an undo log; it also turns grad mode on inside torch.no_grad() or
    torch.inference_mode().
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        if attn is not None and config._attn_implementation != attn:
            config._attn_implementation = attn


def stream_parameter_relevance(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    consumer: Consumer,
    row_maps: bool = False,
) -> Seeds:
    """Hand each parameter's per-sample relevance to `consumer(name, relevance)`, one at a time.

    Args:
        model: A supported causal LM (llama, mistral, qwen2, gpt2), optionally wrapped by peft LoRA.
        input_ids: (B, T) token ids, left or right padded.
        attention_mask: (B, T), 1 on tokens and 0 on padding; None means no padding.
        consumer: Called once per named parameter (names as in model.named_parameters()) with a
            (B, *param.shape) tensor in fp32 (fp64 for fp64 models), in backward order (last layer
            first, then zero maps for the norm weights). The tensor is the consumer's to keep.
        row_maps: Hand on parameters that only row lookups reach (embeddings, an untied lm_head's
            seed rows) as a sink.RowMap of the touched rows instead of a dense map.

    LoRA uses the merged bracketing P (W + s B A): the layer's product keeps the usual half for
    W~ = W + s B A, split proportionally into W and s B A, and A and B each get half of the
    adapter's part (a quarter of it relative to the product); with B = 0 both get exactly 0.
    Positions are counted over non-padding tokens (as generate() does), so a left-padded sample
    scores as it would alone. Dropout is off while scoring, whatever the model's mode. Attention is
    computed here in eager form (B x heads x T x T scores per layer), whatever implementation the
    model was loaded with, so the argmax token is that of the eager computation.

    Returns:
        The seeds: logit (B,), argmax token (B,) and seed position (B,).
    """
    lm, model_type, arch = resolve(model)
    input_ids = input_ids.to(lm.lm_head.weight.device)
    acc = torch.float64 if lm.lm_head.weight.dtype == torch.float64 else torch.float32
    sink = RelevanceSink(model, input_ids.shape[0], acc, consumer, row_maps)
    with scoring_scope(model):
        # cloned inside the scope: normal tensors even when the caller is under inference_mode
        valid, seed_pos = _seed_positions(input_ids.clone(), attention_mask)
        cut = int(seed_pos.max()) + 1  # later positions never reach a seed (causal attention)
        ids, valid = input_ids[:, :cut].clone(), valid[:, :cut]
        anchor = torch.zeros((), device=ids.device, requires_grad=True)
        ctx = Pass(sink, anchor, valid, (valid.cumsum(-1) - 1).clamp(min=0))
        hidden = arch.hidden(lm, ids, ctx)
        rows = torch.arange(ids.shape[0], device=ids.device)
        h_seed = arch.final_norm(lm, hidden[rows, seed_pos], ctx)  # (B, d)
        logit, token = _seed_logit(lm, h_seed, ctx)
        sink.check_coverage(model_type)
        torch.autograd.backward(logit.sum(), inputs=[anchor])
        sink.finish()
    return Seeds(logit.detach(), token, seed_pos)


def parameter_relevance(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-sample relevance of every named parameter, {name: (B, *param.shape)}.

    The whole-model dict form of stream_parameter_relevance (see there for the readings); it holds
    B copies of the model's parameters in fp32, so use the streaming form for large models.
    """
    collected: dict[str, Tensor] = {}
    stream_parameter_relevance(model, input_ids, attention_mask, collected.__setitem__)
    return {name: collected[name] for name, _ in model.named_parameters()}


def _seed_positions(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(B, T) bool mask of real tokens and (B,) index of each sample's last real token."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        valid = attention_mask.to(device=input_ids.device, dtype=torch.bool, copy=True)
    if not bool(valid.any(-1).all()):
        raise ValueError("every sample needs at least one non-padding token")
    last = valid.shape[1] - 1 - valid.flip(-1).int().argmax(-1)  # (B,)
    return valid, last


def _seed_logit(lm: nn.Module, h_seed: Tensor, ctx: Pass) -> tuple[Tensor, Tensor]:
    """Z[m, j] for the argmax j; lm_head is a product, so its weight row keeps half (reading 3.5)."""
    head = lm.lm_head
    with torch.no_grad():
        token = F.linear(h_seed, head.weight, head.bias).argmax(-1)  # (B,)
    rows = gather_rows(token[:, None], head.weight, ctx.sink, ctx.anchor)[:, 0]  # (B, d)
    # the seed is formed in the accumulation dtype so that R(Z) = Z is exact in fp32 under bf16
    acc = ctx.sink.dtype
    logit = rules.half_mul(h_seed.to(acc), rows.to(acc)).sum(-1)
    if head.bias is not None:
        logit = logit + gather_rows(token[:, None], head.bias, ctx.sink, ctx.anchor)[:, 0].to(acc)
    return logit, token
