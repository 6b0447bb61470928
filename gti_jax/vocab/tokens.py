"""New tokens: reading them from files, validating them, adding them to a tokenizer.

A tokens file lists the tokens to add, in the order their ids will be assigned:

- `.jsonl`: one `{"token": "<a_12>", "description": "text ..."}` a line; `description` is
  optional (the `description` initializer needs one for every token); blank lines are ignored.
- `.txt`: one token a line; blank lines are ignored.

`extend_tokenizer` is atomic: every check runs on a deep copy first (including a trial
addition that proves each token encodes to exactly one id and decodes back to itself), and the
caller's tokenizer is touched only when all tokens pass. New ids are contiguous and start at
`num_tokens(tokenizer)` (the tokenizer's size before the call), so the new embedding rows are
`table[n_old : n_old + n_new]`.

Names: `num_tokens` is the tokenizer's size, `len(tokenizer)`; the embedding table may be
padded to more rows (`num_rows`) and is handled elsewhere.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import AddedToken

from gti_jax.errors import BadInput
from gti_jax.io.text import read_utf8_lines

__all__ = [
    "TokenEntry",
    "TokenError",
    "TokenFileNotFoundError",
    "description_token_ids",
    "extend_tokenizer",
    "extended_copy",
    "num_tokens",
    "read_tokens_file",
    "validate_new_tokens",
]

# How many offending tokens an error message shows before "and N more".
_SHOW = 5
# The sentence used to check that a new token survives inside running text.
_CONTEXT = "hello {} world"


class TokenError(BadInput):
    """A bad token, tokens file or tokenizer; the message names the problem and the fix."""


class TokenFileNotFoundError(FileNotFoundError, TokenError):
    """A tokens file that does not exist."""


@dataclass(frozen=True)
class TokenEntry:
    """One new token and, optionally, the text that describes it.

    Attributes:
        token: the token's exact string, e.g. `"<a_12>"`.
        description: natural-language text about the token (used by the `description`
            initializer and by grounding prompts), or None.
    """

    token: str
    description: str | None = None


def _show(items: Iterable[Any], limit: int = _SHOW) -> str:
    """Formats items as `'a', 'b', 'c' and 4 more` for one-line error messages."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


def num_tokens(tokenizer: Any) -> int:
    """Returns the tokenizer's size, `len(tokenizer)`, added tokens included.

    This is the number of token ids, not the number of rows of the embedding table (which may
    be padded beyond it).

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The number of tokens.

    Example:
        >>> from tests.helpers.tokenizers import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> num_tokens(tok) == len(tok)
        True
    """
    return len(tokenizer)


def read_tokens_file(path: str | os.PathLike[str]) -> list[TokenEntry]:
    """Reads new tokens from a `.jsonl` or `.txt` file.

    `.jsonl`: one JSON object a line with a string `"token"` and an optional string (or null)
    `"description"`. `.txt`: one token a line, taken as written (only the line break is
    removed). Blank lines are ignored in both. Tokens are returned in file order; duplicates
    and tokens already in a vocabulary are reported later by `validate_new_tokens`.

    Args:
        path: the tokens file.

    Returns:
        The entries, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        TokenError: unknown extension, an empty file, or a malformed line (the message names
            the file, the line number, the problem and the fix).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "tokens.jsonl"
        >>> _ = p.write_text('{"token": "<a_1>", "description": "red bike"}\\n\\n{"token": "<a_2>"}')
        >>> for entry in read_tokens_file(p):
        ...     print(entry)
        TokenEntry(token='<a_1>', description='red bike')
        TokenEntry(token='<a_2>', description=None)
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".txt"):
        raise TokenError(
            f"{path}: unknown tokens file extension {ext!r}; use .jsonl (one "
            '{"token": ..., "description": ...} a line) or .txt (one token a line)'
        )
    if not os.path.isfile(path):
        raise TokenFileNotFoundError(f"{path}: tokens file not found; check the path")
    lines = read_utf8_lines(path, "tokens")
    entries = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if ext == ".txt":
            if line != line.strip():
                raise TokenError(
                    f"{path}:{lineno}: token {line!r} has leading or trailing whitespace; "
                    "remove it (tokens must be written exactly)"
                )
            entries.append(TokenEntry(line))
        else:
            entries.append(_parse_jsonl_line(path, lineno, line))
    if not entries:
        raise TokenError(f"{path}: no tokens found (file is empty); add one token a line")
    return entries


def _parse_jsonl_line(path: str, lineno: int, line: str) -> TokenEntry:
    """Parses one non-blank `.jsonl` line into a TokenEntry."""
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TokenError(
            f"{where}: malformed JSON ({e.msg}); write one "
            '{"token": "<a_12>", "description": "..."} object a line'
        ) from None
    if not isinstance(obj, dict):
        raise TokenError(
            f"{where}: expected a JSON object, got {type(obj).__name__}; write "
            '{"token": "<a_12>", "description": "..."}'
        )
    if "token" not in obj:
        raise TokenError(f'{where}: missing "token" key; add "token": "<the token>"')
    token = obj["token"]
    if not isinstance(token, str):
        raise TokenError(
            f'{where}: "token" must be a string, got {type(token).__name__} {token!r}; '
            f'quote it, e.g. "token": "{token}"'
        )
    description = obj.get("description")
    if description is not None and not isinstance(description, str):
        raise TokenError(
            f'{where}: "description" must be a string or null, got '
            f"{type(description).__name__}; write it as text"
        )
    return TokenEntry(token, description)


def _added_token(token: str, special: bool) -> AddedToken:
    return AddedToken(
        token, normalized=False, special=special, lstrip=False, rstrip=False, single_word=False
    )


def _add(tokenizer: Any, tokens: Sequence[str], special: bool) -> None:
    """Adds tokens in order; special ones are also registered as extra special tokens."""
    added = [_added_token(t, special) for t in tokens]
    if special:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": added}, replace_extra_special_tokens=False
        )
    else:
        tokenizer.add_tokens(added)


def _check_no_holes(tokenizer: Any) -> int:
    """Returns `len(tokenizer)` after checking every existing id lies below it."""
    n = num_tokens(tokenizer)
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= n:
        raise TokenError(
            f"tokenizer ids have holes: len(tokenizer) is {n} but the largest id is {top}, so new "
            "ids would not start after every existing id; re-number the tokenizer's vocabulary "
            "so ids are 0..len-1"
        )
    return n


def _decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """``[tokenizer.decode([i]) for i in ids]``, in one batched call where that is the same.

    A fast tokenizer's `decode` is its backend's `decode` followed, only when
    `clean_up_tokenization_spaces` is set, by a Python clean-up; without the clean-up the
    backend's `decode_batch` gives the same strings in one call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return [tokenizer.decode([i]) for i in ids]
    return backend.decode_batch([[i] for i in ids], skip_special_tokens=False)


def _encode_each(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``[tokenizer.encode(t, add_special_tokens=False) for t in texts]`` in one batched call.

    `tokenizer(texts)` is that call, but it converts each result to a dict in Python (about
    as slow as the encoding itself at 100,000 texts); when the backend is set up as
    transformers would set it for the call (no truncation or padding, the same
    `split_special_tokens`), its `encode_batch` returns the same ids directly.
    """
    texts = list(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if (
        backend is None
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != split
    ):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # `encode_batch_fast` (tokenizers >= 0.20) is `encode_batch` without character offsets.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flattens ragged id lists: ``(values, row_of_each_value)``."""
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    values = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum()))
    return values, np.repeat(np.arange(len(rows)), lengths)


def _broken_tokens(tokenizer: Any, tokens: Sequence[str], ids: Sequence[int]) -> list[str]:
    """The tokens (already added, with these ids) that the tokenizer does not keep whole.

    A token is kept whole when it encodes to exactly ``[id]``, decodes back to itself and
    its id appears in the encoding of a sentence around it. Each check is one batched
    tokenizer call over every token (100,000 tokens: 3 calls, not 300,000) and a vectorized
    comparison of the ids.
    """
    tokens = list(tokens)
    tid = np.asarray(ids, np.int64)
    alone = _encode_each(tokenizer, tokens)
    in_text = _encode_each(tokenizer, [_CONTEXT.format(t) for t in tokens])
    lengths = np.fromiter((len(r) for r in alone), np.int64, len(alone))
    first = np.fromiter((r[0] if r else -1 for r in alone), np.int64, len(alone))
    whole = (lengths == 1) & (first == tid)
    back = np.fromiter(
        (d == t for d, t in zip(_decode_each(tokenizer, ids), tokens, strict=True)),
        bool,
        len(tokens),
    )
    values, row = _ragged(in_text)
    in_context = np.zeros(len(tokens), bool)
    in_context[row[values == tid[row]]] = True
    ok = whole & back & in_context
    return [t for t, good in zip(tokens, ok, strict=True) if not good]


def _trial_add(tokenizer: Any, tokens: Sequence[str], special: bool) -> list[int]:
    """Adds tokens to `tokenizer` (a scratch copy) and checks each is kept whole.

    Returns the new ids; raises TokenError naming the tokens that do not encode to exactly one
    id, do not decode back to themselves or are split inside running text.
    """
    n_old = _check_no_holes(tokenizer)
    _add(tokenizer, tokens, special)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    broken = _broken_tokens(tokenizer, tokens, ids)
    if broken:
        raise TokenError(
            f"{len(broken)} token(s) cannot be kept whole by this tokenizer (they do not encode "
            f"to one id and decode back): {_show(broken)}; avoid characters its decoder rewrites "
            "(word-boundary markers such as 'Ġ' or '▁'; in byte-level BPE tokenizers also "
            "Latin-1 letters such as 'é'), e.g. use ASCII bracketed names like '<a_12>'"
        )
    expected = list(range(n_old, n_old + len(tokens)))
    if ids != expected:
        raise TokenError(
            f"new token ids {_show(ids)} are not contiguous from len(tokenizer)={n_old}; the "
            "tokenizer's ids have holes; re-number its vocabulary so ids are 0..len-1"
        )
    return ids


def _cheap_checks(tokenizer: Any, tokens: Sequence[str], skip_existing: bool) -> list[str]:
    """The checks that need no trial addition; returns the tokens to add."""
    tokens = list(tokens)
    if not tokens:
        raise TokenError("no tokens given; pass at least one new token")
    not_str = [t for t in tokens if not isinstance(t, str)]
    if not_str:
        raise TokenError(f"tokens must be strings, got {_show(not_str)}; quote them")
    empty = [t for t in tokens if not t.strip()]
    if empty:
        raise TokenError(
            f"{len(empty)} empty or whitespace-only token(s): {_show(empty)}; remove them"
        )
    padded = [t for t in tokens if t != t.strip()]
    if padded:
        raise TokenError(
            f"{len(padded)} token(s) with leading or trailing whitespace: {_show(padded)}; "
            "strip the whitespace"
        )
    dups = [t for t, c in Counter(tokens).items() if c > 1]
    if dups:
        raise TokenError(
            f"{len(dups)} token(s) requested more than once: {_show(dups)}; list each once"
        )
    vocab = tokenizer.get_vocab()
    existing = [t for t in tokens if t in vocab]
    if existing and not skip_existing:
        raise TokenError(
            f"{len(existing)} token(s) already in the vocabulary: {_show(existing)}; remove "
            "them or pass --skip-existing (skip_existing=True) to keep their current ids"
        )
    return [t for t in tokens if t not in vocab]


def validate_new_tokens(
    tokenizer: Any,
    tokens: Sequence[str],
    *,
    skip_existing: bool = False,
    special: bool = False,
) -> list[str]:
    """Checks new tokens against a tokenizer without changing it.

    Rejects, in this order: non-strings; empty or whitespace-only tokens; tokens with leading
    or trailing whitespace; tokens requested twice; tokens already in the vocabulary (unless
    `skip_existing`, which drops them); and tokens the tokenizer cannot keep whole, found by
    adding them to a deep copy and checking that each encodes to one id, decodes back to
    itself and stays one id inside running text.

    Args:
        tokenizer: a `transformers` fast tokenizer; not modified.
        tokens: the requested tokens, in order.
        skip_existing: drop tokens already in the vocabulary instead of raising.
        special: check them as special tokens (as `extend_tokenizer(special=True)` adds them).

    Returns:
        The tokens to add, in request order (all of them unless `skip_existing`).

    Raises:
        TokenError: with one line naming the offending tokens (up to 5, then "and N more").

    Example:
        >>> from tests.helpers.tokenizers import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> validate_new_tokens(tok, ["<a_1>", "<|im_end|>"], skip_existing=True)
        ['<a_1>']
    """
    return extended_copy(tokenizer, tokens, skip_existing=skip_existing, special=special)[1]


def extended_copy(
    tokenizer: Any,
    tokens: Sequence[str],
    *,
    skip_existing: bool = False,
    special: bool = False,
) -> tuple[Any, list[str], list[int]]:
    """The checks of `validate_new_tokens` and the addition in one pass, on a deep copy.

    `validate_new_tokens` followed by `extend_tokenizer` adds the tokens three times (two
    trial copies and the caller's tokenizer); with 100,000 tokens each addition and check
    pass costs seconds. This returns the trial copy itself, extended, and leaves `tokenizer`
    unchanged: for callers that can use a new tokenizer object (``gti_jax.extend``).

    Args:
        tokenizer: a `transformers` fast tokenizer; not modified.
        tokens: the requested tokens, in order.
        skip_existing: drop tokens already in the vocabulary instead of raising.
        special: add them as special tokens (as `extend_tokenizer(special=True)` does).

    Returns:
        ``(extended, added, ids)``: the extended copy (None when nothing is added), the
        tokens added in request order, and their ids (contiguous from ``len(tokenizer)``).

    Raises:
        TokenError: as `validate_new_tokens`.

    Example:
        >>> from tests.helpers.tokenizers import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> new, added, ids = extended_copy(tok, ["<a_1>"])
        >>> len(new) == len(tok) + 1, added, ids == [len(tok)]
        (True, ['<a_1>'], True)
    """
    to_add = _cheap_checks(tokenizer, tokens, skip_existing)
    if not to_add:
        return None, to_add, []
    trial = copy.deepcopy(tokenizer)
    return trial, to_add, _trial_add(trial, to_add, special)


def extend_tokenizer(
    tokenizer: Any,
    tokens: Sequence[str],
    *,
    skip_existing: bool = False,
    special: bool = False,
) -> list[int]:
    """Adds new tokens to a tokenizer, all or nothing, and returns their ids.

    Each token is added as `AddedToken(token, normalized=False, special=special, lstrip=False,
    rstrip=False, single_word=False)`, so it is matched exactly and encodes to one id. All
    checks of `validate_new_tokens` run on a deep copy first; the caller's tokenizer changes
    only if every token passes, so a failing call leaves it as it was.

    Args:
        tokenizer: a `transformers` fast tokenizer; modified in place on success.
        tokens: the tokens to add, in the order their ids are assigned.
        skip_existing: drop tokens already in the vocabulary instead of raising; their ids
            are not in the result (look them up with `convert_tokens_to_ids`).
        special: add them as special tokens: also listed in `extra_special_tokens` and
            skipped by `decode(skip_special_tokens=True)`.

    Returns:
        The ids of the added tokens, in request order: `range(n_old, n_old + n_added)` with
        `n_old = num_tokens(tokenizer)` before the call. Empty if every token already existed
        and `skip_existing` is set.

    Raises:
        TokenError: a bad token (see `validate_new_tokens`) or a tokenizer whose ids have
            holes, so new ids would not be contiguous from `len(tokenizer)`.

    Example:
        >>> from tests.helpers.tokenizers import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> n = len(tok)
        >>> ids = extend_tokenizer(tok, ["<a_1>", "<a_12>"])
        >>> ids == [n, n + 1], tok.encode("<a_12>", add_special_tokens=False) == [n + 1]
        (True, True)
    """
    to_add = validate_new_tokens(tokenizer, tokens, skip_existing=skip_existing, special=special)
    if not to_add:
        return []
    n_old = num_tokens(tokenizer)
    _add(tokenizer, to_add, special)
    ids = tokenizer.convert_tokens_to_ids(to_add)
    expected = list(range(n_old, n_old + len(to_add)))
    if ids != expected:  # The trial on the copy passed, so this means the copy was not faithful.
        raise TokenError(
            f"new token ids {_show(ids)} differ from {_show(expected)} found on a copy of the "
            "tokenizer; the tokenizer does not deep-copy faithfully, report this as a bug"
        )
    return ids


def description_token_ids(
    tokenizer: Any,
    descriptions: Sequence[str | None],
    *,
    tokens: Sequence[str] | None = None,
) -> list[list[int]]:
    """Encodes token descriptions to ids, without special tokens or chat template.

    Used by the `description` initializer: each new row becomes the mean of the embeddings of
    its description's ids.

    Args:
        tokenizer: a `transformers` tokenizer.
        descriptions: one description per new token (None or empty is an error).
        tokens: the tokens the descriptions belong to, used only to name them in errors
            (otherwise they are named by position).

    Returns:
        One non-empty list of ids per description, in order.

    Raises:
        TokenError: some descriptions are empty, None or encode to no ids (the message names
            the tokens), or `tokens` and `descriptions` differ in length.

    Example:
        >>> from tests.helpers.tokenizers import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> ids = description_token_ids(tok, ["a red bicycle"])
        >>> tok.decode(ids[0])
        'a red bicycle'
    """
    descriptions = list(descriptions)
    if tokens is not None and len(tokens) != len(descriptions):
        raise TokenError(
            f"got {len(tokens)} tokens but {len(descriptions)} descriptions; give one "
            "description per token"
        )
    names = list(tokens) if tokens is not None else [f"#{i}" for i in range(len(descriptions))]
    out: list[list[int]] = []
    bad = []
    for name, desc in zip(names, descriptions, strict=True):
        if not isinstance(desc, str) or not desc.strip():
            bad.append(name)
            out.append([])
            continue
        ids = list(tokenizer.encode(desc, add_special_tokens=False))
        if not ids:
            bad.append(name)
        out.append(ids)
    if bad:
        raise TokenError(
            f"{len(bad)} token(s) have an empty or missing description: {_show(bad)}; the "
            "`description` initializer needs a description for every token (add "
            '"description": "..." to each line of the tokens file, or pick another initializer)'
        )
    return out
