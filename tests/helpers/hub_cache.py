"""A Hugging Face Hub cache built by hand, laid out as ``huggingface_hub`` writes it.

``<cache>/models--Org--Name/blobs/<sha256>`` holds each file once;
``snapshots/<commit>/<file>`` are relative symlinks to those blobs; ``refs/<branch>`` holds
the commit a branch points at. That is all ``snapshot_download(..., local_files_only=True)``
and ``try_to_load_from_cache`` read, so a test can load a Hub id offline.

Example:
    >>> commit = add_to_hub_cache(cache, "Org/Tiny", model_dir, branch="main")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["add_to_hub_cache"]


def add_to_hub_cache(
    cache: str | os.PathLike, repo_id: str, model_dir: str | os.PathLike, *, branch: str | None
) -> str:
    """Adds the files of `model_dir` as one revision of `repo_id` to the cache `cache`.

    Args:
        cache: the Hub cache directory (what ``HF_HUB_CACHE`` names, ``HF_HOME/hub``).
        repo_id: ``"Org/Name"``.
        model_dir: a checkpoint directory (flat: config, safetensors, tokenizer files).
        branch: the ref that points at this revision (``refs/<branch>``), or None.

    Returns:
        The revision's commit hash (40 hex digits, derived from the files' contents).
    """
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1(repr(sorted(digests.items())).encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / digests[p.name]
        if not blob.exists():
            blob.write_bytes(p.read_bytes())
        (snapshot / p.name).symlink_to(os.path.join("..", "..", "blobs", digests[p.name]))
    if branch is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return commit
