"""Temporary files and directories that become outputs only when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["temp_dir_beside"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new hidden directory next to ``path``, on the same file system, to rename into place.

    Unlike ``tempfile.mkdtemp`` (mode 0700), it gets the permissions of an ordinary new
    directory (0777 minus the umask), since it becomes the output.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp
