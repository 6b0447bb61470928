"""The error classes of gti_jax: one base, with a "bad input" and a "failed run" branch.

Callers (and the command lines' exit codes) tell the two apart by type, never by message:

* :class:`BadInput`: what the checks before any heavy work reject (a missing or malformed
  file, a config key out of range, a checkpoint whose ``config.json`` contradicts its
  tensors). Nothing has been written yet; the message is one line naming the problem and the
  fix. It is a ``ValueError``, so ``except ValueError`` keeps working.
* :class:`RunFailed`: a run that started and then could not finish (a non-finite loss, a
  full disk, a bug). What the run wrote so far is kept; re-running resumes.

Example:
    >>> try:
    ...     raise BadInput("data.tokens=x.jsonl: file not found; fix the path")
    ... except GtiError as e:
    ...     isinstance(e, ValueError), isinstance(e, RunFailed)
    (True, False)
"""

from __future__ import annotations

__all__ = ["BadInput", "CheckpointError", "ConfigError", "GtiError", "RunFailed"]


class GtiError(Exception):
    """Any error gti_jax raises on purpose (its message is one line meant for the user)."""


class BadInput(GtiError, ValueError):
    """An input rejected before any heavy work or output: a file, a config value, a model."""


class RunFailed(GtiError):
    """A run that started could not finish; everything it wrote so far is kept."""


class ConfigError(BadInput):
    """A configuration problem (a run's config keys, or a model's ``config.json``), reported
    as one line naming the key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or grounded-rows file cannot be written or read as asked (one line
    naming the fix). Raised by :mod:`gti_jax.train.checkpoint` and :mod:`gti_jax.io.rows`."""
