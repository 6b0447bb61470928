"""A Hugging Face tokenizer directory, extended with the `tokenizers` library alone.

Why: `python -m gti_jax.extend` reads a tokenizer, adds the new tokens, checks each and
writes the tokenizer back. Through transformers the tokenizer part of a 100,000-token
extension of SmolLM2 cost about 11 s on 2 cores (6.3 s of it importing transformers, which
imports torch), against about 1.5 s for the same work on the `tokenizers` backend
(`docs/benchmarks.md`, `scripts/bench_extend.py`). Adding tokens is an operation on
`tokenizer.json` alone whenever transformers itself takes that file as it is: its generic
fast-tokenizer class (`TokenizersBackend`, formerly `PreTrainedTokenizerFast`, which loads
`tokenizer.json` unchanged) rather than a model-specific class that rebuilds the pipeline
from the vocabulary, no remote code, no decode clean-up, no truncation or padding stored in
the file and every special token the config names already in the vocabulary (transformers
would add a missing one on load). For such a directory `open_tokenizer_dir` returns a
`TokenizerDir`, which answers the calls `gti_jax.vocab.tokens` makes exactly as the
transformers tokenizer would (`len`, `get_vocab`, `add_tokens`, `convert_tokens_to_ids`,
`encode`, `decode`, `backend_tokenizer`) and saves `tokenizer.json` with the added tokens and
`tokenizer_config.json` unchanged, which `AutoTokenizer` loads as the same tokenizer the
transformers path writes (tests/unit/test_tokenizer_dir.py compares them). Any other
directory gets ``None`` and the reason, and the caller uses transformers.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from gti_jax.vocab.tokens import TokenError

__all__ = ["GENERIC_CLASSES", "TokenizerDir", "open_tokenizer_dir"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# transformers' tokenizer classes that load tokenizer.json as it is (no own pipeline).
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# Config keys that name special tokens (a string or an AddedToken dict with "content").
_NAMED_SPECIALS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_LIST_SPECIALS = ("extra_special_tokens", "additional_special_tokens")


class TokenizerDir:
    """A tokenizer directory's `tokenizer.json` backend and its `tokenizer_config.json`.

    Made by `open_tokenizer_dir`, which decides that transformers would load this directory
    as exactly this backend; the methods are the subset of a transformers fast tokenizer's
    that `gti_jax.vocab.tokens` and `gti_jax.extend` use, with the same results.

    Attributes:
        backend_tokenizer: the `tokenizers.Tokenizer` (as transformers names its backend).
        config: the parsed `tokenizer_config.json`.
        config_text: its text, written back unchanged by `save_pretrained`.
        split_special_tokens: the config's value (transformers copies it to the backend's
            `encode_special_tokens`, as this does).
        clean_up_tokenization_spaces: always False here (`open_tokenizer_dir` declines
            directories that set it).
    """

    clean_up_tokenization_spaces = False

    def __init__(self, backend: Tokenizer, config: dict[str, Any], config_text: str):
        self.backend_tokenizer = backend
        self.config = config
        self.config_text = config_text
        self.split_special_tokens = bool(config.get("split_special_tokens", False))
        backend.encode_special_tokens = self.split_special_tokens

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __deepcopy__(self, memo: dict) -> TokenizerDir:
        backend = Tokenizer.from_str(self.backend_tokenizer.to_str())
        return TokenizerDir(backend, copy.deepcopy(self.config, memo), self.config_text)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def add_tokens(self, tokens: Sequence[str | AddedToken]) -> int:
        return self.backend_tokenizer.add_tokens(list(tokens))

    def add_special_tokens(self, *args: Any, **kwargs: Any) -> int:
        """Not supported: transformers also records special tokens in the config it writes."""
        raise TokenError(
            "special tokens cannot be added to a tokenizer opened with open_tokenizer_dir; load "
            "it with transformers.AutoTokenizer.from_pretrained to add special tokens"
        )

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int | None]:
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes `tokenizer.json` (with the added tokens) and `tokenizer_config.json`."""
        directory = Path(directory)
        self.backend_tokenizer.save(str(directory / TOKENIZER_FILE))
        (directory / CONFIG_FILE).write_text(self.config_text, encoding="utf-8")


def _special_contents(config: dict[str, Any]) -> list[str]:
    """Every special token string the config names."""

    def content(v: Any) -> str | None:
        if isinstance(v, dict):
            return v.get("content")
        return v if isinstance(v, str) else None

    def values(v: Any) -> list[Any]:  # a list, or a dict of named tokens ({"image_token": ...})
        return list(v.values()) if isinstance(v, dict) else list(v or [])

    named = [content(config.get(k)) for k in _NAMED_SPECIALS]
    listed = [content(v) for k in _LIST_SPECIALS for v in values(config.get(k))]
    return [t for t in named + listed if t]


def _decline(config: dict[str, Any]) -> str:
    """Why transformers might load this config as something other than tokenizer.json
    unchanged; empty when it would not."""
    cls = config.get("tokenizer_class")
    if cls not in GENERIC_CLASSES:
        return f"tokenizer_class {cls!r} has its own pipeline"
    for key in ("auto_map", "fix_mistral_regex"):
        if key in config:
            return f"tokenizer_config.json sets {key}"
    if config.get("clean_up_tokenization_spaces", False):
        return "clean_up_tokenization_spaces is set"
    return ""


def open_tokenizer_dir(path: str | os.PathLike) -> tuple[TokenizerDir | None, str]:
    """Opens a tokenizer directory with the `tokenizers` library when that is exact.

    Args:
        path: a Hugging Face checkpoint or tokenizer directory.

    Returns:
        ``(tokenizer, "")``, or ``(None, reason)`` when transformers should load it (no
        `tokenizer.json` or `tokenizer_config.json`, a model-specific tokenizer class, remote
        code, decode clean-up, stored truncation or padding, a special token the vocabulary
        lacks, or a file that does not parse: transformers then reports it in its own words).

    Example:
        >>> import tempfile
        >>> from tests.helpers.tokenizers import save_tiny_tokenizer
        >>> d = tempfile.mkdtemp()
        >>> ref = save_tiny_tokenizer(d)
        >>> tok, why = open_tokenizer_dir(d)
        >>> len(tok) == len(ref), why
        (True, '')
    """
    path = Path(path)
    files = path / TOKENIZER_FILE, path / CONFIG_FILE
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        return None, f"no {' or '.join(missing)}"
    try:
        text = files[1].read_text(encoding="utf-8")
        config = json.loads(text)
        backend = Tokenizer.from_file(str(files[0]))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        return None, f"cannot read it with tokenizers ({type(e).__name__})"
    if not isinstance(config, dict):
        return None, f"{CONFIG_FILE} is not a JSON object"
    why = _decline(config)
    if why:
        return None, why
    if backend.truncation is not None or backend.padding is not None:
        return None, f"{TOKENIZER_FILE} stores truncation or padding"
    vocab = backend.get_vocab(with_added_tokens=True)
    absent = [t for t in _special_contents(config) if t not in vocab]
    if absent:
        return None, f"special token {absent[0]!r} is not in the vocabulary"
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(index).isdigit() or vocab.get(content) != int(index):
            return None, f"added_tokens_decoder entry {index} is not in {TOKENIZER_FILE}"
    return TokenizerDir(backend, config, text), ""
