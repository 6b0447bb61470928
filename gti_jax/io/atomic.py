"""Temporary files and directories that become outputs only when complete.

Every output is written under a hidden temporary name beside its final one and renamed into
place, so a kill or a full disk never leaves a half-written file under the final name. The
temporaries get the permissions of an ordinary new file (0666 or 0777 minus the umask), not
the 0600/0700 of ``tempfile``, since they become the outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_dir",
    "atomic_write",
    "replace_dir",
    "temp_dir_beside",
    "temp_file_beside",
    "umask",
]


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
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
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def temp_file_beside(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new hidden file next to ``path`` (an open descriptor and its name), to rename into place.

    Unlike ``tempfile.mkstemp`` (mode 0600), it gets the permissions of an ordinary new file
    (0666 minus the umask), since it becomes the output.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


@contextlib.contextmanager
def _flush_behind(fd: int) -> Iterator[None]:
    """fsyncs `fd` every 20 ms in a background thread while the block writes to it.

    The disk then takes the data while later parts are still being written, so the final
    fsync waits only for the rest: writing a 770 MB file and syncing it took 0.82 s instead
    of 0.97 s (median of 5 each, 2 cores, ext4). An error here is left for the final fsync
    (after the block) to raise in the caller's thread.
    """
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.02):
            try:
                os.fsync(fd)
            except OSError:
                return

    thread = threading.Thread(target=loop, name="gti_jax-flush-behind", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[Any]], Any],
    *,
    binary: bool = False,
    flush_behind: bool = False,
) -> Path:
    """Writes ``path`` through ``write(file)`` on a temporary file, then renames it into place.

    The data is flushed to disk before the rename. On any failure (a full disk, a kill, an
    error in ``write``) the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the destination; its directory is created if needed.
        write: called once with the open temporary file.
        binary: open the file in binary mode (text mode writes UTF-8 with ``\\n`` line ends).
        flush_behind: sync to disk while writing, not only at the end (for large files).

    Returns:
        ``path``.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = atomic_write(p, lambda f: f.write("hello\\n"))
        >>> p.read_text()
        'hello\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        kwargs = {} if binary else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, "wb" if binary else "w", **kwargs) as f:
            with _flush_behind(fd) if flush_behind else contextlib.nullcontext():
                write(f)
                f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Renames the complete directory ``src`` to ``dest``, replacing any ``dest`` there.

    An existing ``dest`` is first renamed aside (to a hidden directory beside it) and removed
    only once ``src`` is in place; if that rename fails, the old ``dest`` is put back. ``src``
    must be on the same file system as ``dest`` (see :func:`temp_dir_beside`).

    Returns:
        ``dest``.
    """
    src, dest = Path(src), Path(dest)
    if not dest.exists():
        os.replace(src, dest)
        return dest
    old = temp_dir_beside(dest, "old")
    os.replace(dest, old / "d")
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old / "d", dest)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside ``dest`` that replaces ``dest`` when the block ends.

    Write the output's files into the yielded directory. When the ``with`` block finishes
    without an exception, it replaces ``dest`` through :func:`replace_dir` (an existing
    ``dest`` is kept until the new one is in place); on an exception the temporary directory
    is removed and ``dest`` is left as it was. ``dest``'s parent is created if needed.

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_dir(d) as tmp:
        ...     _ = (tmp / "a.txt").write_text("new")
        >>> (d / "a.txt").read_text()
        'new'
        >>> with atomic_dir(d) as tmp:  # replaces the whole directory
        ...     _ = (tmp / "b.txt").write_text("newer")
        >>> sorted(p.name for p in d.parent.iterdir()), sorted(p.name for p in d.iterdir())
        (['out'], ['b.txt'])
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(dest)
    try:
        yield tmp
        replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
