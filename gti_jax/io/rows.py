"""The grounded-rows file: the new embedding rows alone (``[N, D]``) with JSON metadata.

A run writes ``grounded_rows.safetensors`` (and, for an untied head,
``grounded_head_rows.safetensors`` beside it): one safetensors tensor ``rows`` and the
metadata the trainer records (the tokens, the ids they had, the init). ``init_rows=`` of a
later run and ``python -m gti_jax.extend --rows`` apply such a file to another copy of the
model, through :func:`checked_rows`, which refuses rows that would land on another token.
Written atomically (:func:`gti_jax.io.safetensors.save_tensors`); nothing here pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import safe_open

from gti_jax.errors import CheckpointError
from gti_jax.io.safetensors import save_tensors

__all__ = [
    "HEAD_ROWS_FILE",
    "ROWS_FILE",
    "RowsFileNotFoundError",
    "checked_rows",
    "load_rows",
    "save_rows",
]

#: The grounded rows a run writes (embedding), and beside it the head's (untied models).
ROWS_FILE = "grounded_rows.safetensors"
HEAD_ROWS_FILE = "grounded_head_rows.safetensors"

_ROWS_KEY = "rows"
_ROWS_FORMAT = "gti_jax.rows/1"


class RowsFileNotFoundError(FileNotFoundError):
    """The grounded-rows file does not exist."""


def save_rows(path: str | os.PathLike[str], rows: Any, meta: Mapping[str, Any]) -> None:
    """Writes the new embedding rows alone, with JSON metadata, to one safetensors file.

    The file is written to a temporary name beside `path` and renamed into place, so a
    reader never sees half a file. In a multi-host run, call it from one process.

    Args:
      path: destination ``.safetensors`` file; its directory is created if needed.
      rows: ``[N, D]`` array (numpy, or a fully addressable jax array), any float dtype
        including bfloat16.
      meta: JSON-serializable mapping (e.g. the new tokens, their first row id, the init
        method); each value is stored as a JSON string under its key.

    Raises:
      CheckpointError: `rows` is not 2-D or `meta` is not a JSON mapping.

    Example:
      >>> import os, tempfile, numpy as np
      >>> p = os.path.join(tempfile.mkdtemp(), "grounded_rows.safetensors")
      >>> save_rows(p, np.ones((2, 4), np.float32), {"tokens": ["<a_1>", "<a_2>"]})
      >>> rows, meta = load_rows(p)
      >>> rows.shape, meta["tokens"]
      ((2, 4), ['<a_1>', '<a_2>'])
    """
    array = np.ascontiguousarray(np.asarray(rows))
    if array.ndim != 2:
        raise CheckpointError(f"rows must be a [N, D] array, got shape {array.shape}")
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta must be a mapping, got {type(meta).__name__}")
    header = {"format": _ROWS_FORMAT}
    for key, value in meta.items():
        if not isinstance(key, str) or key == "format":
            raise CheckpointError(f"meta keys must be strings other than 'format', got {key!r}")
        try:
            header[key] = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta[{key!r}] is not JSON-serializable: {e}") from None
    save_tensors(path, {_ROWS_KEY: array}, metadata=header)


def load_rows(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads a file written by :func:`save_rows`.

    Args:
      path: the ``.safetensors`` file.

    Returns:
      ``(rows, meta)``: the ``[N, D]`` array in its saved dtype and the metadata dict.

    Raises:
      RowsFileNotFoundError: no file at `path`.
      CheckpointError: the file is not a grounded-rows file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RowsFileNotFoundError(f"grounded-rows file not found: {path}")
    try:
        with safe_open(path, framework="np") as f:
            header = dict(f.metadata() or {})
            if header.get("format") != _ROWS_FORMAT or _ROWS_KEY not in f.keys():
                raise CheckpointError(
                    f"{path} is not a grounded-rows file (expected a '{_ROWS_KEY}' tensor and "
                    f"format {_ROWS_FORMAT}); write it with save_rows"
                )
            rows = f.get_tensor(_ROWS_KEY)
    except CheckpointError:
        raise
    except Exception as e:  # not safetensors at all
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path} is not a readable safetensors file: {msg}") from None
    header.pop("format")
    return rows, {k: json.loads(v) for k, v in header.items()}


def checked_rows(
    path: str | os.PathLike[str], token_ids: Mapping[str, int], dim: int
) -> tuple[list[int], np.ndarray]:
    """The rows of a grounded-rows file and the ids they go to, checked against a tokenizer.

    The file records its tokens and the ids they had (``tokens``, ``new_ids``); each token
    must have the same id in `token_ids` (the tokenizer the rows are applied with), so rows
    never land on another token's row, and the rows must be ``[len(tokens), dim]``.

    Args:
      path: a file written by :func:`save_rows` with the trainer's meta.
      token_ids: token -> id in the target tokenizer (after its extension).
      dim: the target model's embedding width.

    Returns:
      ``(ids, rows)``: the target ids and the ``[N, dim]`` rows, in the file's order.

    Raises:
      CheckpointError: one line: no token list, a token missing or at another id, a shape
        that does not fit.

    Example:
      >>> import os, tempfile, numpy as np
      >>> p = os.path.join(tempfile.mkdtemp(), "rows.safetensors")
      >>> save_rows(p, np.ones((2, 4), np.float32), {"tokens": ["<x>", "<y>"], "new_ids": [5, 7]})
      >>> checked_rows(p, {"<x>": 5, "<y>": 6}, 4)[0]
      [5, 6]
    """
    rows, meta = load_rows(path)
    tokens, span = meta.get("tokens"), meta.get("new_ids")
    if not isinstance(tokens, list) or not isinstance(span, list) or len(span) != 2:
        raise CheckpointError(
            f"{path}: the rows file does not record its tokens and ids (meta 'tokens', "
            "'new_ids'); use a grounded_rows.safetensors written by the trainer"
        )
    if rows.shape != (len(tokens), dim):
        raise CheckpointError(
            f"{path}: rows are {list(rows.shape)}, expected [{len(tokens)}, {dim}] (one row of "
            f"the model's width per token); the file belongs to another model"
        )
    ids = []
    for i, tok in enumerate(tokens):
        want = int(span[0]) + i
        got = token_ids.get(tok)
        if got != want:
            here = "is not in the tokenizer" if got is None else f"has id {got} here"
            raise CheckpointError(
                f"{path}: token {tok!r} {here} but id {want} in the file; apply the rows to "
                "the model they were grounded for, extended with the same tokens in order"
            )
        ids.append(want)
    return ids, rows
