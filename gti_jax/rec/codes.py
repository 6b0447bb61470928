"""Semantic-ID code tokens: ``<b_7>`` is code 7 at level 1 (``a`` -> level 0, ``b`` -> 1, ...).

The one home of the token format, shared by the prompt writer (:mod:`gti_jax.rec.prompts`)
and the diagnostics recorder (:mod:`gti_jax.diagnose`); it imports neither jax nor a model.

Example:
    >>> code_token(1, 7), parse_code_token("<b_7>")
    ('<b_7>', (1, 7))
"""

from __future__ import annotations

import re
import string

from gti_jax.rec.data import RecDataError

__all__ = ["LEVEL_LETTERS", "code_token", "parse_code_token"]

#: The letter of each level, in order; at most 26 levels.
LEVEL_LETTERS = string.ascii_lowercase

_CODE_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def code_token(level: int, code: int) -> str:
    """Returns the token of one code at one level.

    Args:
      level: 0-based level (0 -> ``a``, 1 -> ``b``, ...; at most 26 levels).
      code: the code at that level, ``>= 0``.

    Returns:
      The token string.

    >>> code_token(2, 201)
    '<c_201>'
    """
    if not 0 <= level < len(LEVEL_LETTERS):
        raise RecDataError(f"level {level} out of range [0, {len(LEVEL_LETTERS)})")
    if code < 0:
        raise RecDataError(f"code must be >= 0, got {code}")
    return f"<{LEVEL_LETTERS[level]}_{int(code)}>"


def parse_code_token(token: str) -> tuple[int, int] | None:
    """``"<b_7>"`` -> ``(1, 7)``, the inverse of :func:`code_token`; None for anything else.

    >>> parse_code_token("<a_12>"), parse_code_token("<a_12><b_3>"), parse_code_token("x")
    ((0, 12), None, None)
    """
    m = _CODE_TOKEN.fullmatch(token)
    return None if m is None else (LEVEL_LETTERS.index(m.group(1)), int(m.group(2)))
