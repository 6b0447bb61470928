"""Initializers for the new rows of a vocabulary-shaped table.

An initializer is a pure function ``init(key, ctx) -> [N_new, D]`` (float32) where ``ctx`` is
an :class:`InitContext` holding the existing rows. Factories named after the method build
them, optax style::

    init = mean_cov(scale=1.0)
    rows = init(jax.random.key(0), InitContext(old=table[:num_tokens], num_new=8))

Built-ins:

* ``mean``: every new row is the mean of the old rows (the common practice, and the paper's
  baseline: all new tokens start at one point).
* ``mean_noise``: the mean plus isotropic Gaussian noise (LlamaFactory's noisy mean).
* ``mean_cov``: samples from ``N(mean, scale * Cov(old rows))`` (Hewitt, 2021). Hugging Face
  ``resize_token_embeddings`` uses ``scale=1e-9``, which is the mean in all but name; our
  default ``scale=1.0`` draws rows spread like the real ones.
* ``normal``: ``N(0, std^2)`` entries, ``std`` defaulting to the old entries' own std.
* ``description``: each new row is the mean of the rows of the subword tokens of its text
  description (LlamaFactory, NVIDIA's tokenizer-extension tool).

A user may pass any callable with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "InitContext",
    "Initializer",
    "mean",
    "mean_noise",
    "mean_cov",
    "normal",
    "description",
    "INITIALIZERS",
    "get_initializer",
]


class InitContext(NamedTuple):
    """What an initializer may look at.

    Attributes:
      old: ``[N_old, D]`` the rows of the tokens the tokenizer already has (spare padding rows
        excluded), float32.
      num_new: how many rows to make.
      description_ids: ``[N_new, L]`` int32 token ids of each new token's description, padded
        with ``-1``; ``None`` when no descriptions were given.
    """

    old: jax.Array
    num_new: int
    description_ids: jax.Array | None = None


Initializer = Callable[[jax.Array, InitContext], jax.Array]


def _mean_row(old: jax.Array) -> jax.Array:
    return jnp.mean(old.astype(jnp.float32), axis=0)


def mean() -> Initializer:
    """Every new row is the mean of the old rows.

    >>> import jax, jax.numpy as jnp
    >>> old = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> mean()(jax.random.key(0), InitContext(old, 2)).tolist()
    [[2.0, 4.0], [2.0, 4.0]]
    """

    def init(key, ctx: InitContext) -> jax.Array:
        del key
        m = _mean_row(ctx.old)
        return jnp.broadcast_to(m, (ctx.num_new, m.shape[0]))

    return init


def mean_noise(std: float | None = None) -> Initializer:
    """The mean of the old rows plus ``N(0, std^2)`` noise on every entry.

    Args:
      std: noise scale; ``None`` uses ``1 / sqrt(D)`` as LlamaFactory does.

    >>> import jax, jax.numpy as jnp
    >>> rows = mean_noise(std=0.5)(jax.random.key(0), InitContext(jnp.zeros((4, 3)), 2))
    >>> rows.shape
    (2, 3)
    """

    def init(key, ctx: InitContext) -> jax.Array:
        m = _mean_row(ctx.old)
        s = (1.0 / m.shape[0] ** 0.5) if std is None else std
        return m + s * jax.random.normal(key, (ctx.num_new, m.shape[0]), jnp.float32)

    return init


def mean_cov(scale: float = 1.0, *, hf_compat: bool = False) -> Initializer:
    """Samples new rows from ``N(mean, scale * Cov)`` of the old rows.

    The covariance is the population covariance ``Xc^T Xc / N`` of the old rows (as Hugging
    Face computes it), factorized by a symmetric eigendecomposition with negative eigenvalues
    clipped to zero, so singular or nearly singular covariances (common: ``N`` may be smaller
    than ``D`` in tests, and real tables are often low-rank) are handled without jitter or
    fallbacks.

    Args:
      scale: multiplies the covariance. ``1.0`` (default) draws rows spread like the old
        ones.
      hf_compat: use Hugging Face's ``1e-9`` scale instead (``scale`` is then ignored); the
        result is the mean to within ~1e-4 of the rows' spread.

    >>> import jax, jax.numpy as jnp
    >>> old = jax.random.normal(jax.random.key(1), (1000, 4))
    >>> mean_cov()(jax.random.key(0), InitContext(old, 3)).shape
    (3, 4)
    """
    s = 1e-9 if hf_compat else float(scale)
    if s < 0:
        raise ValueError(f"mean_cov scale must be >= 0, got {scale}")

    def init(key, ctx: InitContext) -> jax.Array:
        x = ctx.old.astype(jnp.float32)
        n = x.shape[0]
        m = jnp.mean(x, axis=0)
        # X^T X - n m m^T avoids materializing the centered copy of a [V, D] table; the
        # rows' mean is small next to their spread, so no precision is lost in f32.
        gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
        cov = gram / n - jnp.outer(m, m)
        cov = 0.5 * (cov + cov.T)
        w, v = jnp.linalg.eigh(cov)
        # Eigenvalues below the factorization's own round-off are zero directions of a
        # singular covariance, not variance: drop them rather than sample float noise.
        floor = jnp.max(jnp.abs(w)) * w.shape[0] * jnp.finfo(jnp.float32).eps
        factor = v * jnp.sqrt(jnp.where(w > floor, w, 0.0) * s)[None, :]
        z = jax.random.normal(key, (ctx.num_new, m.shape[0]), jnp.float32)
        return m + z @ factor.T

    return init


def normal(std: float | None = None) -> Initializer:
    """Every entry drawn from ``N(0, std^2)``.

    Args:
      std: ``None`` uses the standard deviation of the old entries.

    >>> import jax, jax.numpy as jnp
    >>> normal(std=0.02)(jax.random.key(0), InitContext(jnp.zeros((4, 3)), 5)).shape
    (5, 3)
    """

    def init(key, ctx: InitContext) -> jax.Array:
        d = ctx.old.shape[1]
        s = jnp.std(ctx.old.astype(jnp.float32)) if std is None else std
        return s * jax.random.normal(key, (ctx.num_new, d), jnp.float32)

    return init


def description() -> Initializer:
    """Each new row is the mean of the old rows of its description's subword tokens.

    Needs ``ctx.description_ids`` (``[N_new, L]``, ``-1`` padded); every new token must have
    at least one description token (checked before any work by :func:`resize_vocab`).

    >>> import jax, jax.numpy as jnp
    >>> old = jnp.array([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]])
    >>> ids = jnp.array([[0, 1], [2, -1]])
    >>> description()(jax.random.key(0), InitContext(old, 2, ids)).tolist()
    [[0.5, 0.5], [4.0, 4.0]]
    """

    def init(key, ctx: InitContext) -> jax.Array:
        del key
        if ctx.description_ids is None:
            raise ValueError(
                "the 'description' initializer needs a description for every new token"
            )
        ids = ctx.description_ids
        valid = (ids >= 0).astype(jnp.float32)
        rows = jnp.take(ctx.old.astype(jnp.float32), jnp.maximum(ids, 0), axis=0)
        total = jnp.einsum("nl,nld->nd", valid, rows, precision=jax.lax.Precision.HIGHEST)
        return total / jnp.maximum(valid.sum(axis=1, keepdims=True), 1.0)

    return init


INITIALIZERS: dict[str, Callable[..., Initializer]] = {
    "mean": mean,
    "mean_noise": mean_noise,
    "mean_cov": mean_cov,
    "normal": normal,
    "description": description,
}


def get_initializer(init: str | Initializer, **kwargs) -> Initializer:
    """Returns an initializer by name (with factory keyword arguments) or passes one through.

    Args:
      init: a name in :data:`INITIALIZERS` or a callable ``(key, InitContext) -> [N_new, D]``.
      **kwargs: arguments of the named factory (e.g. ``std=0.01`` for ``normal``).

    Raises:
      ValueError: unknown name, or arguments the factory does not take.
    """
    if callable(init):
        if kwargs:
            raise ValueError(
                "initializer arguments apply to named initializers only; bind them in your callable"
            )
        return init
    if init not in INITIALIZERS:
        raise ValueError(
            f"unknown initializer {init!r}; choose one of {', '.join(INITIALIZERS)} or pass a callable"
        )
    try:
        return INITIALIZERS[init](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for initializer {init!r}: {e}") from None
