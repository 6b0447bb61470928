"""Which NNX model class implements a config: the one place a new family is registered.

Llama, Qwen2, Qwen3 and Mistral are `LlamaForCausalLM` (`LlamaConfig`); Gemma 3 text models
are `Gemma3ForCausalLM` (`Gemma3Config`, a `LlamaConfig` subclass).

Example:
    >>> from gti_jax.models.config import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    ...                   num_hidden_layers=1, num_attention_heads=1, model_type="mistral")
    >>> model_class(cfg).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

from gti_jax.models.config import LlamaConfig
from gti_jax.models.llama import LlamaForCausalLM

__all__ = ["model_class"]


def model_class(config: LlamaConfig) -> type[LlamaForCausalLM]:
    """The `LlamaForCausalLM` (sub)class that builds a model of `config`."""
    from gti_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM

    if isinstance(config, Gemma3Config):
        return Gemma3ForCausalLM
    return LlamaForCausalLM
