"""Gemma 3 text models (`Gemma3ForCausalLM`, `model_type: "gemma3_text"`) on the Llama code.

Gemma 3 is the Llama decoder of `gti_jax.models.llama` with these differences, each a small
subclass or hook here (the math follows transformers' `modeling_gemma3.py`):

* the input embedding is multiplied by `sqrt(hidden_size)` (the factor rounded to the
  parameter dtype, as HF does) -- inside `hidden_states`, so callers that feed raw table rows
  (`model.embed(ids)`, grounding with new rows) get the scaling too;
* RMSNorm scales by `(1 + w)` in float32 and casts afterwards (`Gemma3RMSNorm`, weights
  initialized to zero); four norms per layer: `input_layernorm`, `post_attention_layernorm`
  (on the attention output), `pre_feedforward_layernorm`, `post_feedforward_layernorm`
  (on the MLP output);
* per-head q/k norms; scores scaled by `query_pre_attn_scalar ** -0.5`
  (`attn_logit_softcapping` is read and written back but, as in transformers' Gemma 3, not
  applied; `Attention.softcap` implements it);
* GELU (tanh approximation) gated MLP;
* `layer_types`: "sliding_attention" layers attend to the last `sliding_window` slots with
  RoPE base `rope_local_base_freq`; "full_attention" layers attend to everything with base
  `rope_theta` (and optional linear `rope_scaling`);
* final logits optionally soft-capped (`final_logit_softcapping`); tied embeddings by default.

Parameter paths are those of the Llama model plus
`layers/{i}/pre_feedforward_layernorm/scale` and `layers/{i}/post_feedforward_layernorm/scale`
(logical axes `("norm",)`), so sharding rules, LoRA targets (`self_attn.q_proj`, ...,
`mlp.down_proj`), vocabulary resizing and the decoding loop apply unchanged.

Example:
    >>> cfg = Gemma3Config(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    ...                    head_dim=8, sliding_window=4,
    ...                    layer_types=("sliding_attention", "full_attention"))
    >>> model = Gemma3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 6), jnp.int32)).shape
    (1, 6, 64)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gti_jax.models.config import _ARCHITECTURES, ConfigError, LlamaConfig, hf_common_fields
from gti_jax.models.llama import MLP, Attention, Dense, Embed, LlamaForCausalLM, _param, _zeros

__all__ = ["Gemma3Config", "Gemma3ForCausalLM", "LAYER_TYPES"]

Array = jax.Array
LAYER_TYPES = ("sliding_attention", "full_attention")
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_python_tanh")


@dataclasses.dataclass(frozen=True)
class Gemma3Config(LlamaConfig):
    """Architecture of a Gemma 3 text decoder (`LlamaConfig` fields plus the ones below).

    Attributes:
        layer_types: one of `LAYER_TYPES` per layer; None means every 6th layer global, as
            transformers does (`from_hf_dict` reads an old `sliding_window_pattern` too).
        sliding_window: the local layers' window (a token sees itself and the
            `sliding_window - 1` slots before it).
        query_pre_attn_scalar: attention scores are scaled by its inverse square root.
        rope_local_base_freq: RoPE base of the sliding layers (`rope_theta` is the global one).
        rope_scaling: None or `{"rope_type": "linear", "factor": f}` (global layers only).
        attn_logit_softcapping: None or the cap `c` of `c * tanh(scores / c)`; kept for the
            round trip but not applied, like transformers' Gemma 3 (see `Gemma3Attention`).
        final_logit_softcapping: None or the cap of the output logits.
        hidden_activation: the MLP gate's activation (GELU, tanh approximation).
    """

    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float = 256.0
    rope_local_base_freq: float = 10000.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    model_type: str = "gemma3_text"
    qk_norm: bool = True
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    sliding_window: int | None = 4096

    _MODEL_TYPES = ("gemma3_text",)

    def __hash__(self) -> int:  # dataclass would hash the fields, and rope_scaling is a dict
        return LlamaConfig.__hash__(self)

    def __post_init__(self):
        types = self.layer_types
        if types is None and isinstance(self.num_hidden_layers, int):
            types = _pattern_layer_types(self.num_hidden_layers, 6)
        object.__setattr__(self, "layer_types", tuple(types or ()))
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"layer_types {bad} are not supported; use {list(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window=None")
        if not self.qk_norm or self.attention_bias:
            raise ConfigError("Gemma 3 has q/k norms (qk_norm=True) and no attention_bias")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ConfigError(
                f"hidden_activation={self.hidden_activation!r} is not supported; use "
                "'gelu_pytorch_tanh'"
            )
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"{name}={value!r} must be a positive number")

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            return
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if kind != "linear" or "factor" not in self.rope_scaling:
            raise ConfigError(
                f"rope_scaling rope_type={kind!r} is not supported for Gemma 3; only 'linear' "
                "(with a factor) or no scaling"
            )

    def layer_inv_freqs(self) -> tuple[tuple[float, ...], ...]:
        """Per layer, the RoPE inverse frequencies (float32 math, as transformers)."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32)
        exponents = exponents / np.float32(self.head_dim)
        local = np.float32(1.0) / (np.float32(self.rope_local_base_freq) ** exponents)
        glob = np.float32(1.0) / (np.float32(self.rope_theta) ** exponents)
        if self.rope_scaling is not None:
            glob = (glob / np.float32(self.rope_scaling["factor"])).astype(np.float32)
        by_type = {
            "sliding_attention": tuple(local.tolist()),
            "full_attention": tuple(glob.tolist()),
        }
        return tuple(by_type[t] for t in self.layer_types)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, the sliding window (None for global layers)."""
        return tuple(
            self.sliding_window if t == "sliding_attention" else None for t in self.layer_types
        )

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> Gemma3Config:
        """Reads a Gemma 3 text `config.json` dict (transformers 4 or 5 layout).

        Raises:
            ConfigError: another model type, bidirectional attention, attention biases, an
                activation other than GELU-tanh, or an unsupported RoPE scaling (names the
                field).

        Example:
            >>> cfg = Gemma3Config.from_hf_dict({"model_type": "gemma3_text", "vocab_size": 16,
            ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            ...     "num_attention_heads": 2, "head_dim": 8, "sliding_window_pattern": 2})
            >>> cfg.layer_types
            ('sliding_attention', 'full_attention')
        """
        model_type = d.get("model_type")
        if model_type != "gemma3_text":
            hint = "; pass the text_config of a Gemma 3 multimodal checkpoint" * (
                model_type == "gemma3"
            )
            raise ConfigError(f"config.json model_type={model_type!r} is not 'gemma3_text'{hint}")
        for flag in ("use_bidirectional_attention", "attention_bias"):
            if d.get(flag):
                raise ConfigError(f"config.json {flag}=true is not supported for Gemma 3")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _ACTIVATIONS:
            raise ConfigError(f"config.json hidden_activation={act!r} is not supported")
        params = d.get("rope_parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"config.json rope_parameters={params!r} must be an object")
        glob = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if params and not (glob or local):  # one dict for every layer
            glob = dict(params)
        theta = glob.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        local_theta = local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
        if local.get("rope_type", "default") != "default":
            raise ConfigError(
                f"config.json rope_parameters.sliding_attention rope_type="
                f"{local.get('rope_type')!r} is not supported (only 'default')"
            )
        scaling = d.get("rope_scaling") or None
        if scaling is None and glob.get("rope_type", glob.get("type")) not in (None, "default"):
            scaling = glob
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind == "linear":
                scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
            else:
                field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
                raise ConfigError(
                    f"config.json {field} rope_type={kind!r} is not supported for Gemma 3 "
                    "(only 'default' and 'linear')"
                )
        layer_types = d.get("layer_types")
        pattern = d.get("sliding_window_pattern") or 6
        if not layer_types and isinstance(d.get("num_hidden_layers"), int):
            if not isinstance(pattern, int) or pattern <= 0:
                raise ConfigError(
                    f"config.json sliding_window_pattern={pattern!r} must be a positive integer"
                )
            layer_types = _pattern_layer_types(d["num_hidden_layers"], pattern)
        return cls(
            **hf_common_fields(d, theta, scaling, max_positions=131072, tied=True),
            sliding_window=d.get("sliding_window", 4096),
            layer_types=tuple(layer_types) if layer_types else None,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            rope_local_base_freq=float(local_theta),
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            hidden_activation=act,
        )

    def to_hf_dict(self, *, dtype: str = "float32") -> dict[str, Any]:
        """Returns a `config.json` dict that `transformers` (5.x) loads as `Gemma3ForCausalLM`."""
        glob = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            glob = {
                "rope_type": "linear",
                "factor": self.rope_scaling["factor"],
                "rope_theta": self.rope_theta,
            }
        eos = self.eos_token_id
        qpas = self.query_pre_attn_scalar
        return {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": self.hidden_activation,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                "full_attention": glob,
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": self.rope_local_base_freq,
                },
            },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "use_bidirectional_attention": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "use_cache": True,
        }


def _pattern_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """transformers' rule: every `pattern`-th layer is global, the others slide."""
    return tuple(
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    )


class Gemma3RMSNorm(nnx.Module):
    """RMSNorm scaling by `(1 + scale)` in float32, then cast (HF `Gemma3RMSNorm`)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.scale = _param(None, _zeros, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(var + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class Gemma3Attention(Attention):
    """`Attention` with Gemma norms on q/k, `query_pre_attn_scalar` and score soft-capping."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs, param_dtype, dtype):
        super().__init__(config, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.q_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps, **kw)
        self.k_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps, **kw)
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        # transformers' Gemma3Attention (5.x) never passes `attn_logit_softcapping` to its
        # attention kernel, so a checkpoint that sets it runs uncapped there; we do the same so
        # that exported checkpoints agree with transformers. `Attention.softcap` implements the
        # cap (Gemma 2 style) for whoever sets it.
        self.softcap = None


class Gemma3MLP(MLP):
    """Gated MLP with GELU (tanh approximation): `down(gelu(gate(x)) * up(x))`."""

    def __call__(self, x: Array) -> Array:
        gate = jax.nn.gelu(self.gate_proj(x), approximate=True)
        return self.down_proj(gate * self.up_proj(x))


class Gemma3DecoderLayer(nnx.Module):
    """`x + post_attn_norm(attn(input_norm(x)))`, then `x + post_ff_norm(mlp(pre_ff_norm(x)))`."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Gemma3RMSNorm(d, eps, **kw)
        self.self_attn = Gemma3Attention(config, rngs=rngs, **kw)
        self.post_attention_layernorm = Gemma3RMSNorm(d, eps, **kw)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(d, eps, **kw)
        self.mlp = Gemma3MLP(config, rngs=rngs, **kw)
        self.post_feedforward_layernorm = Gemma3RMSNorm(d, eps, **kw)

    def __call__(self, x, cos, sin, mask, kv, index):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, new_kv


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text causal LM; the API (`init_cache`, `hidden_states`, `logits`, `__call__`,
    `embed.embedding`, `lm_head.kernel`) is that of `LlamaForCausalLM`.

    `hidden_states(x)` takes raw embedding rows and applies the `sqrt(hidden_size)` scaling
    itself; `logits` applies `final_logit_softcapping` when configured.
    """

    def __init__(
        self,
        config: Gemma3Config,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        if not isinstance(config, Gemma3Config):
            raise ConfigError(
                f"Gemma3ForCausalLM needs a Gemma3Config, got {type(config).__name__}"
            )
        self.config = config
        self.dtype = dtype
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.embed = Embed(config.vocab_size, config.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [Gemma3DecoderLayer(config, rngs=rngs, **kw) for _ in range(config.num_hidden_layers)]
        )
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(
                (config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), rngs=rngs, **kw
            )
        self.layer_inv_freq = config.layer_inv_freqs()
        self.layer_window = config.layer_windows()
        self.remat = "none"  # see LlamaForCausalLM
        self.activation_sharding = None  # see LlamaForCausalLM
        self.inv_freq = self.layer_inv_freq[0]
        # HF multiplies by sqrt(D) cast to the weights' dtype (bf16 rounds 55.43 to 55.5).
        self.embed_scale = float(np.asarray(math.sqrt(config.hidden_size), param_dtype))

    def hidden_states(self, x: Array, **kw) -> tuple[Array, Any]:
        """As `LlamaForCausalLM.hidden_states`, scaling the raw rows `x` by `sqrt(D)` first."""
        x = x.astype(self.dtype) * jnp.asarray(self.embed_scale, self.dtype)
        return super().hidden_states(x, **kw)

    def finish_logits(self, raw: Array) -> Array:
        """Soft-caps `h @ head` (`cap * tanh(raw / cap)`) when `final_logit_softcapping` is set."""
        cap = self.config.final_logit_softcapping
        return raw if cap is None else cap * jnp.tanh(raw / cap)
