"""Where a model comes from: a Hugging Face directory, a ``.gguf`` file or a built-in alias.

:func:`resolve_source` is the one place that tells the three apart; every loader and every
command line check (``gti_jax.extend --model``, ``gti_jax.train model=``,
:func:`gti_jax.models.load_pretrained`) goes through it, so they accept the same names and
reject the rest with the same one-line messages.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = open(d + "/config.json", "w").write("{}")
    >>> resolve_source(d).kind
    'hf'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, NamedTuple

from gti_jax.errors import BadInput

__all__ = [
    "EXPORT_DTYPES",
    "ModelSource",
    "ModelSourceError",
    "resolve_source",
    "source_dtype",
    "source_generation_config",
]

#: The weight dtypes an export may be written in.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

_WHAT = "give a Hugging Face checkpoint directory (with config.json), a .gguf file or an alias"


class ModelSourceError(FileNotFoundError, BadInput):
    """A model name that is no checkpoint directory, ``.gguf`` file or known alias."""


class ModelSource(NamedTuple):
    """A resolved model: ``kind`` is ``"hf"`` (a checkpoint directory) or ``"gguf"`` (a file)."""

    kind: Literal["hf", "gguf"]
    path: Path


def resolve_source(name: str | os.PathLike, *, label: str | None = None) -> ModelSource:
    """Tells a Hugging Face directory, a ``.gguf`` file and an alias apart; checks it exists.

    Nothing is read beyond the directory listing: a directory must hold ``config.json``, a
    ``.gguf`` path must be a file, and any other name must be an alias of
    :data:`gti_jax.models.gguf.ALIASES` (resolved to its installed file).

    Args:
        name: a checkpoint directory, a ``.gguf`` path or an alias such as ``"smollm2-135m"``.
        label: how the messages name the input (e.g. ``"--model x"`` or ``"model=x"``);
            defaults to ``name``.

    Returns:
        A :class:`ModelSource`.

    Raises:
        ModelSourceError: a directory without ``config.json``, a missing ``.gguf`` file, or
            a name that is neither (the message lists the aliases).
        gti_jax.models.gguf.GGUFFileNotFoundError: an alias whose package is not installed.

    Example:
        >>> resolve_source("smollm2-135m").kind
        'gguf'
        >>> resolve_source("no/such/dir", label="--model no/such/dir")
        Traceback (most recent call last):
        ...
        gti_jax.models.source.ModelSourceError: --model no/such/dir: no such directory, .gguf file or alias (aliases: smollm2-135m); give a Hugging Face checkpoint directory (with config.json), a .gguf file or an alias
    """
    label = str(name) if label is None else label
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{label}: the directory has no config.json; {_WHAT}")
        return ModelSource("hf", path)
    from gti_jax.models import gguf

    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{label}: no such .gguf file; check the path")
        return ModelSource("gguf", path)
    resolved = gguf.resolve_alias(str(name))
    if resolved is None:
        raise ModelSourceError(
            f"{label}: no such directory, .gguf file or alias "
            f"(aliases: {', '.join(gguf.ALIASES)}); {_WHAT}"
        )
    return ModelSource("gguf", Path(resolved))


def source_dtype(source: ModelSource) -> str:
    """The dtype a model's source checkpoint holds its weights in, one of `EXPORT_DTYPES`.

    A Hugging Face directory: its ``config.json`` ``dtype`` (``torch_dtype`` before
    transformers 5), which is what ``from_pretrained(dtype="auto")`` loads, else the
    safetensors dtype of the embedding. A GGUF file: float32 (its weights are dequantized
    to float32 when read). Anything else (float64, int8, unreadable): float32.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = open(d + "/config.json", "w").write('{"torch_dtype": "bfloat16"}')
        >>> source_dtype(resolve_source(d))
        'bfloat16'
    """
    if source.kind != "hf":
        return "float32"
    from gti_jax.io.safetensors import SafetensorsError, checkpoint_files, read_header

    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key in ("dtype", "torch_dtype"):
        name = config.get(key) if isinstance(config, dict) else None
        if isinstance(name, str) and name.removeprefix("torch.") in EXPORT_DTYPES:
            return name.removeprefix("torch.")
    try:
        path = checkpoint_files(source.path)["model.embed_tokens.weight"]
        stored = read_header(path)[0]["model.embed_tokens.weight"].dtype
    except (SafetensorsError, KeyError):
        return "float32"
    return _SAFETENSORS_DTYPES.get(stored, "float32")


def source_generation_config(source: ModelSource) -> dict | None:
    """A Hugging Face directory's ``generation_config.json``, or None when it has none
    (or the model is a GGUF file).

    Raises:
        BadInput: the file is not a JSON object (transformers would not load it either);
            read before any work, so a run does not fail at its export.
    """
    path = source.path / "generation_config.json"
    if source.kind != "hf" or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e}); fix the file or remove it") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path}: not a JSON object; fix the file or remove it")
    return value
