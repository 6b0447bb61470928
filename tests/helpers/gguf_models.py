"""A tiny Llama GGUF file with the tiny byte-level tokenizer, written offline for tests.

The weights are random float32 numpy arrays under Hugging Face names; they are written under
GGUF names with Q/K rows in llama.cpp's order (as its converter does), with the tokenizer as
``tokenizer.ggml.*`` metadata (byte-level BPE, 'gpt2') and a ChatML chat template, so
``gti_jax.models.load_pretrained(path)`` reads it like a real GGUF model.

Example:
    >>> hf = write_tiny_gguf(tmp_path / "tiny.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np

from gti_jax.models import gguf as gg
from tests.helpers.tokenizers import CHATML_TEMPLATE, SPECIAL_TOKENS, tiny_tokenizer

__all__ = ["llama_cpp_order", "write_tiny_gguf"]


def llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF -> GGUF), which the loader undoes."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path: str | os.PathLike, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes a 1-layer tied Llama (hidden 16, 2 heads, 1 KV head) with the tiny tokenizer.

    Args:
        path: the ``.gguf`` file to write.
        seed: numpy seed of the weights.

    Returns:
        The weights under Hugging Face names (Q/K in Hugging Face order).
    """
    tok = tiny_tokenizer()
    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [""] * len(tok)
    for text, i in vocab.items():
        tokens[i] = text
    for i, added in tok.added_tokens_decoder.items():
        tokens[i] = added.content
    assert all(tokens), "the tiny tokenizer's ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    v, d, h, kv, dh, f = len(tokens), 16, 2, 1, 8, 32
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    p = "model.layers.0."
    hf = {
        "model.embed_tokens.weight": r(v, d),
        "model.norm.weight": 1.0 + r(d, scale=0.1),
        p + "self_attn.q_proj.weight": r(h * dh, d),
        p + "self_attn.k_proj.weight": r(kv * dh, d),
        p + "self_attn.v_proj.weight": r(kv * dh, d),
        p + "self_attn.o_proj.weight": r(d, h * dh),
        p + "mlp.gate_proj.weight": r(f, d),
        p + "mlp.up_proj.weight": r(f, d),
        p + "mlp.down_proj.weight": r(d, f),
        p + "input_layernorm.weight": 1.0 + r(d, scale=0.1),
        p + "post_attention_layernorm.weight": 1.0 + r(d, scale=0.1),
    }
    to_gguf = {hf_name: g for g, hf_name in gg._GLOBAL_MAP.items()}
    to_gguf |= {f"model.layers.0.{k}": f"blk.0.{g}" for g, k in gg._LAYER_MAP.items()}

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.convert_tokens_to_ids(SPECIAL_TOKENS[0]))
    w.add_eos_token_id(tok.convert_tokens_to_ids(SPECIAL_TOKENS[0]))
    w.add_chat_template(CHATML_TEMPLATE)
    for name, x in hf.items():
        if name.endswith("q_proj.weight"):
            x = llama_cpp_order(x, h)
        elif name.endswith("k_proj.weight"):
            x = llama_cpp_order(x, kv)
        w.add_tensor(to_gguf[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
