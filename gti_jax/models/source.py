"""Where a model comes from: a Hugging Face directory, a ``.gguf`` file, a built-in alias or a
Hugging Face Hub id.

:func:`resolve_source` is the one place that tells them apart; every loader and every
command line check (``gti_jax.extend --model``, ``gti_jax.train model=``,
:func:`gti_jax.models.load_pretrained`) goes through it, so they accept the same names and
reject the rest with the same one-line messages.

A Hub id (``Org/Name``, or ``Org/Name@revision`` with a branch, tag or commit hash) names a
snapshot in the Hugging Face cache, found through ``huggingface_hub`` as transformers finds
it: ``HF_HUB_CACHE`` (else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and
``HF_HUB_OFFLINE`` are honoured, read when the name is resolved (so a process that sets them
after importing ``huggingface_hub`` is obeyed too). A cached snapshot is used without any
network access. When it is not cached: offline (``HF_HUB_OFFLINE=1``) is one line saying so
and how to fix it; online, ``snapshot_download`` fetches the model's config, weights
(safetensors) and tokenizer files into the cache, as ``from_pretrained`` would. A local path
always wins over a Hub id of the same spelling.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = open(d + "/config.json", "w").write("{}")
    >>> resolve_source(d).kind
    'hf'
    >>> hub_id("Qwen/Qwen3-0.6B@main"), hub_id("runs/x/export"), hub_id("smollm2-135m")
    (('Qwen/Qwen3-0.6B', 'main'), None, None)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal, NamedTuple

from gti_jax.errors import BadInput

__all__ = [
    "EXPORT_DTYPES",
    "ModelSource",
    "ModelSourceError",
    "hub_cache_dir",
    "hub_id",
    "resolve_source",
    "source_dtype",
    "source_generation_config",
]

#: The weight dtypes an export may be written in.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

_WHAT = (
    "give a Hugging Face checkpoint directory (with config.json), a .gguf file, an alias or "
    "a Hub id Org/Name[@revision]"
)
# Org/Name[@revision]: the Hub's own repo-id characters; a revision may hold '/' (branches).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?")
# What a model needs from a Hub repository (no .bin / .pt: never unpickled; no ONNX, GGUF...).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class ModelSourceError(FileNotFoundError, BadInput):
    """A model name that is no checkpoint directory, ``.gguf`` file, alias or cached Hub id."""


class ModelSource(NamedTuple):
    """A resolved model: ``kind`` is ``"hf"`` (a checkpoint directory) or ``"gguf"`` (a file).

    A Hub id resolves to ``"hf"`` with ``path`` its snapshot directory in the cache.
    """

    kind: Literal["hf", "gguf"]
    path: Path


def hub_id(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` if `name` is spelled as a Hub id, else None."""
    m = _HUB_ID.fullmatch(str(name))
    return (m["repo"], m["rev"]) if m else None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache as the environment names it now (``HF_HUB_CACHE``, the
    legacy ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    cache = (
        os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or os.path.join(home, "hub")
    )
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _from_hub(repo: str, revision: str | None, label: str) -> Path:
    """The snapshot directory of `repo` at `revision`: from the cache, else downloaded when
    online; one :class:`ModelSourceError` line otherwise."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    spelled = repo + (f"@{revision}" if revision else "")
    kw = dict(revision=revision, cache_dir=str(cache), allow_patterns=_HUB_FILES)
    try:
        return Path(huggingface_hub.snapshot_download(repo, local_files_only=True, **kw))
    except LocalEntryNotFoundError:
        pass  # not cached
    except ValueError as e:  # HFValidationError: a name the Hub would refuse
        raise ModelSourceError(f"{label}: not a valid Hub id ({e}); {_WHAT}") from None
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise ModelSourceError(
            f"{label}: no such local directory, and the Hub model {spelled} is not in the "
            f"Hugging Face cache ({cache}) while HF_HUB_OFFLINE is set; download it on a "
            f"connected machine (hf download {repo}{f' --revision {revision}' if revision else ''}"
            ", or huggingface-cli download with huggingface_hub < 1.0) into this cache "
            "(HF_HOME or HF_HUB_CACHE), or give a local checkpoint directory"
        )
    try:
        return Path(huggingface_hub.snapshot_download(repo, **kw))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo or revision: one line
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelSourceError(
            f"{label}: no such local directory, and the Hub model {spelled} could not be "
            f"downloaded ({type(e).__name__}: {why}); check the id and the network, or give "
            "a local checkpoint directory"
        ) from None


def resolve_source(name: str | os.PathLike, *, label: str | None = None) -> ModelSource:
    """Tells a Hugging Face directory, a ``.gguf`` file, an alias and a Hub id apart; checks
    it exists.

    Nothing is read beyond the directory listing: a directory must hold ``config.json``, a
    ``.gguf`` path must be a file, a Hub id ``Org/Name[@revision]`` must be in the Hugging
    Face cache (or be downloadable when not offline; see the module docstring), and any other
    name must be an alias of :data:`gti_jax.models.gguf.ALIASES` (resolved to its installed
    file).

    Args:
        name: a checkpoint directory, a ``.gguf`` path, an alias such as ``"smollm2-135m"``,
            or a Hub id such as ``"Qwen/Qwen3-0.6B"`` or ``"Qwen/Qwen3-0.6B@main"``.
        label: how the messages name the input (e.g. ``"--model x"`` or ``"model=x"``);
            defaults to ``name``.

    Returns:
        A :class:`ModelSource`.

    Raises:
        ModelSourceError: a directory without ``config.json``, a missing ``.gguf`` file, a
            Hub id neither cached nor downloadable, or a name that is none of these (the
            message lists the aliases).
        gti_jax.models.gguf.GGUFFileNotFoundError: an alias whose package is not installed.

    Example:
        >>> resolve_source("smollm2-135m").kind
        'gguf'
        >>> resolve_source("no/such/dir", label="--model no/such/dir")
        Traceback (most recent call last):
        ...
        gti_jax.models.source.ModelSourceError: --model no/such/dir: no such directory, .gguf file or alias (aliases: smollm2-135m); give a Hugging Face checkpoint directory (with config.json), a .gguf file, an alias or a Hub id Org/Name[@revision]
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
    hub = hub_id(name)
    if hub is not None:
        snapshot = _from_hub(*hub, label)
        if not (snapshot / "config.json").is_file():
            raise ModelSourceError(
                f"{label}: the cached snapshot {snapshot} has no config.json; not a model "
                "checkpoint, or a partial download (download it again)"
            )
        return ModelSource("hf", snapshot)
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
