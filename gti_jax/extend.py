"""``python -m gti_jax.extend``: add tokens to a checkpoint, the fast and correct way.

Reads a Hugging Face checkpoint directory (config.json, safetensors, tokenizer) or a GGUF
file, adds the new tokens to the tokenizer, grows the embedding (and an untied head) with the
chosen initializer, and writes a checkpoint directory that ``transformers`` loads unchanged.
No PyTorch model is built: tensors are memory-mapped, the two vocabulary tensors are resized
with :func:`gti_jax.vocab.resize_vocab`, and every other tensor is copied as it is.

Every input is checked before any heavy work; output goes to a temporary directory beside
``--out`` that is renamed into place only when complete, so a failed run leaves nothing.

Example::

    python -m gti_jax.extend --model path/to/hf_dir --tokens tokens.jsonl \\
        --init description --out path/to/extended --pad-to-multiple-of 64
"""

from __future__ import annotations

# Re-executed before the heavy imports below, or the new process would repeat them.
if __name__ == "__main__":
    from gti_jax._env import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gti_jax import config as engine
from gti_jax.errors import BadInput, CheckpointError
from gti_jax.io import safetensors as st
from gti_jax.io.atomic import atomic_dir
from gti_jax.io.rows import HEAD_ROWS_FILE, checked_rows
from gti_jax.vocab import initializers as inits
from gti_jax.vocab.resize import (
    EmbeddingSpec,
    ResizeError,
    VocabPlan,
    plan_resize,
    resize_vocab,
)
from gti_jax.vocab.tokenizer_dir import open_tokenizer_dir
from gti_jax.vocab.tokens import (
    TokenEntry,
    TokenError,
    description_token_ids,
    extended_copy,
    read_tokens_file,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


class ExtendError(BadInput):
    """Bad input to ``gti_jax.extend``."""


@dataclass
class Checkpoint:
    """A checkpoint opened for extension: HF config dict, HF-named tensors, tokenizer."""

    config: dict[str, Any]
    tensors: Mapping[str, Any]
    tokenizer: Any
    source_dir: Path | None  # files to carry over (generation_config.json, ...)


def _log(msg: str) -> None:
    print(f"[gti_jax.extend] {msg}", file=sys.stderr, flush=True)


def open_checkpoint(model: str) -> Checkpoint:
    """Opens a HF directory, a ``.gguf`` file or a built-in alias (``smollm2-135m``)."""
    from gti_jax.models import gguf
    from gti_jax.models.source import ModelSourceError, resolve_source

    try:
        kind, path = resolve_source(model, label=f"--model {model}")
    except ModelSourceError as e:
        raise ExtendError(str(e)) from None
    if kind == "gguf":
        config, tensors, tokenizer = gguf.load_gguf(path)
        return Checkpoint(config, tensors, tokenizer, None)
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ExtendError(
            f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-download config.json"
        ) from None
    tensors = st.load_dir_tensors(path)
    tokenizer, _ = open_tokenizer_dir(path)
    if tokenizer is not None:
        return Checkpoint(config, tensors, tokenizer, path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a missing tokenizer
        raise ExtendError(
            f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the directory needs tokenizer files"
        ) from None
    return Checkpoint(config, tensors, tokenizer, path)


def _spec_for(ckpt: Checkpoint) -> EmbeddingSpec:
    cfg, tensors = ckpt.config, ckpt.tensors
    if "model.embed_tokens.weight" not in tensors:
        raise ExtendError(
            "checkpoint has no 'model.embed_tokens.weight'; gti_jax.extend supports Llama-family (Llama, Qwen2, Qwen3, SmolLM2) checkpoints"
        )
    tied = bool(cfg.get("tie_word_embeddings", "lm_head.weight" not in tensors))
    if not tied and "lm_head.weight" not in tensors:
        raise ExtendError(
            "config says tie_word_embeddings=false but the checkpoint has no 'lm_head.weight'; fix config.json"
        )
    rows, dim = (int(n) for n in np.shape(tensors["model.embed_tokens.weight"]))
    width = cfg.get("hidden_size")
    if width is not None and int(width) != dim:
        raise ExtendError(
            f"config.json says hidden_size={width} but model.embed_tokens.weight is {rows} x {dim}; the config does not belong to these weights"
        )
    if not tied and tuple(np.shape(tensors["lm_head.weight"])) != (rows, dim):
        raise ExtendError(
            f"lm_head.weight is {tuple(np.shape(tensors['lm_head.weight']))} but the embedding is {rows} x {dim}; the checkpoint is inconsistent"
        )
    return EmbeddingSpec.hf(tied=tied, bias="lm_head.bias" in tensors)


def _check_out(out: Path) -> None:
    if out.exists():
        raise ExtendError(f"--out {out} already exists; choose a new directory or remove it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExtendError(
            f"--out {out}: {out.parent} is a file, not a directory; choose another --out"
        )
    if not out.parent.exists():
        raise ExtendError(
            f"--out {out}: parent directory {out.parent} does not exist; create it first"
        )
    if not os.access(out.parent, os.W_OK):
        raise ExtendError(f"--out {out}: cannot write to {out.parent}; choose a writable location")


def _check_init(init: str, init_kwargs: Mapping[str, Any] | None, pad_to_multiple_of: int) -> None:
    if init not in inits.INITIALIZERS:
        raise ExtendError(
            f"--init {init!r}: unknown initializer; choose one of {', '.join(inits.INITIALIZERS)}"
        )
    try:
        inits.get_initializer(init, **dict(init_kwargs or {}))
    except ValueError as e:
        raise ExtendError(str(e)) from None
    if pad_to_multiple_of < 1:
        raise ExtendError(f"--pad-to-multiple-of must be >= 1, got {pad_to_multiple_of}")


@dataclass
class _Plan:
    """What an extension will do, decided before any heavy work."""

    spec: EmbeddingSpec
    resize: VocabPlan
    to_add: list[str]  # the tokens to add, in order
    tokenizer: Any  # the extended tokenizer (a checked copy; the checkpoint's is unchanged)
    ids: list[int]  # the ids it gave the new tokens
    desc_ids: Any  # description token ids for ``init="description"``, else None
    num_tokens: int  # the tokenizer's size before the extension
    num_rows: int  # the embedding table's rows before the extension


def _plan(
    ckpt: Checkpoint,
    entries: Sequence[TokenEntry],
    *,
    init: str,
    skip_existing: bool,
    pad_to_multiple_of: int,
) -> _Plan:
    spec = _spec_for(ckpt)
    num_rows = int(np.shape(ckpt.tensors["model.embed_tokens.weight"])[0])
    num_tokens = len(ckpt.tokenizer)
    if num_tokens > num_rows:
        raise ExtendError(
            f"tokenizer has {num_tokens} tokens but the embedding has {num_rows} rows; the tokenizer does not belong to this checkpoint"
        )
    extended, to_add, ids = extended_copy(
        ckpt.tokenizer, [e.token for e in entries], skip_existing=skip_existing
    )
    if not to_add:
        raise ExtendError("every requested token is already in the vocabulary; nothing to do")
    desc_ids = None
    if init == "description":
        by_token = {e.token: e.description for e in entries}
        desc_ids = description_token_ids(
            ckpt.tokenizer, [by_token[t] for t in to_add], tokens=to_add
        )
    resize = plan_resize(
        num_rows, num_tokens, num_tokens + len(to_add), pad_to_multiple_of=pad_to_multiple_of
    )
    return _Plan(spec, resize, list(to_add), extended, ids, desc_ids, num_tokens, num_rows)


def _write_checkpoint(
    tmp: Path, ckpt: Checkpoint, tokenizer: Any, resized: Mapping[str, Any], rows: int
) -> None:
    """Writes the extended checkpoint (carried-over files, tensors, config, tokenizer)."""
    if ckpt.source_dir is not None:
        for f in ckpt.source_dir.iterdir():
            if (
                f.is_file()
                and f.suffix not in _WEIGHT_SUFFIXES
                and f.name not in ("config.json", st.INDEX_FILE)
            ):
                shutil.copy2(f, tmp / f.name)
    tensors = {name: resized.get(name, arr) for name, arr in ckpt.tensors.items()}
    st.save_dir_tensors(tmp, tensors)
    config = dict(ckpt.config)
    config["vocab_size"] = rows
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(tmp))


def _read_rows(rows, ckpt: Checkpoint, p: _Plan) -> dict[str, tuple[list[int], np.ndarray]]:
    """The grounded rows to apply, per HF tensor name, checked before any heavy work."""

    token_ids = dict(ckpt.tokenizer.get_vocab())
    token_ids.update(zip(p.to_add, p.resize.new_ids, strict=True))
    dim = int(np.shape(ckpt.tensors["model.embed_tokens.weight"])[1])
    out = {}
    sources = {"model.embed_tokens.weight": Path(rows)}
    head = Path(rows).with_name(HEAD_ROWS_FILE)
    if not p.spec.tied and head.is_file():
        sources["lm_head.weight"] = head
    try:
        for name, path in sources.items():
            out[name] = checked_rows(path, token_ids, dim)
    except (CheckpointError, FileNotFoundError) as e:
        raise ExtendError(f"--rows: {e}") from None
    if not p.spec.tied and "lm_head.weight" not in out:
        _log(f"--rows: no {HEAD_ROWS_FILE} beside {rows}: the head's new rows keep their init")
    return out


def _with_rows(resized: dict[str, np.ndarray], grounded) -> dict[str, np.ndarray]:
    """The HF ``[V, D]`` tables with the grounded rows written over their tokens' rows."""
    for name, (ids, values) in grounded.items():
        table = np.array(resized[name])
        table[ids] = values.astype(table.dtype)
        resized[name] = table
    return resized


def _rows_sources(rows, grounded) -> dict[str, Path]:
    if rows is None:
        return {}

    head = Path(rows).with_name(HEAD_ROWS_FILE)
    return {n: Path(rows) if n.startswith("model.") else head for n in grounded}


def extend_checkpoint(
    model: str,
    tokens: str | os.PathLike | Sequence[TokenEntry],
    out: str | os.PathLike,
    *,
    init: str = "mean",
    init_kwargs: Mapping[str, Any] | None = None,
    pad_to_multiple_of: int = 1,
    seed: int = 0,
    skip_existing: bool = False,
    rows: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Extends a checkpoint with new tokens and writes it to ``out``.

    Args:
      model: a Hugging Face checkpoint directory, a ``.gguf`` file or an alias.
      tokens: a tokens file (JSONL ``{"token", "description"}`` or ``.txt``) or entries.
      out: the output directory; must not exist yet.
      init: initializer name (see :mod:`gti_jax.vocab.initializers`).
      init_kwargs: its keyword arguments.
      pad_to_multiple_of: round the table's rows up to a multiple of this when it grows.
      seed: PRNG seed for random initializers.
      skip_existing: drop requested tokens that the tokenizer already has instead of failing.
      rows: a ``grounded_rows.safetensors`` written by the trainer: its rows replace the
        initialized rows of its tokens, which must have the ids the file records (an
        untied model's head rows come from ``grounded_head_rows.safetensors`` beside it,
        when there).

    Returns:
      The summary also written to ``out/gti_extend.json``: ``num_tokens`` (the extended
      tokenizer's size) and ``num_rows`` (the extended table's rows, the new config's
      ``vocab_size``), ``base_num_tokens`` and ``base_num_rows`` (the same before the
      extension), the new ids, timings. (Older files, told apart by a ``new_num_tokens`` key,
      had ``num_tokens``/``num_rows`` for the sizes before and ``new_num_*`` for those after.)
    """
    import jax

    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out)
    _check_init(init, init_kwargs, pad_to_multiple_of)
    entries = read_tokens_file(tokens) if isinstance(tokens, str | os.PathLike) else list(tokens)
    if not entries:
        raise ExtendError("no tokens to add; the tokens file is empty")
    ckpt = open_checkpoint(model)
    p = _plan(
        ckpt, entries, init=init, skip_existing=skip_existing, pad_to_multiple_of=pad_to_multiple_of
    )
    plan = p.resize
    grounded = _read_rows(rows, ckpt, p) if rows is not None else {}
    _log(
        f"{len(p.to_add)} new tokens; tokenizer {p.num_tokens} -> {plan.new_num_tokens}; rows {p.num_rows} -> {plan.new_num_rows} ({'tied' if p.spec.tied else 'untied'} head)"
    )

    # Heavy work starts here; everything below writes only into a temporary directory.
    ids = p.ids
    if list(ids) != list(plan.new_ids):
        raise ExtendError(
            f"tokenizer assigned ids {ids[:3]}... but rows {plan.new_ids.start}.. were planned; the tokenizer's ids are not contiguous"
        )
    vocab = {n: ckpt.tensors[n] for n in p.spec.paths().values() for n in n}
    t1 = time.perf_counter()
    resized = resize_vocab(
        dict(vocab),
        p.spec,
        plan.new_num_tokens,
        init,
        jax.random.key(seed),
        num_tokens=p.num_tokens,
        pad_to_multiple_of=pad_to_multiple_of,
        description_ids=p.desc_ids,
        init_kwargs=init_kwargs,
    )
    resized = _with_rows({k: np.asarray(v) for k, v in resized.items()}, grounded)
    t2 = time.perf_counter()

    with atomic_dir(out) as tmp:
        _write_checkpoint(tmp, ckpt, p.tokenizer, resized, plan.new_num_rows)
        summary = {
            "model": str(model),
            "init": init,
            "num_tokens": plan.new_num_tokens,
            "num_rows": plan.new_num_rows,
            "base_num_tokens": p.num_tokens,
            "base_num_rows": p.num_rows,
            "new_ids": [plan.new_ids.start, plan.new_ids.stop],
            "tied": p.spec.tied,
            "skipped_existing": len(entries) - len(p.to_add),
            "rows": {name: str(path) for name, path in _rows_sources(rows, grounded).items()},
            "resize_seconds": round(t2 - t1, 3),
            "total_seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "gti_extend.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(
        f"wrote {out} in {summary['total_seconds']:.1f} s (resize {summary['resize_seconds']:.2f} s)"
    )
    return summary


@dataclass(frozen=True)
class ExtendConfig:
    """The settings of ``python -m gti_jax.extend`` (``gti-extend``)."""

    model: str | None = None
    """HF checkpoint directory, .gguf file, alias (smollm2-135m) or Hub id Org/Name[@rev]."""

    tokens: str | None = None
    """New tokens: JSONL {"token", "description"} a line, or .txt one token a line."""

    out: str | None = None
    """Output directory (must not exist)."""

    init: str = "mean"
    """Initializer of the new rows: mean, mean_noise, mean_cov, normal or description."""

    init_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    """Initializer arguments, e.g. --init-arg std=0.01 (repeatable) or init_kwargs={std: 0.01}."""

    pad_to_multiple_of: int = 1
    """Round the table's rows up to a multiple of N when it grows."""

    seed: int = 0
    """PRNG seed of random initializers."""

    skip_existing: bool = False
    """Skip requested tokens the tokenizer already has (instead of failing)."""

    rows: str | None = None
    """A grounded_rows.safetensors written by the trainer: its rows replace the new tokens'
    init (checked against their ids; an untied head's rows are read from
    grounded_head_rows.safetensors beside it)."""


_HELP_HEADER = (
    "usage: python -m gti_jax.extend --model DIR|FILE.gguf|ALIAS|Org/Name[@rev] --tokens FILE",
    "           --out DIR [--init NAME] [--init-arg NAME=VALUE ...] [--pad-to-multiple-of N]",
    "           [--seed S] [--skip-existing] [--rows FILE] [--config FILE] [--print-config]",
    "",
    "Adds new tokens to a Hugging Face checkpoint (or GGUF) and initializes their rows.",
    "Every key is also accepted as key=value or --key=value (dashes or underscores).",
)


def _check_cli(cfg: ExtendConfig) -> None:
    for name in ("model", "tokens", "out"):
        if not getattr(cfg, name):
            raise ExtendError(f"--{name} is required; see python -m gti_jax.extend --help")


def parse_cli(argv: Sequence[str]) -> ExtendConfig:
    """The command line (:func:`gti_jax.config.parse_cli`'s style) -> :class:`ExtendConfig`.

    Example:
      >>> parse_cli(["--model", "m", "--tokens", "t", "--out=o", "--skip-existing"]).skip_existing
      True
    """
    return engine.parse_cli(
        ExtendConfig,
        argv,
        help=lambda: engine.help_text(ExtendConfig, _HELP_HEADER),
        validate=_check_cli,
        aliases={"init-arg": "init_kwargs"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_cli(sys.argv[1:] if argv is None else argv)
    except BadInput as e:  # ConfigError, ExtendError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --print-config
        return int(e.code or 0)
    try:
        extend_checkpoint(
            args.model,
            args.tokens,
            args.out,
            init=args.init,
            init_kwargs=args.init_kwargs,
            pad_to_multiple_of=args.pad_to_multiple_of,
            seed=args.seed,
            skip_existing=args.skip_existing,
            rows=args.rows,
        )
    except (ExtendError, TokenError, ResizeError, st.SafetensorsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # loaders' own one-line errors (GGUF, config)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
