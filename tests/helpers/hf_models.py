"""Tiny random models for tests: gti_jax Llama modules and Hugging Face checkpoints.

:func:`tiny_llama` builds a gti_jax ``LlamaForCausalLM`` in memory (random init, no files);
every unit test that needs a small model takes it from here, with the sizes it needs.
:func:`make_tiny_hf_model` builds a transformers checkpoint offline with torch and saves it.

Hugging Face families (2 layers each, float32, safetensors, with the tiny test tokenizer):

- "llama": tied embeddings, GQA (4 heads / 2 kv heads), Llama-3 RoPE scaling.
- "qwen2": untied head, q/k/v biases, GQA, embedding padded past the tokenizer (spare rows).
- "qwen3": untied head, per-head q/k RMSNorm, `head_dim=16` with hidden 48 and 4 heads (so
  head_dim != hidden / heads).

Sliding-window families (:data:`SLIDING_FAMILIES`, window :data:`WINDOW` = 5, so the window
cuts into a 9-token prompt and 16 generated tokens):

- "mistral": `MistralForCausalLM` (read through the Llama code), untied, GQA.
- "gemma3": `Gemma3ForCausalLM`, tied, 3 layers (local, global, local), `head_dim=16` !=
  hidden / heads, `query_pre_attn_scalar=24` != head_dim, linear RoPE scaling on the global
  layer, both soft-caps set (transformers' Gemma 3 ignores `attn_logit_softcapping`, and so
  does gti_jax; the final cap applies).
- "gemma3_released": as released Gemma 3 configs: no soft-caps, untied here (so the untied
  head path runs), old-style `sliding_window_pattern=2` instead of `layer_types`.

Weights are re-drawn with std 0.1 (norm scales around 1), so logits differ meaningfully
between tokens and greedy decoding is not a string of ties. Gemma 3 scales by (1 + w), so its
norm weights are drawn around 0, and its other weights with std 0.2.

Example:
    >>> d = make_tiny_hf_model(tmp_path, "qwen3")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.helpers.tokenizers import save_tiny_tokenizer

FAMILIES = ("llama", "qwen2", "qwen3")
SLIDING_FAMILIES = ("mistral", "gemma3", "gemma3_released")
ALL_FAMILIES = FAMILIES + SLIDING_FAMILIES
WINDOW = 5


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 16,
    intermediate_size: int = 32,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    tied: bool = False,
    seed: int = 0,
):
    """A randomly initialized gti_jax ``LlamaForCausalLM`` (float32, default RoPE).

    Args:
        vocab_size: embedding rows.
        hidden_size, intermediate_size, layers, heads, kv_heads: the architecture.
        tied: whether the head shares the embedding.
        seed: the ``nnx.Rngs`` seed of the initialization.

    Returns:
        The model.
    """
    from flax import nnx

    from gti_jax.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


def tiny_gemma3(
    vocab_size: int,
    *,
    hidden_size: int = 16,
    intermediate_size: int = 32,
    layer_types: tuple[str, ...] = ("full_attention",),
    heads: int = 2,
    kv_heads: int = 1,
    tied: bool = False,
    seed: int = 0,
    **config: Any,
):
    """A randomly initialized gti_jax ``Gemma3ForCausalLM`` (float32, head_dim 8, window 4).

    Args:
        vocab_size: embedding rows.
        hidden_size, intermediate_size, heads, kv_heads: the architecture.
        layer_types: one ``"full_attention"`` or ``"sliding_attention"`` per layer.
        tied: whether the head shares the embedding.
        seed: the ``nnx.Rngs`` seed of the initialization.
        **config: other ``Gemma3Config`` fields (e.g. ``final_logit_softcapping``).

    Returns:
        The model.
    """
    from flax import nnx

    from gti_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM

    cfg = Gemma3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=len(layer_types),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        sliding_window=4,
        layer_types=tuple(layer_types),
        tie_word_embeddings=tied,
        **config,
    )
    return Gemma3ForCausalLM(cfg, rngs=nnx.Rngs(seed))


def _common_config(vocab_size: int) -> dict:
    """The settings every tiny family shares (sizes, norm epsilon, special token ids)."""
    return dict(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def tiny_hf_config(family: str, vocab_size: int) -> transformers.PretrainedConfig:
    """The transformers config of a tiny model of `family` with `vocab_size` rows."""
    common = dict(_common_config(vocab_size), num_hidden_layers=2)
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            **common,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=32,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            **common,
        )
    if family == "qwen3":
        return transformers.Qwen3Config(
            hidden_size=48,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            **common,
        )
    return sliding_hf_config(family, vocab_size)


def sliding_hf_config(family: str, vocab_size: int) -> transformers.PretrainedConfig:
    """The transformers config of a tiny sliding-window model (see :data:`SLIDING_FAMILIES`)."""
    common = dict(
        _common_config(vocab_size),
        sliding_window=WINDOW,
    )
    if family == "mistral":
        return transformers.MistralConfig(
            hidden_size=32,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            hidden_size=32,
            head_dim=16,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            tie_word_embeddings=True,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=20.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            **common,
        )
    if family == "gemma3_released":
        return transformers.Gemma3TextConfig(
            hidden_size=32,
            head_dim=8,
            num_hidden_layers=2,
            sliding_window_pattern=2,
            query_pre_attn_scalar=8,
            tie_word_embeddings=False,
            **common,
        )
    raise ValueError(f"family={family!r}: use one of {ALL_FAMILIES}")


def make_tiny_hf_model(
    tmp_path: str | os.PathLike,
    family: str,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Builds, randomizes and saves a tiny HF causal LM plus tokenizer; returns its directory.

    Args:
        tmp_path: parent directory; the model goes to `tmp_path / f"{family}-{seed}"`.
        family: one of :data:`ALL_FAMILIES` ("llama", "qwen2", "qwen3", "mistral", "gemma3",
            "gemma3_released").
        vocab_size: embedding rows; default `len(tokenizer)` ("qwen2": rounded up to a
            multiple of 64, leaving spare rows like real Qwen checkpoints).
        seed: torch seed of the weights.
        tokenizer: a tokenizer to save instead of the tiny test tokenizer.

    Returns:
        The checkpoint directory (`config.json`, `model.safetensors`, tokenizer files).
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"family={family!r}: use one of {ALL_FAMILIES}")
    out = Path(tmp_path) / f"{family}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = save_tiny_tokenizer(out)
    else:
        tokenizer.save_pretrained(str(out))
    if vocab_size is None:
        vocab_size = len(tokenizer)
        if family == "qwen2":
            vocab_size = -(-vocab_size // 64) * 64 + (64 if vocab_size % 64 == 0 else 0)
    config = tiny_hf_config(family, vocab_size)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma = family.startswith("gemma3")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma scales by (1 + w), the others by w
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.2 if gemma else 0.1) * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(out))
    return out
