"""A plain-numpy Llama forward pass, independent of gti_jax's NNX model.

It takes the Hugging Face-named weights (``model.layers.0.self_attn.q_proj.weight`` ...) as
numpy arrays and a config dict (``head_dim``, ``rms_norm_eps``, ``num_attention_heads``,
``num_key_value_heads``, ``rope_theta``, ``num_hidden_layers``): RMSNorm, rotate-half RoPE,
grouped-query attention, SwiGLU, a tied or separate head. Tests use it as the reference
their figures are checked against.
"""

from __future__ import annotations

import numpy as np

__all__ = ["forward", "perplexity", "rms"]


def rms(x, w, eps):
    """RMSNorm of the last axis, scaled by `w`."""
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def forward(cfg, w, ids, last_only=False):
    """Llama logits [T, V] (or [1, V]): RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head."""
    t, dh, eps = len(ids), cfg["head_dim"], cfg["rms_norm_eps"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inv = cfg["rope_theta"] ** (-np.arange(0, dh, 2) / dh)
    ang = np.arange(t)[:, None] * inv[None]
    cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None]
    sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None]

    def rope(x):
        return x * cos + np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1) * sin

    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"], eps)
        q = rope((a @ w[p + "self_attn.q_proj.weight"].T).reshape(t, h, dh))
        k = rope((a @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, dh))
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, dh)
        k, v = np.repeat(k, h // kv, 1), np.repeat(v, h // kv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(t, h * dh)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        a = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = a @ w[p + "mlp.gate_proj.weight"].T
        up = a @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x[-1:] if last_only else x, w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def perplexity(cfg, w, ids):
    """exp(mean next-token NLL) of `ids` under the model (log-softmax in float64)."""
    logits = forward(cfg, w, ids)[:-1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
