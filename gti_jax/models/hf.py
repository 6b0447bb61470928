"""Hugging Face checkpoints <-> `LlamaForCausalLM`: one key table, used both ways.

`KEY_TABLE` maps each Hugging Face tensor name pattern to an NNX parameter path pattern and a
layout transform (`copy`, `flat`, `t_in`, `t_out`); the loader reads it forward, the exporter
backward. Loading fills an `nnx.eval_shape` skeleton: every weight goes straight to its target
sharding (each device receives only its slice of the host array), and every mismatch (missing,
unexpected, wrong shape) is collected and reported in one error.

Example:
    >>> hf_name_to_path("model.layers.3.self_attn.q_proj.weight")
    (('layers', 3, 'self_attn', 'q_proj', 'kernel'), 't_in')
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gti_jax.errors import BadInput
from gti_jax.io.atomic import atomic_dir
from gti_jax.io.safetensors import load_dir_tensors, save_dir_tensors
from gti_jax.models.config import LlamaConfig
from gti_jax.models.families import model_class
from gti_jax.models.llama import LlamaForCausalLM
from gti_jax.models.sharding import (
    LOGICAL_RULES,
    Rules,
    host_array,
    logical_axes,
    logical_to_spec,
)

__all__ = [
    "KEY_TABLE",
    "CheckpointMismatchError",
    "hf_name_to_path",
    "path_to_hf_name",
    "model_from_tensors",
    "model_to_tensors",
    "ExportTensor",
    "export_tensors",
    "load_hf_dir",
    "export_hf_dir",
    "update_generation_config",
]

_L = r"(\d+)"
#: (HF name pattern, NNX path pattern, transform). `{i}` is the layer index.
#: Transforms (HF tensor -> NNX parameter of shape `s`):
#:   copy:  same layout.
#:   flat:  HF `[prod(s)]` -> reshape to `s` (biases `[H * hd]` -> `[H, hd]`).
#:   t_in:  HF `[prod(s[1:]), s[0]]` (torch `Linear` weight `[out, in]`) -> `.T.reshape(s)`.
#:   t_out: HF `[s[-1], prod(s[:-1])]` -> `.T.reshape(s)` (o_proj `[D, H * hd]` -> `[H, hd, D]`).
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embed/embedding", "copy"),
    ("model.norm.weight", "norm/scale", "copy"),
    ("lm_head.weight", "lm_head/kernel", "t_in"),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/input_layernorm/scale", "copy"),
    (
        "model.layers.{i}.post_attention_layernorm.weight",
        "layers/{i}/post_attention_layernorm/scale",
        "copy",
    ),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/self_attn/q_proj/kernel", "t_in"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/self_attn/k_proj/kernel", "t_in"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/self_attn/v_proj/kernel", "t_in"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/self_attn/q_proj/bias", "flat"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/self_attn/k_proj/bias", "flat"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/self_attn/v_proj/bias", "flat"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/self_attn/o_proj/kernel", "t_out"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/{i}/self_attn/q_norm/scale", "copy"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/{i}/self_attn/k_norm/scale", "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/mlp/gate_proj/kernel", "t_in"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up_proj/kernel", "t_in"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/mlp/down_proj/kernel", "t_out"),
    # Gemma 3 only (gti_jax.models.gemma3): the norms around the MLP.
    (
        "model.layers.{i}.pre_feedforward_layernorm.weight",
        "layers/{i}/pre_feedforward_layernorm/scale",
        "copy",
    ),
    (
        "model.layers.{i}.post_feedforward_layernorm.weight",
        "layers/{i}/post_feedforward_layernorm/scale",
        "copy",
    ),
)

#: HF tensors that are buffers, not parameters (old checkpoints); skipped silently.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), _L) + "$")


_FORWARD = [(_compile(hf), nnx_path, kind) for hf, nnx_path, kind in KEY_TABLE]
_BACKWARD = [(_compile(p), hf, kind) for hf, p, kind in KEY_TABLE]


class CheckpointMismatchError(BadInput):
    """A checkpoint's tensors do not match the model config (lists every problem)."""


def hf_name_to_path(name: str) -> tuple[tuple[str | int, ...], str] | None:
    """Maps a Hugging Face tensor name to `(NNX path, transform)`, or None if unknown.

    Example:
        >>> hf_name_to_path("model.embed_tokens.weight")
        (('embed', 'embedding'), 'copy')
    """
    for regex, target, kind in _FORWARD:
        m = regex.match(name)
        if m:
            path = target.replace("{i}", m.group(1)) if m.groups() else target
            return tuple(int(p) if p.isdigit() else p for p in path.split("/")), kind
    return None


def path_to_hf_name(path: tuple[str | int, ...]) -> tuple[str, str] | None:
    """Maps an NNX parameter path to `(HF tensor name, transform)`, or None if unknown.

    Example:
        >>> path_to_hf_name(("layers", 0, "mlp", "down_proj", "kernel"))
        ('model.layers.0.mlp.down_proj.weight', 't_out')
    """
    joined = "/".join(str(p) for p in path)
    for regex, hf, kind in _BACKWARD:
        m = regex.match(joined)
        if m:
            return (hf.replace("{i}", m.group(1)) if m.groups() else hf), kind
    return None


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face tensor shape that maps onto an NNX parameter of `shape`."""
    if kind == "copy":
        return tuple(shape)
    if kind == "flat":
        return (math.prod(shape),)
    if kind == "t_in":
        return (math.prod(shape[1:]), shape[0])
    if kind == "t_out":
        return (shape[-1], math.prod(shape[:-1]))
    raise AssertionError(kind)


def _to_nnx(kind: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF layout -> NNX layout (a view where numpy allows it)."""
    if kind in ("copy", "flat"):
        return arr.reshape(shape)
    return np.asarray(arr).T.reshape(shape)


def _to_hf(kind: str, arr: np.ndarray) -> np.ndarray:
    """NNX layout -> HF layout (contiguous)."""
    if kind == "copy":
        return np.ascontiguousarray(arr)
    if kind == "flat":
        return np.ascontiguousarray(arr.reshape(-1))
    if kind == "t_in":
        return np.ascontiguousarray(arr.reshape(arr.shape[0], -1).T)
    return np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]).T)


def _place(host: np.ndarray, dtype, sharding) -> jax.Array:
    """Puts a host array on devices, converting only each device's slice."""
    if sharding is None:
        return jnp.asarray(np.asarray(host, dtype=dtype))
    return jax.make_array_from_callback(
        host.shape, sharding, lambda idx: np.asarray(host[idx], dtype=dtype)
    )


def model_from_tensors(
    config: LlamaConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> LlamaForCausalLM:
    """Builds a `LlamaForCausalLM` from Hugging Face-named tensors (HF orientation).

    Shapes and names are checked before any weight is copied; all problems are reported at
    once. With a mesh, each weight is created directly in its sharding from the rules.

    Args:
        config: the architecture (`vocab_size` must equal the embedding rows).
        tensors: HF name -> host array (e.g. memory-mapped from safetensors).
        param_dtype: dtype to store parameters in.
        dtype: compute dtype.
        mesh: optional mesh to shard over; None places everything on the default device.
        rules: logical rules (default `LOGICAL_RULES`); used only with a mesh.

    Returns:
        The model.

    Raises:
        CheckpointMismatchError: missing, unexpected or wrongly shaped tensors (all listed).

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1,
        ...                   tie_word_embeddings=True)
        >>> src = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> model = model_from_tensors(cfg, model_to_tensors(src))
        >>> bool(jnp.all(model.embed.embedding[...] == src.embed.embedding[...]))
        True
    """
    rules = LOGICAL_RULES if rules is None else rules
    abstract = nnx.eval_shape(
        lambda: model_class(config)(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)
    )
    graphdef, abs_state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(abs_state))

    problems: list[str] = []
    plan: dict[tuple, tuple[str, str]] = {}
    misshapen: set[tuple] = set()
    tied_head = None
    for name in sorted(tensors):
        arr = tensors[name]
        hit = hf_name_to_path(name)
        if hit is None:
            if not _IGNORED.match(name):
                problems.append(f"unexpected tensor {name} {list(arr.shape)}")
            continue
        path, kind = hit
        if path == ("lm_head", "kernel") and config.tie_word_embeddings:
            tied_head = name
            continue
        if path not in targets:
            problems.append(f"unexpected tensor {name} {list(arr.shape)} (not in this config)")
            continue
        want = _hf_shape(kind, targets[path].shape)
        if tuple(arr.shape) != want:
            problems.append(f"wrong shape for {name}: {list(arr.shape)}, config needs {list(want)}")
            misshapen.add(path)
            continue
        plan[path] = (name, kind)
    for path, var in targets.items():
        if path not in plan and path not in misshapen:
            name, kind = path_to_hf_name(path)
            problems.append(f"missing tensor {name} {list(_hf_shape(kind, var.shape))}")
    if tied_head is not None and "model.embed_tokens.weight" in tensors:
        head, emb = tensors[tied_head], tensors["model.embed_tokens.weight"]
        if head.shape != emb.shape or not np.array_equal(head, emb):
            problems.append(
                f"{tied_head} differs from model.embed_tokens.weight but the config has "
                "tie_word_embeddings=true; set it to false in config.json to keep both"
            )
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match the config ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )

    def fill(path, var):
        name, kind = plan[path]
        host = _to_nnx(kind, tensors[name], var.shape)
        sharding = None
        if mesh is not None:
            spec = logical_to_spec(logical_axes(var), rules, mesh, var.shape)
            sharding = NamedSharding(mesh, spec)
        return var.replace(_place(host, var.dtype, sharding))

    flat = [(path, fill(path, var)) for path, var in targets.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class ExportTensor:
    """One parameter as a Hugging Face tensor, fetched only when read (``np.asarray``).

    Its HF `shape` and `dtype` are known at once, so a safetensors header can be written
    before any bytes are gathered; reading it casts on the devices and gathers this one
    array (:func:`gti_jax.models.sharding.host_array`: a collective across processes).
    """

    def __init__(self, value: jax.Array, kind: str, dtype=None):
        self.value, self.kind = value, kind
        self.dtype = np.dtype(value.dtype if dtype is None else dtype)
        self.shape = _hf_shape(kind, tuple(value.shape))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = _to_hf(self.kind, host_array(self.value, dtype=self.dtype))
        return arr if dtype is None else arr.astype(dtype)


def export_tensors(model: LlamaForCausalLM, *, dtype=None) -> dict[str, ExportTensor]:
    """A model's parameters as HF-named :class:`ExportTensor` s in checkpoint order, none
    fetched yet (so an export holds one tensor in host memory at a time).

    Args:
        model: the model (sharded or not).
        dtype: the dtype to write (e.g. `jnp.bfloat16`); default keeps each parameter's.

    Returns:
        HF name -> tensor; no `lm_head.weight` for tied models.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> t = export_tensors(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), dtype=jnp.bfloat16)
        >>> t["lm_head.weight"].shape, t["lm_head.weight"].dtype.name
        ((8, 4), 'bfloat16')
    """
    out: dict[str, ExportTensor] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hit = path_to_hf_name(path)
        if hit is None:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no Hugging Face name")
        name, kind = hit
        out[name] = ExportTensor(var[...], kind, dtype)
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def model_to_tensors(model: LlamaForCausalLM, *, dtype=None) -> dict[str, np.ndarray]:
    """Gathers a model's parameters into HF-named host arrays in HF orientation.

    Args:
        model: the model (sharded or not).
        dtype: optional dtype to cast to (e.g. `jnp.bfloat16`); default keeps each dtype.

    Returns:
        HF name -> numpy array; no `lm_head.weight` for tied models.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> model_to_tensors(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))["lm_head.weight"].shape
        (8, 4)
    """
    return {name: np.asarray(t) for name, t in export_tensors(model, dtype=dtype).items()}


def _sort_key(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if "embed" in name else 2, 0, name)


def load_hf_dir(
    path: str | os.PathLike,
    *,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    with_tokenizer: bool = True,
) -> tuple[LlamaForCausalLM, Any]:
    """Loads a Hugging Face checkpoint directory (safetensors) and its tokenizer, offline.

    Args:
        path: directory with `config.json`, safetensors weights and tokenizer files.
        param_dtype: parameter dtype.
        dtype: compute dtype.
        mesh: optional mesh to load directly sharded.
        rules: logical rules for the mesh.
        with_tokenizer: also load the tokenizer (`AutoTokenizer`, local files only).

    Returns:
        `(model, tokenizer)`; tokenizer is None when `with_tokenizer=False`.

    Example:
        >>> model, tok = load_hf_dir("path/to/SmolLM2-135M")  # doctest: +SKIP
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path}: no config.json; pass a Hugging Face checkpoint directory "
            "(saved with save_pretrained)"
        )
    config = LlamaConfig.from_json_file(cfg_file)
    tensors = load_dir_tensors(path)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"{path}: cannot load a tokenizer ({e}); save one there with "
                "tokenizer.save_pretrained or pass with_tokenizer=False"
            ) from None
    try:
        model = model_from_tensors(
            config, tensors, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules
        )
    except CheckpointMismatchError as e:
        wrong = config_contradictions(config, tensors)
        if not wrong:
            raise
        raise CheckpointMismatchError(
            f"{cfg_file} contradicts its tensors: {'; '.join(wrong)}; fix config.json, or "
            f"give the checkpoint these tensors belong to\n{e}"
        ) from None
    return model, tokenizer


def config_contradictions(config: LlamaConfig, tensors: Mapping[str, Any]) -> list[str]:
    """The sizes in ``config`` that the tensors contradict, one phrase each.

    Reads only the shapes of the embedding, the first layer's projections and the layer
    names, so a wrong ``hidden_size`` is named as such rather than as two dozen shapes.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> config_contradictions(cfg, {"model.embed_tokens.weight": np.zeros((8, 6))})
        ['hidden_size=4 but model.embed_tokens.weight is [8, 6] (width 6)']
    """
    out = []
    emb = tensors.get("model.embed_tokens.weight")
    if emb is not None and len(emb.shape) == 2:
        rows, width = emb.shape
        if width != config.hidden_size:
            out.append(
                f"hidden_size={config.hidden_size} but model.embed_tokens.weight is "
                f"{list(emb.shape)} (width {width})"
            )
        if rows != config.vocab_size:
            out.append(
                f"vocab_size={config.vocab_size} but model.embed_tokens.weight has {rows} rows"
            )
    layers = {int(m.group(1)) for n in tensors if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and len(layers) != config.num_hidden_layers:
        out.append(
            f"num_hidden_layers={config.num_hidden_layers} but the tensors hold {len(layers)} "
            "layers"
        )
    gate = tensors.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and gate.shape[0] != config.intermediate_size:
        out.append(
            f"intermediate_size={config.intermediate_size} but "
            f"model.layers.0.mlp.gate_proj.weight has {gate.shape[0]} rows"
        )
    for proj, heads_key in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
        w = tensors.get(f"model.layers.0.self_attn.{proj}.weight")
        heads = getattr(config, heads_key)
        if w is not None and config.head_dim and w.shape[0] != heads * config.head_dim:
            out.append(
                f"{heads_key} x head_dim = {heads} x {config.head_dim} "
                f"but model.layers.0.self_attn.{proj}.weight has {w.shape[0]} rows"
            )
    return out


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(name, name)


def update_generation_config(source: Mapping[str, Any], hf_config: Mapping[str, Any]) -> dict:
    """A source ``generation_config.json`` kept whole, with the exported config's token ids.

    ``bos_token_id`` and ``pad_token_id`` become the exported config's (where it sets them);
    its ``eos_token_id`` ids are added to the source's, which are kept: an instruct model
    often stops on several ids that ``config.json`` does not list. Sampling settings, stop
    strings and the rest are kept as they were.

    Example:
        >>> src = {"eos_token_id": [2, 7], "temperature": 0.6, "bos_token_id": 1}
        >>> update_generation_config(src, {"bos_token_id": 1, "eos_token_id": 2,
        ...                                "pad_token_id": 3})
        {'eos_token_id': [2, 7], 'temperature': 0.6, 'bos_token_id': 1, 'pad_token_id': 3}
    """
    out = dict(source)
    for key in ("bos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            out[key] = hf_config[key]
    eos = hf_config.get("eos_token_id")
    if eos is not None:
        have = out.get("eos_token_id")
        have = [] if have is None else list(have) if isinstance(have, list) else [have]
        merged = have + [e for e in (eos if isinstance(eos, list) else [eos]) if e not in have]
        out["eos_token_id"] = merged[0] if len(merged) == 1 else merged
    return out


def export_hf_dir(
    model: LlamaForCausalLM,
    config: LlamaConfig | None,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    overwrite: bool = False,
    generation_config: bool | Mapping[str, Any] = True,
    max_shard_bytes: int = 5 * 1024**3,
    writer: bool | None = None,
) -> Path:
    """Writes a Hugging Face checkpoint directory that `transformers` loads unchanged.

    Everything is written to a temporary directory next to `out_dir` and renamed into place,
    so a reader never sees a half-written checkpoint. `config.json` gets
    `vocab_size = model.num_rows` (the embedding rows, which may exceed `len(tokenizer)`)
    and the written dtype.

    The weights stream: each tensor is cast on its devices, gathered alone and written before
    the next is fetched (:class:`ExportTensor`), so a sharded model is never whole in one
    process's memory, on host or device. On several processes every process calls this with
    the same model (each tensor's gather is a collective) and only the writer writes.

    Args:
        model: the model (sharded or not).
        config: the architecture to write; None uses `model.config`.
        tokenizer: a Hugging Face tokenizer (saved with `save_pretrained`), or None.
        out_dir: target directory.
        dtype: cast weights to this dtype (e.g. `jnp.bfloat16`); default keeps them.
        overwrite: replace an existing non-empty `out_dir`.
        generation_config: True writes `generation_config.json` with the bos/eos/pad ids; a
            mapping (the source checkpoint's `generation_config.json`) is kept whole with
            its token ids updated (:func:`update_generation_config`); False writes none.
        max_shard_bytes: shard the weights past this size.
        writer: whether this process writes; default: process 0 does.

    Returns:
        `out_dir` as a Path.

    Example:
        >>> export_hf_dir(model, None, tokenizer, "out/extended")  # doctest: +SKIP
    """
    writer = jax.process_index() == 0 if writer is None else writer
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True or pick a new dir")
    config = (config or model.config).replace(vocab_size=model.num_rows)
    if config.tie_word_embeddings != model.config.tie_word_embeddings:
        raise ValueError(
            f"config.tie_word_embeddings={config.tie_word_embeddings} disagrees with the "
            f"model's ({model.config.tie_word_embeddings})"
        )
    tensors = export_tensors(model, dtype=dtype)
    if not writer:
        for t in tensors.values():  # take part in each tensor's gather, in the same order
            np.asarray(t)
        return out_dir
    hf_config = config.to_hf_dict(dtype=_dtype_name(tensors["model.embed_tokens.weight"].dtype))
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_dir_tensors(tmp, tensors, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if generation_config is not False:
            gen = update_generation_config(
                {} if generation_config is True else generation_config, hf_config
            )
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir
