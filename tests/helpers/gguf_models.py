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

__all__ = ["llama_cpp_order", "write_gguf", "write_tiny_gguf"]


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
    special = tok.convert_tokens_to_ids(SPECIAL_TOKENS[0])
    write_gguf(
        path,
        hf,
        heads=h,
        kv_heads=kv,
        tokens=tokens,
        token_types=[3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        merges=merges,
        bos_id=special,
        eos_id=special,
        context_length=256,
        chat_template=CHATML_TEMPLATE,
    )
    return hf


def write_gguf(
    path: str | os.PathLike,
    hf: dict[str, np.ndarray],
    *,
    heads: int,
    kv_heads: int,
    tokens: list[str],
    token_types: list[int],
    merges: list[str],
    bos_id: int,
    eos_id: int,
    arch: str = "llama",
    context_length: int = 64,
    chat_template: str | None = None,
) -> None:
    """Writes a 1-layer Llama GGUF (F32) from Hugging Face-named tensors.

    Q/K rows are stored in llama.cpp's order (:func:`llama_cpp_order`), as its converter
    does; the tokenizer is byte-level BPE (``gpt2``) metadata; RoPE base 10000, RMS eps 1e-6.

    Args:
        path: the ``.gguf`` file to write.
        hf: the weights under Hugging Face names (layer 0 only; ``lm_head.weight`` optional).
        heads, kv_heads: attention heads and key/value heads.
        tokens, token_types, merges: the vocabulary (ids in list order), GGUF token types
            (1 normal, 3 control) and BPE merges.
        bos_id, eos_id: the special token ids.
        arch: ``general.architecture`` (anything but "llama" is unsupported by the loader).
        context_length: ``{arch}.context_length``.
        chat_template: ``tokenizer.chat_template``, or None for none.
    """
    to_gguf = {hf_name: g for g, hf_name in gg._GLOBAL_MAP.items()}
    to_gguf |= {f"model.layers.0.{k}": f"blk.0.{g}" for g, k in gg._LAYER_MAP.items()}
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(1)
    w.add_context_length(context_length)
    w.add_embedding_length(hf["model.embed_tokens.weight"].shape[1])
    w.add_feed_forward_length(hf["model.layers.0.mlp.gate_proj.weight"].shape[0])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, x in hf.items():
        if name.endswith("q_proj.weight"):
            x = llama_cpp_order(x, heads)
        elif name.endswith("k_proj.weight"):
            x = llama_cpp_order(x, kv_heads)
        w.add_tensor(to_gguf[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
