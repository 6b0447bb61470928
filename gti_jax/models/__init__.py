"""Llama-family models in Flax NNX, Hugging Face checkpoint I/O and sharding rules.

Example:
    >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2)
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gti_jax.models.config import ConfigError, LlamaConfig
    from gti_jax.models.hf import (
        CheckpointMismatchError,
        export_hf_dir,
        load_hf_dir,
        model_from_tensors,
        model_to_tensors,
    )
    from gti_jax.models.llama import KVCache, LlamaForCausalLM
    from gti_jax.models.source import ModelSource, ModelSourceError, resolve_source

# The package's names are imported on first use (PEP 562), not with the package: importing
# any submodule runs this file, and `gti_jax.extend` needs only `source` and `gguf`, not the
# models (flax alone takes about 0.5 s to import on 2 cores, a tenth of a 100,000-token
# extension).
_LAZY = {
    "ConfigError": "config",
    "LlamaConfig": "config",
    "CheckpointMismatchError": "hf",
    "export_hf_dir": "hf",
    "load_hf_dir": "hf",
    "model_from_tensors": "hf",
    "model_to_tensors": "hf",
    "KVCache": "llama",
    "LlamaForCausalLM": "llama",
    "ModelSource": "source",
    "ModelSourceError": "source",
    "resolve_source": "source",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelSource",
    "ModelSourceError",
    "export_hf_dir",
    "load_hf_dir",
    "load_pretrained",
    "model_from_tensors",
    "model_to_tensors",
    "resolve_source",
]


def load_pretrained(path_or_alias: str | os.PathLike, **kw: Any) -> tuple[LlamaForCausalLM, Any]:
    """Loads a model and tokenizer from a Hugging Face directory, a `.gguf` file or an alias.

    Args:
        path_or_alias: a checkpoint directory (`config.json` + safetensors), a `.gguf` file, or
            a known alias such as "smollm2-135m" (resolved by `gti_jax.models.gguf`).
        **kw: forwarded to `model_from_tensors` (`param_dtype`, `dtype`, `mesh`, `rules`);
            `with_tokenizer` applies to checkpoint directories only.

    Returns:
        `(model, tokenizer)`.

    Raises:
        ModelSourceError: (a ``FileNotFoundError``) no checkpoint directory with
            ``config.json``, ``.gguf`` file or known alias; see :func:`resolve_source`.

    Example:
        >>> model, tok = load_pretrained("smollm2-135m")  # doctest: +SKIP
    """
    from gti_jax.models.config import LlamaConfig
    from gti_jax.models.gguf import load_gguf
    from gti_jax.models.hf import load_hf_dir, model_from_tensors
    from gti_jax.models.source import resolve_source

    source = resolve_source(path_or_alias)
    if source.kind == "hf":
        return load_hf_dir(source.path, **kw)

    kw.pop("with_tokenizer", None)
    hf_config, tensors, tokenizer = load_gguf(source.path)
    config = LlamaConfig.from_hf_dict(hf_config)
    return model_from_tensors(config, tensors, **kw), tokenizer
