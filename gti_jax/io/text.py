"""Reading the user's text files: UTF-8, one record a line, errors naming the file and line."""

from __future__ import annotations

import os

from gti_jax.errors import BadInput

__all__ = ["NotUtf8Error", "read_utf8_lines"]


class NotUtf8Error(BadInput):
    """A text file that is not UTF-8 (the message names the file, the line and the byte)."""


def read_utf8_lines(path: str | os.PathLike[str], what: str = "text") -> list[str]:
    """The lines of a UTF-8 file, without their line breaks.

    Args:
        path: the file (it must exist).
        what: what the file holds, for the message (``"tokens"``, ``"examples"``, ...).

    Returns:
        The lines, as ``str.splitlines`` gives them.

    Raises:
        NotUtf8Error: a byte sequence that is not UTF-8; the message is
            ``file:line: ... not UTF-8 (byte 0xff at column 1); save it as UTF-8``.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
        >>> _ = p.write_bytes(b"ok\\n\\xffbad\\n")
        >>> read_utf8_lines(p, "tokens")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gti_jax.io.text.NotUtf8Error: .../t.txt:2: tokens file is not UTF-8 (byte 0xff at column 1); save it as UTF-8
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise NotUtf8Error(
            f"{path}:{line}: {what} file is not UTF-8 (byte 0x{data[e.start]:02x} at column "
            f"{column}); save it as UTF-8"
        ) from None
    if text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    return text.splitlines()
