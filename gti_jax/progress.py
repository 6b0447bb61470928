"""Progress with an ETA for long loops (evaluation, item embedding), on stderr.

On a terminal the bar is tqdm's, redrawn in place and cleared when the loop ends. Anywhere
else (CI logs, a file, a job scheduler) nothing is redrawn: one plain line is printed every
``every_s`` seconds and one when the loop ends, so a log shows that a run that takes hours
is moving, and how long it still needs, without a line per batch.

Example:
  >>> import io
  >>> out = io.StringIO()
  >>> list(progress(range(3), total=3, desc="eval", file=out))
  [0, 1, 2]
  >>> out.getvalue().startswith("[gti_jax] eval: 3/3")
  True
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["batches", "progress"]

T = TypeVar("T")


def _line(desc: str, done: int, total: int, unit: str, elapsed: float) -> str:
    eta = elapsed / max(done, 1) * max(total - done, 0)
    return f"[gti_jax] {desc}: {done}/{total} {unit}, elapsed {elapsed:.0f}s, ETA {eta:.0f}s"


def progress(
    iterable: Iterable[T],
    *,
    total: int,
    desc: str,
    unit: str = "batches",
    every_s: float = 30.0,
    enabled: bool = True,
    file: TextIO | None = None,
) -> Iterator[T]:
    """Yields the items of `iterable`, reporting how many of `total` are done and the ETA.

    Args:
      iterable: the loop's items.
      total: how many items there are (the ETA's denominator).
      desc: what the loop does, e.g. ``"beam search"``.
      unit: what the items are, for the lines (``"batches"``, ``"items"``).
      every_s: off a terminal, seconds between two progress lines (the last line is always
        printed).
      enabled: False yields the items silently (other processes of a multi-host run).
      file: where to write; default ``sys.stderr``.
    """
    out = sys.stderr if file is None else file
    if not enabled or total <= 0:
        yield from iterable
        return
    if getattr(out, "isatty", lambda: False)():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=out, leave=False)
        return
    t0 = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if done == total or now - last >= every_s:
            last = now
            print(_line(desc, done, total, unit, now - t0), file=out, flush=True)


def batches(n: int, size: int, **kwargs: Any) -> Iterator[int]:
    """The start offsets ``0, size, 2 size, ...`` below `n`, with :func:`progress`.

    >>> list(batches(5, 2, desc="x", enabled=False))
    [0, 2, 4]
    """
    return progress(range(0, n, size), total=-(-n // size), **kwargs)
