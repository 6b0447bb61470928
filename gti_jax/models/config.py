"""The architecture config of the Llama family (Llama, SmolLM2, Qwen2, Qwen3, Mistral).

`from_hf_dict` hands Gemma 3 text configs to `gti_jax.models.gemma3.Gemma3Config`.

One frozen dataclass, with Hugging Face field names, is the single source of truth for the
architecture. It is read from and written back to a `config.json` that `transformers` loads
unchanged; sharding and compute dtypes live elsewhere.

Example:
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> cfg.head_dim
    8
    >>> LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from gti_jax.errors import ConfigError

__all__ = ["LlamaConfig", "ConfigError", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_common_fields(
    d: Mapping[str, Any], theta: float, scaling: Any, *, max_positions: int, tied: bool
) -> dict[str, Any]:
    """The `config.json` fields every family reads the same way, as constructor keywords
    (`max_positions` and `tied` are the family's defaults when the file omits them)."""
    heads = d.get("num_attention_heads")
    eos = d.get("eos_token_id")
    return {
        "vocab_size": d.get("vocab_size"),
        "hidden_size": d.get("hidden_size"),
        "intermediate_size": d.get("intermediate_size"),
        "num_hidden_layers": d.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": d.get("num_key_value_heads") or heads,
        "head_dim": d.get("head_dim"),
        "rms_norm_eps": float(d.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "max_position_embeddings": int(d.get("max_position_embeddings", max_positions)),
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", tied)),
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
        "pad_token_id": d.get("pad_token_id"),
    }


def _freeze(x: Any) -> Any:
    """Turns dicts and lists into hashable tuples (used only for hashing)."""
    if isinstance(x, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """RoPE theta and scaling from a HF config dict (``rope_theta``/``rope_scaling`` of
    transformers 4, ``rope_parameters`` of 5); raises ConfigError for what is not supported."""
    partial = d.get("partial_rotary_factor")
    rope_params = d.get("rope_parameters") or {}
    if not isinstance(rope_params, Mapping):
        raise ConfigError(f"config.json rope_parameters={rope_params!r} must be an object")
    if rope_params and all(isinstance(v, Mapping) for v in rope_params.values()):
        raise ConfigError("config.json rope_parameters per layer type is not supported")
    partial = rope_params.get("partial_rotary_factor", partial)
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"config.json partial_rotary_factor={partial} is not supported")
    theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or None
    if scaling is None and rope_params.get("rope_type", rope_params.get("type")) not in (
        None,
        "default",
    ):
        scaling = rope_params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind == "llama3":
            scaling = dict(scaling)
            scaling.setdefault(
                "original_max_position_embeddings",
                d.get("max_position_embeddings", 2048),
            )
            scaling = {"rope_type": "llama3", **{k: scaling.get(k) for k in _LLAMA3_KEYS}}
        else:
            field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
            raise ConfigError(
                f"config.json {field} rope_type={kind!r} is not supported (only 'default' "
                "and 'llama3')"
            )
    return theta, scaling


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (field names as in Hugging Face `config.json`).

    Attributes:
        vocab_size: rows of the embedding table (`num_rows`; may exceed the tokenizer's size).
        hidden_size: model width `D`.
        intermediate_size: SwiGLU width `F`.
        num_hidden_layers: number of decoder layers `L`.
        num_attention_heads: query heads `H`.
        num_key_value_heads: key/value heads `K` (grouped-query attention; divides `H`).
            None means `H`.
        head_dim: per-head width `hd`; None means `hidden_size // num_attention_heads`
            (Qwen3 sets it explicitly, and it need not equal that ratio).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base wavelength.
        rope_scaling: None, or a Llama-3 style dict `{"rope_type": "llama3", "factor",
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`.
        max_position_embeddings: the context length the model was trained for (metadata only).
        tie_word_embeddings: the output head is the transposed input embedding (structural:
            a tied model has no separate head parameter).
        attention_bias: q/k/v projections carry biases (Qwen2). Never an o_proj bias.
        qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
        model_type: "llama", "qwen2", "qwen3" or "mistral" ("gemma3_text" is
            `gti_jax.models.gemma3.Gemma3Config`); decides the names written to `config.json`.
        sliding_window: Mistral's sliding-window attention: each token attends to itself and
            the `sliding_window - 1` tokens before it, in every layer; None = full attention.
        bos_token_id: beginning-of-sequence id, or None.
        eos_token_id: end-of-sequence id, a tuple of ids, or None.
        pad_token_id: padding id, or None.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and self.num_attention_heads:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None:
            set_("rope_scaling", dict(self.rope_scaling))
        self._validate()

    #: The model types this class describes (`Gemma3Config` describes "gemma3_text").
    _MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

    def _validate(self) -> None:
        if self.model_type not in self._MODEL_TYPES:
            hint = " (use gti_jax.models.gemma3.Gemma3Config)" * (self.model_type == "gemma3_text")
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported by {type(self).__name__}; use "
                f"one of {list(self._MODEL_TYPES)}{hint}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        window = self.sliding_window
        if window is not None and (
            not isinstance(window, int) or isinstance(window, bool) or window <= 0
        ):
            raise ConfigError(f"sliding_window={window!r} must be a positive integer or None")
        if window is not None and self.model_type not in ("mistral", "gemma3_text"):
            raise ConfigError(
                f"sliding_window={window} is supported only for model_type 'mistral' and "
                f"'gemma3_text', not {self.model_type!r}"
            )
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "llama3":
                raise ConfigError(
                    f"rope_scaling rope_type={kind!r} is not supported; only 'llama3' scaling "
                    "(or no scaling) is implemented"
                )
            absent = [k for k in _LLAMA3_KEYS if k not in self.rope_scaling]
            if absent:
                raise ConfigError(f"rope_scaling of type 'llama3' lacks keys {absent}")

    def __hash__(self) -> int:
        # The config is static metadata of NNX modules, so it must hash; dicts cannot.
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (`H // K`)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """Returns a copy with some fields changed (validated again).

        Example:
            >>> cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
            ...                   num_hidden_layers=1, num_attention_heads=2)
            >>> cfg.replace(vocab_size=12).vocab_size
            12
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Reads a Hugging Face `config.json` dict (transformers 4 or 5 layout).

        Args:
            d: the parsed `config.json`.

        Returns:
            The config.

        Raises:
            ConfigError: the config uses something not implemented here (another model type,
                sliding-window attention, an MLP or o_proj bias, an activation other than
                SiLU, partial rotary embeddings, an unsupported RoPE scaling); the message
                names the field.

        Example:
            >>> LlamaConfig.from_hf_dict({"model_type": "qwen3", "vocab_size": 16,
            ...     "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
            ...     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}).qk_norm
            True
        """
        model_type = d.get("model_type")
        if model_type in ("gemma3_text", "gemma3"):  # "gemma3" (multimodal) is refused there
            from gti_jax.models.gemma3 import Gemma3Config

            return Gemma3Config.from_hf_dict(d)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json model_type={model_type!r} is not supported; gti_jax implements "
                f"{list(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json hidden_act={act!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ConfigError("config.json mlp_bias=true is not supported (no MLP biases)")
        if model_type in ("llama", "qwen3") and d.get("attention_bias"):
            raise ConfigError(
                f"config.json attention_bias=true for model_type={model_type!r} adds an o_proj "
                "bias, which is not supported"
            )
        if d.get("use_sliding_window"):
            raise ConfigError("config.json use_sliding_window=true is not supported")
        layer_types = d.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(
                f"config.json layer_types={sorted(set(layer_types))} is not supported (only "
                "'full_attention')"
            )
        theta, scaling = _rope_from_hf(d)
        return cls(
            **hf_common_fields(d, theta, scaling, max_positions=2048, tied=False),
            attention_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            model_type=model_type,
            sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
        )

    @classmethod
    def from_json_file(cls, path) -> LlamaConfig:
        """Reads `config.json` from a file path (see `from_hf_dict`)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self, *, dtype: str = "float32") -> dict[str, Any]:
        """Returns a `config.json` dict that `transformers` (5.x) loads as this architecture.

        Args:
            dtype: the weights' dtype name written as `dtype` ("float32", "bfloat16", ...).

        Returns:
            A JSON-serializable dict.

        Example:
            >>> cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
            ...                   num_hidden_layers=1, num_attention_heads=2)
            >>> cfg.to_hf_dict()["architectures"]
            ['LlamaForCausalLM']
        """
        if self.attention_bias and self.model_type != "qwen2":
            raise ConfigError(
                f"attention_bias=True (q/k/v biases) exists only for model_type 'qwen2', not "
                f"{self.model_type!r}"
            )
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ConfigError("model_type 'qwen2' always has q/k/v biases (attention_bias=True)")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ConfigError(
                f"qk_norm={self.qk_norm} does not match model_type={self.model_type!r} (only "
                "'qwen3' has q/k norms)"
            )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**{k: self.rope_scaling[k] for k in _LLAMA3_KEYS}, **rope}
            rope["rope_type"] = "llama3"
        eos = self.eos_token_id
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "use_cache": True,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = False
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out
