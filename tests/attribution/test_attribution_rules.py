"""The paper's statements checked against independent hand computations in float64.

Lemma 4.1: for C = A @ B each factor gets half: R(A) = 1/2 A * (Lambda_C B^T), R(B) = 1/2 B * (A^T Lambda_C).
Prop. 4.2: a linear layer's weight gets R(W) = 1/2 W * (G^T x) per sample; a bias R(b) = b * sum_t G.
Prop. 4.3: in attention, W_Q and W_K get alpha = 1/(8 sqrt(d_head)) and W_V 1/4 of the relevance
arriving at the attention output, with E_r the scaled masked pre-softmax scores (docs/attribution.md 2).
"""

from __future__ import annotations

import math

import torch
from tiny_models import build_model

from strategies.attribution.lrp import parameter_relevance
from strategies.attribution.lrp.params import Adapter, LinearSpec, linear
from strategies.attribution.lrp.rules import half_matmul
from strategies.attribution.lrp.sink import RelevanceSink

F64 = torch.float64  # explicit everywhere: a global default dtype would leak into other tests


def test_lemma_4_1_bilinear_product_halves_between_its_factors():
    a = torch.randn(3, 4, requires_grad=True, dtype=F64)
    b = torch.randn(4, 5, requires_grad=True, dtype=F64)
    lam = torch.randn(3, 5, dtype=F64)  # Lambda_C = R(C) / C, arriving from above
    c = half_matmul(a, b)
    c.backward(lam)
    r_a, r_b, r_c = a * a.grad, b * b.grad, c.detach() * lam
    torch.testing.assert_close(r_a, 0.5 * a.detach() * (lam @ b.detach().T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_b, 0.5 * b.detach() * (a.detach().T @ lam), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_a.sum() + r_b.sum(), r_c.sum(), rtol=1e-12, atol=1e-12)


def _sink_for(params: dict[str, torch.Tensor], batch: int) -> tuple[RelevanceSink, dict]:
    module = torch.nn.Module()
    for name, p in params.items():
        module.register_parameter(name, torch.nn.Parameter(p))
    out: dict[str, torch.Tensor] = {}
    return RelevanceSink(module, batch, torch.float64, out.__setitem__), out


def test_prop_4_2_linear_weight_and_bias_relevance_per_sample():
    sink, out = _sink_for({"w": torch.randn(6, 4, dtype=F64), "b": torch.randn(6, dtype=F64)}, batch=2)
    w, b = sink_param(sink, "w"), sink_param(sink, "b")
    x = torch.randn(2, 5, 4, requires_grad=True, dtype=F64)
    g = torch.randn(2, 5, 6, dtype=F64)
    y = linear(x, LinearSpec(w, b), sink)
    y.backward(g)
    for k in range(2):
        torch.testing.assert_close(
            out["w"][k], 0.5 * w.detach() * (g[k].T @ x[k].detach()), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(out["b"][k], b.detach() * g[k].sum(0), rtol=1e-12, atol=1e-12)
    # conservation: R(x) + R(W) + R(b) == R(y), per sample
    r_in = (x * x.grad).sum((1, 2)) + out["w"].sum((1, 2)) + out["b"].sum(1)
    torch.testing.assert_close(r_in, (y.detach() * g).sum((1, 2)), rtol=1e-12, atol=1e-12)


def test_lora_merged_bracketing_splits_the_weight_half_into_w_and_a_quarter_each_for_a_and_b():
    sink, out = _sink_for(
        {
            "w": torch.randn(6, 4, dtype=F64),
            "a": torch.randn(2, 4, dtype=F64),
            "b": torch.randn(6, 2, dtype=F64),
        },
        batch=2,
    )
    w, a, b = (sink_param(sink, n) for n in "wab")
    s = 0.75
    x = torch.randn(2, 3, 4, requires_grad=True, dtype=F64)
    g = torch.randn(2, 3, 6, dtype=F64)
    y = linear(x, LinearSpec(w, None, adapters=[Adapter(a, b, s)]), sink)
    y.backward(g)
    merged = w.detach() + s * b.detach() @ a.detach()  # W~ = W + s B A
    for k in range(2):
        g_merged = 0.5 * g[k].T @ x[k].detach()  # the half of x @ W~ that W~ keeps
        torch.testing.assert_close(out["w"][k], w.detach() * g_merged, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            out["b"][k], 0.5 * s * b.detach() * (g_merged @ a.detach().T), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            out["a"][k], 0.5 * s * a.detach() * (b.detach().T @ g_merged), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(x.grad[k], 0.5 * g[k] @ merged, rtol=1e-12, atol=1e-12)
    r_in = (x * x.grad).sum((1, 2)) + sum(out[n].flatten(1).sum(1) for n in "wab")
    torch.testing.assert_close(r_in, (y.detach() * g).sum((1, 2)), rtol=1e-12, atol=1e-12)


def sink_param(sink: RelevanceSink, name: str) -> torch.Tensor:
    return next(p for i, p in sink.params.items() if sink.names[i] == name)


def _rope_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """M_t (T, D, D) with q_rot_t = M_t q_t: RoPE's definition, x * cos + rotate_half(x) * sin."""
    head_dim = cos.shape[-1]
    half = head_dim // 2
    rot = torch.zeros(head_dim, head_dim, dtype=F64)  # rotate_half as a matrix: (x1, x2) -> (-x2, x1)
    rot[:half, half:] = -torch.eye(half, dtype=F64)
    rot[half:, :half] = torch.eye(half, dtype=F64)
    return torch.diag_embed(cos) + torch.diag_embed(sin) @ rot


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_prop_4_3_one_llama_block_by_hand():
    """A 1-layer Llama, the modified backward written out with einsums and the paper's constants."""
    model = build_model("llama", num_hidden_layers=1)
    cfg, layer = model.config, model.model.layers[0]
    at = layer.self_attn
    n_h, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, at.head_dim
    group, eps = n_h // n_kv, cfg.rms_norm_eps
    W = {n: p.detach() for n, p in model.named_parameters()}
    pre = "model.layers.0."
    ids = torch.tensor([5, 17, 42, 8, 60, 33])
    t = len(ids)

    # ---- forward ----
    e = W["model.embed_tokens.weight"][ids]  # (T, dm)
    x1 = e / _rms(e, eps) * W[pre + "input_layernorm.weight"]
    # the model's own angle table (HF computes it in fp32 even for fp64 models), rotation by hand
    cos, sin = model.model.rotary_emb(e[None], torch.arange(t)[None])
    m = _rope_matrices(cos[0], sin[0])
    q = torch.einsum("tab,thb->hta", m, (x1 @ W[pre + "self_attn.q_proj.weight"].T).view(t, n_h, d))
    k = torch.einsum("tab,thb->hta", m, (x1 @ W[pre + "self_attn.k_proj.weight"].T).view(t, n_kv, d))
    v = (x1 @ W[pre + "self_attn.v_proj.weight"].T).view(t, n_kv, d).transpose(0, 1)  # (Hkv, T, D)
    kh, vh = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (H, T, D)
    causal = torch.ones(t, t).tril().bool()
    er = torch.einsum("hqd,hkd->hqk", q, kh) / math.sqrt(d)  # E_r: scaled, masked scores
    a = torch.softmax(er.masked_fill(~causal, -math.inf), -1)
    ctx = torch.einsum("hqk,hkd->qhd", a, vh).reshape(t, n_h * d)
    h1 = e + ctx @ W[pre + "self_attn.o_proj.weight"].T
    x2 = h1 / _rms(h1, eps) * W[pre + "post_attention_layernorm.weight"]
    gate, up = x2 @ W[pre + "mlp.gate_proj.weight"].T, x2 @ W[pre + "mlp.up_proj.weight"].T
    p = torch.nn.functional.silu(gate) * up
    h2 = h1 + p @ W[pre + "mlp.down_proj.weight"].T
    hn = h2[-1] / _rms(h2[-1], eps) * W["model.norm.weight"]
    logits = W["lm_head.weight"] @ hn
    j = int(logits.argmax())

    # ---- modified backward: G = R / tensor ----
    R = {n: torch.zeros_like(w) for n, w in W.items()}
    R["lm_head.weight"][j] = 0.5 * W["lm_head.weight"][j] * hn  # lm_head keeps half of Z
    g_h2 = torch.zeros_like(h2)
    g_h2[-1] = W["model.norm.weight"] / _rms(h2[-1], eps) * (0.5 * W["lm_head.weight"][j])
    # MLP: down, gate*up and gate/up projections are products (1/2 each), SiLU -> sigmoid
    R[pre + "mlp.down_proj.weight"] = 0.5 * W[pre + "mlp.down_proj.weight"] * (g_h2.T @ p)
    g_p = 0.5 * g_h2 @ W[pre + "mlp.down_proj.weight"]
    g_gate = torch.sigmoid(gate) * 0.5 * g_p * up
    g_up = 0.5 * g_p * torch.nn.functional.silu(gate)
    R[pre + "mlp.gate_proj.weight"] = 0.5 * W[pre + "mlp.gate_proj.weight"] * (g_gate.T @ x2)
    R[pre + "mlp.up_proj.weight"] = 0.5 * W[pre + "mlp.up_proj.weight"] * (g_up.T @ x2)
    g_x2 = 0.5 * (g_gate @ W[pre + "mlp.gate_proj.weight"] + g_up @ W[pre + "mlp.up_proj.weight"])
    g_h1 = g_h2 + W[pre + "post_attention_layernorm.weight"] / _rms(h1, eps) * g_x2
    # attention: o_proj halves; Lambda at the attention output is lam (T, H, D)
    R[pre + "self_attn.o_proj.weight"] = 0.5 * W[pre + "self_attn.o_proj.weight"] * (g_h1.T @ ctx)
    lam = (0.5 * g_h1 @ W[pre + "self_attn.o_proj.weight"]).view(t, n_h, d)
    # Prop. 4.3 with ordinary (unhalved) chain terms and the constants in front
    lam_a = torch.einsum("qhd,hkd->hqk", lam, vh)  # d(ctx)/dA, ordinary
    lam_e = torch.where(causal, a / er, torch.zeros_like(er)) * lam_a  # softmax identity rule
    dq = torch.einsum("hqk,hkd->qhd", lam_e, kh)  # ordinary d/dq_rot, before 1/sqrt(d)
    dk = torch.einsum("hqk,hqd->khd", lam_e, q).reshape(t, n_kv, group, d).sum(2)
    dv = torch.einsum("hqk,qhd->khd", a, lam).reshape(t, n_kv, group, d).sum(2)
    dq = torch.einsum("tab,tha->thb", m, dq).reshape(t, -1)  # back through RoPE: M_t^T
    dk = torch.einsum("tab,tha->thb", m, dk).reshape(t, -1)
    alpha = 1.0 / (8.0 * math.sqrt(d))
    R[pre + "self_attn.q_proj.weight"] = alpha * W[pre + "self_attn.q_proj.weight"] * (dq.T @ x1)
    R[pre + "self_attn.k_proj.weight"] = alpha * W[pre + "self_attn.k_proj.weight"] * (dk.T @ x1)
    R[pre + "self_attn.v_proj.weight"] = (
        0.25 * W[pre + "self_attn.v_proj.weight"] * (dv.reshape(t, -1).T @ x1)
    )
    # the input x1 keeps the other half of each projection product: 1/(8 sqrt d), 1/4 as above
    g_x1 = (
        alpha * dq @ W[pre + "self_attn.q_proj.weight"]
        + alpha * dk @ W[pre + "self_attn.k_proj.weight"]
        + 0.25 * dv.reshape(t, -1) @ W[pre + "self_attn.v_proj.weight"]
    )
    g_e = g_h1 + W[pre + "input_layernorm.weight"] / _rms(e, eps) * g_x1
    R["model.embed_tokens.weight"].index_add_(0, ids, e * g_e)

    engine = parameter_relevance(model, ids[None])
    for name in W:
        torch.testing.assert_close(engine[name][0], R[name], rtol=1e-8, atol=1e-12, msg=name)
    total = sum(r.sum() for r in R.values())
    torch.testing.assert_close(total, logits[j], rtol=1e-10, atol=0)
