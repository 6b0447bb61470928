"""What a run reads: its data files, checked and encoded before the run directory is made.

* :class:`DataFiles`: the files of a run (``data.*``, or those ``make_data`` wrote);
* :func:`given_files`: the ``data.*`` files, checked to exist;
* :func:`read_inputs`: reads and checks every file and the examples they make, and extends
  the tokenizer (:class:`Inputs`); any problem is a ``BadInput`` naming the file and line;
* :class:`TrainError`: bad input to a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gti_jax import diagnose
from gti_jax.errors import BadInput, CheckpointError
from gti_jax.io.rows import HEAD_ROWS_FILE, checked_rows
from gti_jax.train.config import TrainConfig
from gti_jax.train.data import Example, encode_examples, read_candidates, read_examples
from gti_jax.train.evaluate import Evaluator
from gti_jax.vocab.resize import plan_resize
from gti_jax.vocab.tokens import (
    description_token_ids,
    extend_tokenizer,
    read_tokens_file,
    validate_new_tokens,
)

__all__ = [
    "DataFiles",
    "Inputs",
    "MakeData",
    "TrainError",
    "apply_init_rows",
    "codebook_vectors",
    "given_files",
    "pairs_from_descriptions",
    "read_inputs",
]

_TEXT_TO_TOKEN = ("Which token stands for: {d}?", 'What is the token for "{d}"?')
_TOKEN_TO_TEXT = ("What does {t} stand for?", "Describe {t}.")


class TrainError(BadInput):
    """Bad input to a run (data, model, config, a run directory in the way), found before the
    run directory is made."""


@dataclasses.dataclass
class DataFiles:
    """The files a run reads (``data.*``, or those a data producer made).

    Attributes:
      tokens, pairs, sft, eval, candidates: the ``data.*`` files (None: unset).
      valid: the validation prompts of ``eval.every`` (``data.valid``; None: unset).
      aux: auxiliary pairs for ``sft.aux_pairs_ratio`` (None: drawn from the pairs).
      semantic_ids: the directory of the tokens' semantic IDs, recorded in
        ``new_tokens.json`` (None: the tokens are not semantic IDs).
      codebooks: the loaded semantic IDs (anything with ``codebooks``, see
        :func:`gti_jax.diagnose.token_codebook_vectors`), for the RSA diagnostics. The
        producer that wrote the files passes them in already read: the trainer reads only
        the generic data files, never a front end's own formats.
    """

    tokens: Path
    pairs: Path | None
    sft: Path | None
    eval: Path | None
    candidates: Path | None
    aux: Path | None = None
    semantic_ids: Path | None = None
    codebooks: Any = None
    valid: Path | None = None


#: ``make_data(out_dir, model, tokenizer) -> DataFiles``: writes a run's data files into
#: ``out_dir`` (``run_dir/data``) when no ``data.*`` files are given, after every check.
MakeData = Callable[[Path, Any, Any], DataFiles]


def given_files(cfg: TrainConfig, make_data: MakeData | None) -> DataFiles | None:
    """The data files named in ``data.*`` (checked to exist), or None when `make_data` will
    make them."""
    d = cfg.data
    if d.tokens is None:
        if any(x is not None for x in (d.pairs, d.sft, d.eval, d.valid, d.candidates)):
            raise TrainError(
                "data.tokens is unset but other data.* files are set; give data.tokens too, or unset all data.* to use the built-in recommendation data (rec.*)"
            )
        if make_data is None:
            raise TrainError(
                "data.tokens is unset; give the data.* files, or run the whole pipeline "
                "(python -m gti_jax.train, gti_jax.pipeline.run) to prepare the built-in "
                "recommendation data (rec.*)"
            )
        return None
    files = DataFiles(
        tokens=Path(d.tokens),
        pairs=Path(d.pairs) if d.pairs else None,
        sft=Path(d.sft) if d.sft else None,
        eval=Path(d.eval) if d.eval else None,
        candidates=Path(d.candidates) if d.candidates else None,
        valid=Path(d.valid) if d.valid else None,
    )
    missing = [
        f"data.{k}={p}"
        for k in ("tokens", "pairs", "sft", "eval", "valid", "candidates")
        if (p := getattr(files, k)) is not None and not Path(p).is_file()
    ]
    if missing:
        raise TrainError(f"missing data file(s): {', '.join(missing)}; fix the paths")
    return files


def pairs_from_descriptions(entries, directions, seed: int):
    """Paired text <-> token prompts made from token descriptions, in the chosen directions.

    Each token gets every template of each direction: ``text_to_token`` asks for the token of
    a description, ``token_to_text`` for the description of a token.
    """
    missing = [e.token for e in entries if not (e.description or "").strip()]
    if missing:
        raise TrainError(
            f"tokens {missing[:5]} have no description; grounding without data.pairs needs a "
            "description for every token: add them to the tokens file, or give data.pairs"
        )
    out = []
    for e in entries:
        if "text_to_token" in directions:
            out += [Example(t.format(d=e.description.strip()), e.token) for t in _TEXT_TO_TOKEN]
        if "token_to_text" in directions:
            out += [Example(t.format(t=e.token), e.description.strip()) for t in _TOKEN_TO_TEXT]
    rng = np.random.default_rng(seed)
    return [out[i] for i in rng.permutation(len(out))]


@dataclasses.dataclass
class Inputs:
    """Everything a run reads from its data files, read and checked before it starts."""

    files: DataFiles
    entries: list  # TokenEntry, file order
    to_add: list[str]  # the new tokens
    num_tokens: int  # the tokenizer's size before the new tokens
    new_range: range  # their ids in the extended tokenizer
    desc_ids: Any  # init=description: each token's description ids
    ground: list  # encoded grounding examples ([] without grounding)
    sft: list  # encoded fine-tuning examples, auxiliary pairs included ([] without SFT)
    sft_units: list[int]  # the targets each of them trains (the learning curve's x axis)
    evaluator: Any  # the Evaluator of data.eval (its examples encoded, candidates checked)
    validator: Any = None  # the Evaluator of eval.every's sample of data.valid (None: off)
    init_rows: dict | None = None  # init_rows: {"embed"/"head": (ids, rows)}, checked


def read_inputs(cfg: TrainConfig, files: DataFiles, model, tokenizer) -> Inputs:
    """Reads and checks every data file and the examples they make; extends the tokenizer.

    Raises a BadInput (TrainError, TokenError, DataError, ...) naming the file and the line.
    """
    entries = read_tokens_file(files.tokens)
    num_tokens = len(tokenizer)
    requested = [e.token for e in entries]
    to_add = validate_new_tokens(tokenizer, requested, skip_existing=True)
    existing = [t for t in requested if t not in set(to_add)]
    if existing:
        raise TrainError(
            f"data.tokens={files.tokens}: {len(existing)} token(s) already in the vocabulary: "
            f"{', '.join(repr(t) for t in existing[:5])}; remove them from the tokens file"
        )
    plan_resize(
        int(model.num_rows),
        num_tokens,
        num_tokens + len(to_add),
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    pairs = read_examples(files.pairs) if files.pairs else None
    if cfg.ground.steps > 0 and pairs is None:
        pairs = pairs_from_descriptions(entries, cfg.ground.templates, cfg.seed)
    # read even without fine-tuning: the popularity baseline counts its targets
    sft_examples = read_examples(files.sft) if files.sft else []
    if cfg.sft.steps > 0 and not sft_examples:
        raise TrainError("sft.steps > 0 but data.sft is unset; give data.sft or set sft.steps=0")
    aux = _aux_examples(cfg, files, pairs, sft_examples) if cfg.sft.steps > 0 else []
    eval_examples = read_examples(files.eval) if files.eval else []
    if cfg.eval.max_examples is not None:
        eval_examples = eval_examples[: cfg.eval.max_examples]
    candidates = read_candidates(files.candidates) if files.candidates else None
    desc_ids = None
    if cfg.init == "description":
        descriptions = [e.description for e in entries]
        empty = [e.token for e in entries if not (e.description or "").strip()]
        if empty:
            raise TrainError(
                f"init=description needs a description for every token; {len(empty)} have "
                f"none ({', '.join(empty[:5])}): add them to data.tokens={files.tokens} or "
                "choose another init"
            )
        desc_ids = description_token_ids(tokenizer, descriptions, tokens=requested)
    new_ids = extend_tokenizer(tokenizer, to_add)

    def encode(examples, source):
        return encode_examples(
            tokenizer,
            examples,
            max_len=cfg.data.max_len,
            chat_template=cfg.data.chat_template,
            source=source,
        )

    validator = _validator(cfg, files, tokenizer, candidates, sft_examples)
    init_rows = _init_rows(cfg, tokenizer, model) if cfg.init_rows else None
    return Inputs(
        files=files,
        entries=entries,
        to_add=to_add,
        num_tokens=num_tokens,
        new_range=range(new_ids[0], new_ids[-1] + 1),
        desc_ids=desc_ids,
        ground=encode(pairs, str(files.pairs or "generated pairs")) if cfg.ground.steps else [],
        sft=encode(sft_examples + aux, str(files.sft)) if cfg.sft.steps else [],
        sft_units=[ex.num_targets for ex in sft_examples + aux] if cfg.sft.steps else [],
        evaluator=Evaluator(
            cfg, tokenizer, eval_examples, candidates, sft_examples, num_tokens=len(tokenizer)
        ),
        validator=validator,
        init_rows=init_rows,
    )


def _init_rows(cfg: TrainConfig, tokenizer, model) -> dict:
    """``init_rows``' rows and ids, checked against the extended tokenizer (bad input)."""
    path = Path(cfg.init_rows)
    dim = int(model.embed.embedding[...].shape[1])
    vocab = tokenizer.get_vocab()
    out = {}
    try:
        out["embed"] = checked_rows(path, vocab, dim)
        head = path.with_name(HEAD_ROWS_FILE)
        if not model.config.tie_word_embeddings and head.is_file():
            out["head"] = checked_rows(head, vocab, dim)
    except (CheckpointError, FileNotFoundError) as e:
        raise TrainError(f"init_rows={cfg.init_rows}: {e}") from None
    return out


def apply_init_rows(model, init_rows: dict | None):
    """The model with ``init_rows``' rows in its embedding (and untied head), on the same
    shardings; returned as it is without them."""
    if not init_rows:
        return model
    params = [("embed", model.embed.embedding, False)]
    if "head" in init_rows:
        params.append(("head", model.lm_head.kernel, True))  # [D, V]: a column per token
    for part, param, columns in params:
        ids, rows = init_rows[part]
        table = param[...]
        ids = np.asarray(ids)

        def put(t, r, ids=ids, columns=columns):
            return t.at[:, ids].set(r.T) if columns else t.at[ids].set(r)

        value = jax.jit(put, out_shardings=table.sharding)(table, rows.astype(table.dtype))
        param[...] = value
    return model


def _validator(cfg: TrainConfig, files: DataFiles, tokenizer, candidates, sft_examples):
    """The Evaluator of ``eval.every``: a fixed sample of ``eval.valid_examples`` rows of
    ``data.valid`` (seeded by ``seed``, kept in file order), ranked among the same candidates
    as the final evaluation; None when validation is off.

    Built after the tokenizer is extended (its examples name the new tokens)."""
    if cfg.eval.every == 0:
        return None
    if files.valid is None:
        raise TrainError(
            f"eval.every={cfg.eval.every} needs validation prompts: set data.valid=FILE, or "
            "eval.every=0"
        )
    examples = read_examples(files.valid)
    n = cfg.eval.valid_examples
    if n is not None and n < len(examples):
        keep = np.random.default_rng(cfg.seed + 13).choice(len(examples), n, replace=False)
        examples = [examples[i] for i in sorted(keep)]
    everything = dataclasses.replace(cfg.eval, max_examples=None)
    return Evaluator(
        dataclasses.replace(cfg, eval=everything),
        tokenizer,
        examples,
        candidates,
        sft_examples,
        num_tokens=len(tokenizer),
    )


def codebook_vectors(files: DataFiles, tokens):
    if files.codebooks is None:
        return None
    return diagnose.token_codebook_vectors(files.codebooks, tokens)


def _aux_examples(cfg: TrainConfig, files: DataFiles, pairs, sft_examples):
    ratio = cfg.sft.aux_pairs_ratio
    if ratio <= 0:
        return []
    pool = read_examples(files.aux) if files.aux else list(pairs or [])
    if not pool:
        raise TrainError(
            "sft.aux_pairs_ratio > 0 needs paired prompts (data.pairs or token descriptions)"
        )
    n = int(round(ratio * len(sft_examples)))
    rng = np.random.default_rng(cfg.seed + 7)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=n > len(pool))]
