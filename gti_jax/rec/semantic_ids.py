"""Semantic IDs for generative recommendation: RQ-KMeans, RQ-VAE and collision resolution.

An item's semantic ID is a short tuple of codes ``(c_1, ..., c_L)``, one per level of a
residual quantizer: level ``l`` quantizes what the previous levels left unexplained, so items
that share a prefix are similar. Each code becomes one new token (``<a_12><b_7><c_201>``).

Two quantizers are provided:

* :func:`rq_kmeans`: residual k-means (GRID, OneRec-style systems): k-means++ seeding, Lloyd
  iterations in a ``lax.while_loop``, empty clusters re-seeded from the farthest points.
* :func:`rq_vae`: an MLP auto-encoder with a residual vector quantizer in its latent space
  (TIGER, LC-Rec and the GTI paper), straight-through gradients, codebooks seeded by k-means on
  the first batch, and balanced (Sinkhorn-Knopp) assignment on the last level at inference.

Both end with :func:`resolve_collisions` so every item gets a unique ID, and both return a
:class:`SemanticIds`. Everything is deterministic given the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gti_jax.io.atomic import atomic_dir
from gti_jax.rec.codes import LEVEL_LETTERS, parse_code_token
from gti_jax.rec.data import RecDataError

__all__ = [
    "SemanticIds",
    "collision_stats",
    "import_semantic_ids",
    "item_embeddings_from_npy",
    "kmeans",
    "kmeans_plus_plus",
    "load_semantic_ids",
    "resolve_collisions",
    "rq_kmeans",
    "rq_vae",
    "save_semantic_ids",
    "sinkhorn_assign",
]

_RESOLVE_METHODS = ("extra_level", "last_level_balance")
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The result type
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticIds:
    """Semantic IDs of ``N`` items and the codebooks that produced them.

    Attributes:
        codes: ``[N, L']`` int32, one row per item; rows are unique once collisions are
            resolved. ``L'`` may exceed the number of quantizer levels by one
            disambiguation level (see :func:`resolve_collisions`).
        codebooks: one ``[K_l, d]`` float32 array per quantizer level (the first
            ``len(codebooks)`` columns of ``codes`` index them). A disambiguation level has no
            codebook.
        codebook_sizes: number of codes per level, ``len == L'`` (the new tokens per level).
        stats: JSON-able diagnostics (``collision_rate``, ``codebook_usage``, ``max_group``
            before resolution, ``levels``, ``codebook_size``, training losses, ...).
    """

    codes: np.ndarray
    codebooks: tuple[np.ndarray, ...]
    codebook_sizes: tuple[int, ...]
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        codes = np.asarray(self.codes)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(
                f"SemanticIds.codes must be a 2-D integer array [N, L], got shape {codes.shape} "
                f"dtype {codes.dtype}; pass one row of codes per item."
            )
        sizes = tuple(int(s) for s in self.codebook_sizes)
        if len(sizes) != codes.shape[1]:
            raise ValueError(
                f"SemanticIds has {codes.shape[1]} code levels but {len(sizes)} codebook sizes; "
                "give one size per column of codes."
            )
        books = tuple(np.asarray(c, dtype=np.float32) for c in self.codebooks)
        if len(books) > len(sizes):
            raise ValueError(
                f"SemanticIds has {len(books)} codebooks for {len(sizes)} levels; "
                "give at most one codebook per level."
            )
        for level, book in enumerate(books):
            if book.ndim != 2 or book.shape[0] != sizes[level]:
                raise ValueError(
                    f"codebook {level} has shape {book.shape}, expected [{sizes[level]}, d]; "
                    "each codebook needs one row per code of its level."
                )
        if codes.size and (codes.min() < 0 or np.any(codes.max(axis=0) >= np.asarray(sizes))):
            raise ValueError(
                f"SemanticIds codes fall outside [0, codebook_size) for sizes {sizes}; "
                "fix the codes or the codebook sizes."
            )
        object.__setattr__(self, "codes", codes.astype(np.int32))
        object.__setattr__(self, "codebooks", books)
        object.__setattr__(self, "codebook_sizes", sizes)

    @property
    def num_levels(self) -> int:
        """Number of code columns ``L'`` (quantizer levels plus any disambiguation level)."""
        return int(self.codes.shape[1])

    @property
    def num_items(self) -> int:
        """Number of items ``N``."""
        return int(self.codes.shape[0])

    def code_vectors(self, ids: np.ndarray | None = None, *, mode: str = "sum") -> np.ndarray:
        """Vectors of items from their codes' codebook rows (for RSA diagnostics).

        Only the quantizer levels (``len(codebooks)`` leading columns) contribute; a
        disambiguation level has no vector, so items that differ only there get equal vectors.

        Args:
            ids: ``[M, L']`` or ``[M, len(codebooks)]`` integer codes; ``None`` uses ``codes``.
            mode: ``"sum"`` (the quantized latent, ``[M, d]``) or ``"concat"``
                (``[M, len(codebooks) * d]``).

        Returns:
            ``[M, d_total]`` float32 array.

        >>> sids = SemanticIds(np.array([[0, 1], [1, 0]]), (np.eye(2), np.eye(2)), (2, 2))
        >>> sids.code_vectors().tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        """
        if mode not in ("sum", "concat"):
            raise ValueError(f"code_vectors mode must be 'sum' or 'concat', got {mode!r}.")
        if not self.codebooks:
            raise ValueError("these SemanticIds have no codebooks, so codes have no vectors.")
        codes = self.codes if ids is None else np.asarray(ids)
        nq = len(self.codebooks)
        if codes.ndim != 2 or codes.shape[1] < nq:
            raise ValueError(
                f"code_vectors needs [M, >= {nq}] codes, got shape {codes.shape}; "
                "pass rows of codes as stored in SemanticIds.codes."
            )
        parts = []
        for level, book in enumerate(self.codebooks):
            col = codes[:, level]
            if col.size and (col.min() < 0 or col.max() >= book.shape[0]):
                raise ValueError(
                    f"codes at level {level} fall outside [0, {book.shape[0]}); "
                    "pass codes produced by these SemanticIds."
                )
            parts.append(book[col])
        if mode == "sum":
            return np.sum(parts, axis=0).astype(np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Small pieces: distances, k-means++, Lloyd, Sinkhorn
# --------------------------------------------------------------------------------------------


def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
    """``[N, K]`` squared Euclidean distances, full-precision matmul, clipped at 0."""
    xx = jnp.sum(x * x, axis=-1, keepdims=True)
    cc = jnp.sum(c * c, axis=-1)
    xc = jnp.matmul(x, c.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(xx - 2.0 * xc + cc[None, :], 0.0)


def _as_key(key: jax.Array | int) -> jax.Array:
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    return key


@functools.partial(jax.jit, static_argnames=("k", "num_trials"))
def _kmeans_pp(x: jax.Array, key: jax.Array, k: int, num_trials: int) -> jax.Array:
    n = x.shape[0]
    key, first_key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, n)
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = _sq_dists(x, x[first][None])[:, 0]

    def body(i, carry):
        centers, d2, key = carry
        key, sub = jax.random.split(key)
        positive = d2 > 0
        logits = jnp.where(positive, jnp.log(jnp.where(positive, d2, 1.0)), -jnp.inf)
        # All points already coincide with a center (fewer distinct points than k): uniform.
        logits = jnp.where(jnp.any(positive), logits, jnp.zeros_like(d2))
        cand = jax.random.categorical(sub, logits, shape=(num_trials,))
        new_d2 = jnp.minimum(d2[None, :], _sq_dists(x[cand], x))  # [T, N]
        best = jnp.argmin(jnp.sum(new_d2, axis=1))
        return centers.at[i].set(x[cand[best]]), new_d2[best], key

    centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2, key))
    return centers


def kmeans_plus_plus(x: jax.Array, k: int, *, key: jax.Array | int) -> jax.Array:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007).

    Each new center is the best (lowest total squared distance) of ``2 + ln k`` candidates
    drawn with probability proportional to the squared distance to the nearest chosen center.

    Args:
        x: ``[N, D]`` points, ``N >= k``.
        k: number of centers.
        key: PRNG key or integer seed.

    Returns:
        ``[k, D]`` centers, each one of the points.

    >>> x = jnp.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
    >>> c = kmeans_plus_plus(x, 2, key=0)
    >>> sorted(int(v) for v in (c[:, 0] > 5))
    [0, 1]
    """
    x = _check_points(x, "kmeans_plus_plus x")
    _check_k(x.shape[0], k)
    return _kmeans_pp(jnp.asarray(x), _as_key(key), int(k), 2 + int(math.log(k)))


@functools.partial(jax.jit, static_argnames=("iters",))
def _lloyd(x: jax.Array, centers: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    n, k = x.shape[0], centers.shape[0]
    ones = jnp.ones((n,), x.dtype)

    def assign(c):
        d = _sq_dists(x, c)
        a = jnp.argmin(d, axis=1)
        return a, jnp.take_along_axis(d, a[:, None], axis=1)[:, 0]

    def update(c):
        a, mind = assign(c)
        sums = jax.ops.segment_sum(x, a, num_segments=k)
        counts = jax.ops.segment_sum(ones, a, num_segments=k)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        empty = counts == 0
        # The j-th empty cluster takes the j-th farthest point from its own center.
        far = jax.lax.top_k(mind, k)[1]
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        return jnp.where(empty[:, None], x[far[rank]], means), a

    def cond(carry):
        _, _, it, changed = carry
        return (it < iters) & changed

    def body(carry):
        c, a_prev, it, _ = carry
        c_new, a = update(c)
        return c_new, a, it + 1, jnp.any(a != a_prev) | (it == 0)

    a0 = jnp.full((n,), -1, jnp.int32)
    centers, _, _, _ = jax.lax.while_loop(cond, body, (centers, a0, 0, jnp.array(True)))
    a, _ = assign(centers)
    return centers, a


def kmeans(
    x: jax.Array, k: int, *, key: jax.Array | int, iters: int = 50
) -> tuple[jax.Array, jax.Array]:
    """k-means: k-means++ seeding then Lloyd iterations, jit-compiled.

    Stops after ``iters`` iterations or when no assignment changes. A cluster that empties is
    re-seeded with the point farthest from its own center (the j-th empty cluster takes the
    j-th farthest point).

    Args:
        x: ``[N, D]`` float points, ``N >= k``.
        k: number of clusters.
        key: PRNG key or integer seed.
        iters: maximum Lloyd iterations.

    Returns:
        ``(centers [k, D], assignment [N] int32)``.

    >>> x = jnp.array([[0.0], [0.2], [5.0], [5.2]])
    >>> c, a = kmeans(x, 2, key=0)
    >>> bool(a[0] == a[1]) and bool(a[2] == a[3]) and bool(a[0] != a[2])
    True
    """
    x = _check_points(x, "kmeans x")
    _check_k(x.shape[0], k)
    if iters < 1:
        raise ValueError(f"kmeans iters must be >= 1, got {iters}.")
    xj = jnp.asarray(x)
    init = _kmeans_pp(xj, _as_key(key), int(k), 2 + int(math.log(k)))
    centers, a = _lloyd(xj, init, int(iters))
    return centers, a.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("iters",))
def _sinkhorn(d: jax.Array, epsilon: float, iters: int) -> jax.Array:
    n, k = d.shape
    scale = jnp.maximum(jnp.std(d), 1e-12)
    logits = -(d - jnp.mean(d)) / (scale * epsilon)

    def body(_, carry):
        log_u, log_v = carry
        log_v = -jnp.log(k) - jax.nn.logsumexp(logits + log_u[:, None], axis=0)
        log_u = -jnp.log(n) - jax.nn.logsumexp(logits + log_v[None, :], axis=1)
        return log_u, log_v

    log_u, log_v = jax.lax.fori_loop(0, iters, body, (jnp.zeros((n,)), jnp.zeros((k,))))
    return jnp.argmax(logits + log_v[None, :], axis=1).astype(jnp.int32)


def sinkhorn_assign(distances: jax.Array, *, epsilon: float = 0.05, iters: int = 100) -> jax.Array:
    """Balanced assignment of ``N`` points to ``K`` codes by Sinkhorn-Knopp.

    Solves entropic optimal transport with uniform marginals (each point mass ``1/N``, each
    code ``1/K``) in the log domain on distances standardized to unit spread, then gives each
    point its most probable code. Lower ``epsilon`` -> closer to the exact balanced assignment.

    Args:
        distances: ``[N, K]`` costs (e.g. squared distances to codebook rows).
        epsilon: entropic regularization, relative to the spread of ``distances``.
        iters: Sinkhorn iterations.

    Returns:
        ``[N]`` int32 code per point.

    >>> d = jnp.array([[0.0, 1.0], [0.0, 1.1], [0.0, 1.2], [0.0, 1.3]])
    >>> sorted(np.bincount(np.asarray(sinkhorn_assign(d)), minlength=2).tolist())
    [2, 2]
    """
    d = jnp.asarray(distances, jnp.float32)
    if d.ndim != 2:
        raise ValueError(f"sinkhorn_assign needs [N, K] distances, got shape {d.shape}.")
    if epsilon <= 0 or iters < 1:
        raise ValueError(
            f"sinkhorn_assign needs epsilon > 0 and iters >= 1, got {epsilon}, {iters}."
        )
    return _sinkhorn(d, float(epsilon), int(iters))


# --------------------------------------------------------------------------------------------
# Collisions
# --------------------------------------------------------------------------------------------


def _check_codes(codes: Any) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"codes must be a non-empty 2-D integer array [N, L], got shape {arr.shape}; "
            "pass one row of codes per item."
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {arr.dtype}.")
    if arr.min() < 0:
        raise ValueError("codes must be >= 0; negative codes are not valid indices.")
    return arr.astype(np.int64)


def _group_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse index (group id per row) and group sizes of identical rows."""
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_stats(
    codes: np.ndarray, codebook_sizes: Sequence[int] | None = None
) -> dict[str, Any]:
    """Collision and codebook-usage statistics of a code table.

    Args:
        codes: ``[N, L]`` non-negative integer codes.
        codebook_sizes: codes per level (default: ``max + 1`` of each column).

    Returns:
        ``collision_rate`` (share of items whose full code is shared with another item),
        ``codebook_usage`` (per level, fraction of codes used), ``max_group`` (largest set of
        items with one code), ``num_unique`` (distinct code rows) and ``num_items``.

    >>> collision_stats(np.array([[0, 1], [0, 1], [1, 0], [1, 1]]), [2, 2])["collision_rate"]
    0.5
    """
    arr = _check_codes(codes)
    n, num_levels = arr.shape
    if codebook_sizes is None:
        sizes = [int(arr[:, lvl].max()) + 1 for lvl in range(num_levels)]
    else:
        sizes = [int(s) for s in codebook_sizes]
        if len(sizes) != num_levels:
            raise ValueError(
                f"collision_stats got {len(sizes)} codebook sizes for {num_levels} levels."
            )
        if any(int(arr[:, lvl].max()) >= sizes[lvl] for lvl in range(num_levels)):
            raise ValueError(f"codes exceed the codebook sizes {sizes}; fix the sizes.")
    inverse, counts = _group_rows(arr)
    usage = [len(np.unique(arr[:, lvl])) / sizes[lvl] for lvl in range(num_levels)]
    return {
        "num_items": int(n),
        "num_unique": int(len(counts)),
        "collision_rate": float(np.mean(counts[inverse] > 1)),
        "codebook_usage": [float(u) for u in usage],
        "max_group": int(counts.max()),
    }


def resolve_collisions(
    codes: np.ndarray,
    *,
    method: str = "extra_level",
    codebook_sizes: Sequence[int] | None = None,
    last_level_distances: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Make every item's code row unique.

    Methods:

    * ``"extra_level"`` (the default, also in :func:`rq_kmeans` and :func:`rq_vae`): append
      one disambiguation level numbering the items of each colliding group ``0, 1, 2, ...``
      in item order (items without collision get ``0``). Its codebook size is the largest
      group. Never fails and never changes the learned codes. Added only when some collide.
    * ``"last_level_balance"``: within each group of items sharing the first ``L - 1`` codes,
      keep the first item on each last-level code and move the others to free last-level
      codes (the nearest by ``last_level_distances`` if given, else the lowest free code).
      Keeps ``L`` levels; fails when a prefix group has more items than last-level codes.

    Args:
        codes: ``[N, L]`` non-negative integer codes.
        method: ``"extra_level"`` or ``"last_level_balance"``.
        codebook_sizes: codes per level (default: ``max + 1`` of each column).
        last_level_distances: optional ``[N, K_L]`` distances of each item to the last
            level's codes, used by ``"last_level_balance"``.

    Returns:
        ``(codes [N, L'] int32 with unique rows, stats)``; ``stats`` holds
        :func:`collision_stats` before resolution plus ``method``, ``codebook_sizes`` (after)
        and ``extra_level`` (whether a level was appended).

    >>> new, st = resolve_collisions(np.array([[0, 1], [0, 1], [1, 0]]))
    >>> new.tolist(), st["codebook_sizes"]
    ([[0, 1, 0], [0, 1, 1], [1, 0, 0]], [2, 2, 2])
    """
    if method not in _RESOLVE_METHODS:
        raise ValueError(
            f"resolve_collisions method must be one of {_RESOLVE_METHODS}, got {method!r}."
        )
    arr = _check_codes(codes)
    n, num_levels = arr.shape
    stats = collision_stats(arr, codebook_sizes)
    sizes = (
        [int(s) for s in codebook_sizes]
        if codebook_sizes is not None
        else [int(arr[:, lvl].max()) + 1 for lvl in range(num_levels)]
    )
    stats["method"] = method
    stats["extra_level"] = False
    if stats["max_group"] == 1:
        stats["codebook_sizes"] = sizes
        return arr.astype(np.int32), stats

    if method == "extra_level":
        inverse, counts = _group_rows(arr)
        order = np.argsort(inverse, kind="stable")
        sorted_groups = inverse[order]
        starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - starts
        stats["extra_level"] = True
        stats["codebook_sizes"] = sizes + [int(counts.max())]
        return np.concatenate([arr, rank[:, None]], axis=1).astype(np.int32), stats

    k_last = sizes[-1]
    if last_level_distances is not None:
        dist = np.asarray(last_level_distances, np.float64)
        if dist.shape != (n, k_last):
            raise ValueError(
                f"last_level_distances has shape {dist.shape}, expected [{n}, {k_last}]."
            )
    prefix = arr[:, :-1] if num_levels > 1 else np.zeros((n, 1), np.int64)
    p_inverse, p_counts = _group_rows(prefix)
    if p_counts.max() > k_last:
        raise ValueError(
            f"{int(p_counts.max())} items share their first {num_levels - 1} code(s) but the last "
            f"level has only {k_last} codes; use method='extra_level' or a larger codebook."
        )
    out = arr.copy()
    f_inverse, f_counts = _group_rows(arr)
    collided_prefixes = np.unique(p_inverse[f_counts[f_inverse] > 1])
    for g in collided_prefixes:
        members = np.flatnonzero(p_inverse == g)
        taken: set[int] = set()
        movers = []
        for i in members:
            c = int(out[i, -1])
            if c in taken:
                movers.append(i)
            else:
                taken.add(c)
        free = np.array(sorted(set(range(k_last)) - taken), np.int64)
        for i in movers:
            j = int(np.argmin(dist[i, free])) if last_level_distances is not None else 0
            out[i, -1] = free[j]
            free = np.delete(free, j)
    stats["codebook_sizes"] = sizes
    return out.astype(np.int32), stats


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_points(x: Any, what: str) -> np.ndarray | jax.Array:
    shape = getattr(x, "shape", None)
    if shape is None:
        x = np.asarray(x)
        shape = x.shape
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array [N, D], got shape {tuple(shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = np.asarray(x, np.float32)
    return x


def _check_k(n: int, k: int) -> None:
    if k < 1 or k > n:
        raise ValueError(f"codebook size {k} must be in [1, N={n}]; use fewer codes or more items.")


def _check_common(x: Any, num_levels: int, codebook_size: int, resolve: str | None) -> np.ndarray:
    arr = np.asarray(x, np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"item embeddings must be a non-empty 2-D array [N, D], got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("item embeddings contain NaN or inf; clean them before quantizing.")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
    _check_k(arr.shape[0], codebook_size)
    if resolve is not None and resolve not in _RESOLVE_METHODS:
        raise ValueError(f"resolve must be None or one of {_RESOLVE_METHODS}, got {resolve!r}.")
    return arr


def _finish(
    codes: np.ndarray,
    codebooks: list[np.ndarray],
    codebook_size: int,
    resolve: str | None,
    last_dist: np.ndarray,
    extra: dict[str, Any],
) -> SemanticIds:
    num_levels = codes.shape[1]
    sizes = [codebook_size] * num_levels
    if resolve is None:
        stats = collision_stats(codes, sizes)
        stats.update(method=None, extra_level=False, codebook_sizes=sizes)
        new = codes.astype(np.int32)
    else:
        new, stats = resolve_collisions(
            codes, method=resolve, codebook_sizes=sizes, last_level_distances=last_dist
        )
    stats["resolution"] = stats.pop("method")
    stats.update(levels=int(new.shape[1]), codebook_size=int(codebook_size), **extra)
    return SemanticIds(new, tuple(codebooks), tuple(stats["codebook_sizes"]), stats)


# --------------------------------------------------------------------------------------------
# RQ-KMeans
# --------------------------------------------------------------------------------------------


def rq_kmeans(
    x: Any,
    *,
    num_levels: int,
    codebook_size: int,
    key: jax.Array | int,
    iters: int = 50,
    normalize: bool = True,
    resolve: str | None = "extra_level",
) -> SemanticIds:
    """Residual k-means semantic IDs.

    Level ``l`` runs :func:`kmeans` on the residual left by levels ``< l`` and subtracts the
    chosen centers. Typical real-data setting: 3-4 levels of 256 codes.

    Args:
        x: ``[N, D]`` item embeddings.
        num_levels: quantizer levels ``L``.
        codebook_size: codes per level ``K`` (``<= N``).
        key: PRNG key or integer seed; the same key gives the same codes.
        iters: maximum Lloyd iterations per level.
        normalize: L2-normalize each embedding first (text embeddings compare by cosine).
        resolve: collision resolution (see :func:`resolve_collisions`), or ``None`` to keep
            colliding codes.

    Returns:
        :class:`SemanticIds` with ``L`` codebooks ``[K, D]``.

    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    >>> sids = rq_kmeans(x, num_levels=2, codebook_size=4, key=0)
    >>> len(np.unique(sids.codes, axis=0))
    64
    """
    arr = _check_common(x, num_levels, codebook_size, resolve)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}.")
    xj = jnp.asarray(arr)
    if normalize:
        xj = xj / jnp.maximum(jnp.linalg.norm(xj, axis=1, keepdims=True), 1e-12)
    residual = xj
    keys = jax.random.split(_as_key(key), num_levels)
    codes, books = [], []
    for level in range(num_levels):
        centers, a = kmeans(residual, codebook_size, key=keys[level], iters=iters)
        codes.append(np.asarray(a))
        books.append(np.asarray(centers, np.float32))
        if level == num_levels - 1:
            last_dist = np.asarray(_sq_dists(residual, centers))
        residual = residual - centers[a]
    err = float(jnp.mean(jnp.sum(residual**2, axis=1)))
    return _finish(
        np.stack(codes, axis=1),
        books,
        codebook_size,
        resolve,
        last_dist,
        {"method": "rq_kmeans", "quantization_error": err, "normalize": bool(normalize)},
    )


# --------------------------------------------------------------------------------------------
# RQ-VAE
# --------------------------------------------------------------------------------------------


def _init_mlp(key: jax.Array, dims: Sequence[int]) -> list[dict[str, jax.Array]]:
    init = jax.nn.initializers.he_normal()
    keys = jax.random.split(key, len(dims) - 1)
    return [
        {"w": init(keys[i], (dims[i], dims[i + 1]), jnp.float32), "b": jnp.zeros((dims[i + 1],))}
        for i in range(len(dims) - 1)
    ]


def _mlp(layers, h, key, dropout: float, train: bool):
    """ReLU MLP; dropout before each linear layer while training; no activation at the end."""
    for i, layer in enumerate(layers):
        if train and dropout > 0:
            key, sub = jax.random.split(key)
            keep = jax.random.bernoulli(sub, 1.0 - dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0.0)
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def _quantize(z: jax.Array, codebooks: jax.Array):
    """Residual quantization of ``z [B, d]`` with ``codebooks [L, K, d]``.

    Returns ``(z_q straight-through [B, d], codes [B, L], codebook_loss, commitment_loss,
    residuals [L, B, d] (input of each level), last-level distances [B, K])``, losses averaged
    over levels.
    """
    residual = z
    quantized = jnp.zeros_like(z)
    codes, residuals, cb_loss, commit = [], [], 0.0, 0.0
    dist = None
    for level in range(codebooks.shape[0]):
        residuals.append(residual)
        dist = _sq_dists(residual, codebooks[level])
        a = jnp.argmin(dist, axis=1)
        q = codebooks[level][a]
        cb_loss += jnp.mean((jax.lax.stop_gradient(residual) - q) ** 2)
        commit += jnp.mean((residual - jax.lax.stop_gradient(q)) ** 2)
        quantized = quantized + q
        residual = residual - jax.lax.stop_gradient(q)
        codes.append(a)
    num_levels = codebooks.shape[0]
    z_q = z + jax.lax.stop_gradient(quantized - z)
    stacked = jnp.stack(residuals)
    return z_q, jnp.stack(codes, 1), cb_loss / num_levels, commit / num_levels, stacked, dist


@functools.partial(
    jax.jit,
    static_argnames=("steps", "batch", "lr", "commitment", "dropout", "restart_every"),
)
def _train_rq_vae(params, x, key, *, steps, batch, lr, commitment, dropout, restart_every):
    """Adam on the RQ-VAE loss for ``steps`` minibatches in one ``lax.scan``.

    Every ``restart_every`` steps (0: never), codes no batch used since the last restart are
    moved onto random residuals of the current batch (dead-code restart).
    """
    n = x.shape[0]
    num_levels, k, _ = params["codebooks"].shape
    tx = optax.adam(lr)

    def loss_fn(p, xb, key):
        k_e, k_d = jax.random.split(key)
        z = _mlp(p["enc"], xb, k_e, dropout, True)
        z_q, codes, cb_loss, commit, residuals, _ = _quantize(z, p["codebooks"])
        recon = jnp.mean((_mlp(p["dec"], z_q, k_d, dropout, True) - xb) ** 2)
        aux = (jnp.stack([recon, cb_loss, commit]), codes, jax.lax.stop_gradient(residuals))
        return recon + cb_loss + commitment * commit, aux

    def step(carry, inp):
        p, s, counts = carry
        key, i = inp
        k_b, k_l, k_r = jax.random.split(key, 3)
        idx = jax.random.randint(k_b, (batch,), 0, n)
        grads, (losses, codes, residuals) = jax.grad(loss_fn, has_aux=True)(p, x[idx], k_l)
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        counts = counts + jax.vmap(lambda c: jnp.bincount(c, length=k))(codes.T)
        if restart_every > 0:
            restart = (i + 1) % restart_every == 0
            dead = restart & (counts == 0)  # [L, K]
            pick = jax.random.randint(k_r, (num_levels, k), 0, batch)
            fresh = jnp.take_along_axis(residuals, pick[..., None], axis=1)  # [L, K, d]
            p = {**p, "codebooks": jnp.where(dead[..., None], fresh, p["codebooks"])}
            counts = jnp.where(restart, 0, counts)
        return (p, s, counts), losses

    carry = (params, tx.init(params), jnp.zeros((num_levels, k), jnp.int32))
    xs = (jax.random.split(key, steps), jnp.arange(steps))
    (params, _, _), hist = jax.lax.scan(step, carry, xs)
    return params, hist


@jax.jit
def _encode_rq_vae(params, x):
    z = _mlp(params["enc"], x, None, 0.0, False)
    _, codes, _, _, _, last_dist = _quantize(z, params["codebooks"])
    return codes, last_dist


def _check_rq_vae_args(steps, lr, batch_size, latent_dim, dropout, dead_code_restart, hidden):
    if steps < 0 or lr <= 0 or batch_size < 1 or latent_dim < 1 or not 0 <= dropout < 1:
        raise ValueError(
            f"rq_vae needs steps >= 0, lr > 0, batch_size >= 1, latent_dim >= 1 and "
            f"0 <= dropout < 1; got {steps}, {lr}, {batch_size}, {latent_dim}, {dropout}."
        )
    if dead_code_restart < 0:
        raise ValueError(f"dead_code_restart must be >= 0, got {dead_code_restart}.")
    if any(h < 1 for h in hidden):
        raise ValueError(f"rq_vae hidden widths must be >= 1, got {tuple(hidden)}.")


def _init_rq_vae(
    keys,
    xj,
    widths: list[int],
    *,
    init_count: int,
    num_levels: int,
    codebook_size: int,
    kmeans_iters: int,
) -> dict[str, Any]:
    """RQ-VAE's initial parameters: MLP encoder (``widths``) and its mirror as decoder, and
    codebooks ``[L, K, d]`` from k-means, level by level, on the residuals of ``init_count``
    random items (``keys``: encoder, decoder, item choice, k-means)."""
    k_enc, k_dec, k_init, k_cb = keys
    params = {
        "enc": _init_mlp(k_enc, widths),
        "dec": _init_mlp(k_dec, widths[::-1]),
    }
    init_idx = jax.random.permutation(k_init, xj.shape[0])[:init_count]
    residual = _mlp(params["enc"], xj[init_idx], None, 0.0, False)
    books = []
    for level_key in jax.random.split(k_cb, num_levels):
        centers, a = kmeans(residual, codebook_size, key=level_key, iters=kmeans_iters)
        books.append(centers)
        residual = residual - centers[a]
    params["codebooks"] = jnp.stack(books)
    return params


def _fit_rq_vae(
    xj,
    key,
    *,
    widths: list[int],
    num_levels: int,
    codebook_size: int,
    kmeans_iters: int,
    steps: int,
    batch: int,
    lr: float,
    commitment: float,
    dropout: float,
    restart_every: int,
) -> tuple[dict[str, Any], dict[str, float]]:
    """:func:`rq_vae`'s parameters, initialized then trained, and its final training losses."""
    n = xj.shape[0]
    *init_keys, k_train = jax.random.split(key, 5)
    params = _init_rq_vae(
        init_keys,
        xj,
        widths,
        init_count=min(max(batch, codebook_size), n),
        num_levels=num_levels,
        codebook_size=codebook_size,
        kmeans_iters=kmeans_iters,
    )
    if steps <= 0:
        return params, {}
    params, hist = _train_rq_vae(
        params,
        xj,
        k_train,
        steps=steps,
        batch=batch,
        lr=lr,
        commitment=commitment,
        dropout=dropout,
        restart_every=restart_every,
    )
    return params, _tail_losses(hist, steps)


def _tail_losses(hist, steps: int) -> dict[str, float]:
    """The mean RQ-VAE losses over the last tenth of training (at least one step)."""
    tail = np.asarray(hist[-max(1, steps // 10) :]).mean(axis=0)
    return {
        "recon_loss": float(tail[0]),
        "codebook_loss": float(tail[1]),
        "commitment_loss": float(tail[2]),
    }


def rq_vae(
    x: Any,
    *,
    num_levels: int = 4,
    codebook_size: int = 256,
    key: jax.Array | int,
    hidden: Sequence[int] = (512, 256),
    latent_dim: int = 32,
    steps: int = 10_000,
    lr: float = 1e-3,
    batch_size: int = 1024,
    commitment: float = 0.25,
    dropout: float = 0.1,
    sinkhorn_last_level: bool = True,
    sinkhorn_epsilon: float = 0.05,
    kmeans_iters: int = 50,
    dead_code_restart: int = 100,
    resolve: str | None = "extra_level",
) -> SemanticIds:
    """RQ-VAE semantic IDs (TIGER / LC-Rec style, the GTI paper's set-up by default).

    An MLP encoder maps ``x`` to a ``latent_dim`` latent; ``num_levels`` codebooks quantize
    it residually; an MLP decoder (the encoder's mirror) reconstructs ``x`` from the quantized
    latent, with straight-through gradients. Loss = MSE reconstruction + mean over levels of
    ``||sg(r_l) - q_l||^2 + commitment * ||r_l - sg(q_l)||^2``, optimized with Adam over
    ``steps`` minibatches drawn with replacement, all in one jit-compiled ``lax.scan``;
    codes left unused for ``dead_code_restart`` steps are re-seeded from batch residuals.
    Codebooks start from k-means on the first batch's residuals (batch of
    ``max(batch_size, codebook_size)`` items, capped at ``N``). At inference (no dropout) the
    last level uses :func:`sinkhorn_assign` for balanced codes when ``sinkhorn_last_level``.

    Defaults follow the paper on 1024-d text embeddings: encoder 1024-512-256 -> 32 latent,
    dropout 0.1, 4 levels x 256 codes.

    Args:
        x: ``[N, D]`` item embeddings.
        num_levels: quantizer levels ``L``.
        codebook_size: codes per level ``K`` (``<= N``).
        key: PRNG key or integer seed; the same key gives the same codes.
        hidden: encoder hidden widths (decoder mirrors them).
        latent_dim: latent and codebook dimension ``d``.
        steps: optimizer steps.
        lr: Adam learning rate.
        batch_size: minibatch size (capped at ``N``).
        commitment: weight ``beta`` of the commitment loss.
        dropout: dropout rate in encoder and decoder during training.
        sinkhorn_last_level: balanced assignment on the last level at inference.
        sinkhorn_epsilon: entropic regularization for that assignment.
        kmeans_iters: Lloyd iterations of the codebook initialization.
        dead_code_restart: every this many steps, codes unused since the last restart move
            onto random residuals of the current batch (0 disables).
        resolve: collision resolution (see :func:`resolve_collisions`) or ``None``.

    Returns:
        :class:`SemanticIds` with ``L`` codebooks ``[K, latent_dim]`` and training losses in
        ``stats``.

    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> sids = rq_vae(x, num_levels=2, codebook_size=4, key=0, hidden=(16,), latent_dim=4,
    ...               steps=20, batch_size=32)
    >>> sids.codes.shape[0], len(np.unique(sids.codes, axis=0))
    (64, 64)
    """
    arr = _check_common(x, num_levels, codebook_size, resolve)
    _check_rq_vae_args(steps, lr, batch_size, latent_dim, dropout, dead_code_restart, hidden)
    xj = jnp.asarray(arr)
    params, losses = _fit_rq_vae(
        xj,
        _as_key(key),
        widths=[arr.shape[1], *hidden, latent_dim],
        num_levels=num_levels,
        codebook_size=codebook_size,
        kmeans_iters=kmeans_iters,
        steps=int(steps),
        batch=min(batch_size, arr.shape[0]),
        lr=float(lr),
        commitment=float(commitment),
        dropout=float(dropout),
        restart_every=int(dead_code_restart),
    )
    codes, last_dist = _encode_rq_vae(params, xj)
    if sinkhorn_last_level:
        codes = codes.at[:, -1].set(sinkhorn_assign(last_dist, epsilon=sinkhorn_epsilon))
    codebooks = [np.asarray(c, np.float32) for c in params["codebooks"]]
    extra = {
        "method": "rq_vae",
        "latent_dim": int(latent_dim),
        "hidden": [int(h) for h in hidden],
        "steps": int(steps),
        "sinkhorn_last_level": bool(sinkhorn_last_level),
        **losses,
    }
    return _finish(
        np.asarray(codes), codebooks, codebook_size, resolve, np.asarray(last_dist), extra
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray | jax.Array):
        return np.asarray(v).tolist()
    return v


def save_semantic_ids(path_dir: str | os.PathLike, sids: SemanticIds) -> Path:
    """Write semantic IDs to a directory, atomically, without pickle.

    Layout: ``codes.npy`` (``[N, L']`` int32), ``codebook_{l}.npy`` (``[K_l, d]`` float32)
    and ``stats.json`` (``codebook_sizes``, ``num_codebooks``, ``stats``). The files are
    written to a temporary sibling directory that then replaces ``path_dir``, so a crash never
    leaves a half-written directory.

    Args:
        path_dir: output directory (replaced if it exists).
        sids: the semantic IDs.

    Returns:
        The directory path.

    >>> import tempfile
    >>> sids = SemanticIds(np.array([[0], [1]]), (np.eye(2),), (2,))
    >>> d = save_semantic_ids(tempfile.mkdtemp() + "/sids", sids)
    >>> load_semantic_ids(d).codes.tolist()
    [[0], [1]]
    """
    if not isinstance(sids, SemanticIds):
        raise TypeError(f"save_semantic_ids needs a SemanticIds, got {type(sids).__name__}.")
    dest = Path(path_dir)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a directory; choose a directory path.")
    with atomic_dir(dest) as tmp:
        np.save(tmp / "codes.npy", sids.codes, allow_pickle=False)
        for level, book in enumerate(sids.codebooks):
            np.save(tmp / f"codebook_{level}.npy", book, allow_pickle=False)
        meta = {
            "format_version": _FORMAT_VERSION,
            "codebook_sizes": list(sids.codebook_sizes),
            "num_codebooks": len(sids.codebooks),
            "stats": _jsonable(sids.stats),
        }
        (tmp / "stats.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def load_semantic_ids(path_dir: str | os.PathLike) -> SemanticIds:
    """Read semantic IDs written by :func:`save_semantic_ids` (never unpickles).

    Args:
        path_dir: the directory.

    Returns:
        The :class:`SemanticIds`.

    >>> import tempfile
    >>> sids = SemanticIds(np.array([[0], [1]]), (np.eye(2),), (2,))
    >>> load_semantic_ids(save_semantic_ids(tempfile.mkdtemp() + "/s", sids)).codebook_sizes
    (2,)
    """
    src = Path(path_dir)
    meta_path = src / "stats.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found; point to a directory written by save_semantic_ids."
        )
    try:
        meta = json.loads(meta_path.read_text())
        sizes = tuple(int(s) for s in meta["codebook_sizes"])
        num_books = int(meta["num_codebooks"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path} is not a valid semantic-IDs stats.json ({e}).") from e
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')!r}, "
            f"expected {_FORMAT_VERSION}; re-create it with this version of gti_jax."
        )
    names = ["codes.npy"] + [f"codebook_{i}.npy" for i in range(num_books)]
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {missing}; re-create it with save_semantic_ids.")
    codes = np.load(src / "codes.npy", allow_pickle=False)
    books = tuple(np.load(src / n, allow_pickle=False) for n in names[1:])
    return SemanticIds(codes, books, sizes, dict(meta.get("stats", {})))


def _read_id_map(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecDataError(f"{path}: no such semantic-IDs file; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecDataError(f"{path}: not a JSON file ({e}); expected {{item: [tokens]}}") from None
    if not isinstance(data, dict) or not data:
        raise RecDataError(
            f"{path}: expected a non-empty JSON object {{item: [code tokens]}}, e.g. "
            '{"0": ["<a_12>", "<b_3>", "<c_200>"]}'
        )
    for key, toks in data.items():
        if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks) or not toks:
            raise RecDataError(
                f"{path}: item {key!r} maps to {toks!r}; each item needs a non-empty list of "
                'code tokens such as ["<a_12>", "<b_3>"]'
            )
    return data


def _codes_of(path: Path, key: str, toks: list[str]) -> list[int]:
    row = []
    for level, tok in enumerate(toks):
        parsed = parse_code_token(tok)
        if parsed is None or parsed[0] != level:
            want = f"<{LEVEL_LETTERS[level]}_N>" if level < len(LEVEL_LETTERS) else "?"
            raise RecDataError(
                f"{path}: item {key!r}: token {level + 1} is {tok!r}, expected {want} (level "
                f"{level + 1} of the <a_N><b_N>... format)"
            )
        row.append(parsed[1])
    return row


def import_semantic_ids(path: str | os.PathLike, item_ids: Sequence[str]) -> SemanticIds:
    """Semantic IDs read from a JSON map item -> code tokens, e.g. LC-Rec's ``.index.json``
    (``{"0": ["<a_12>", "<b_3>", "<c_200>"], ...}``), instead of computing them.

    An item is looked up by its id (``item_ids[i]``, e.g. an ASIN); when no key of the map is
    an item id, the keys are taken as item indices in `item_ids`' order (LC-Rec numbers its
    items so; the same order only if its filtering kept the same items in the same order).
    Keys of items not in `item_ids` are ignored (filtering drops items). Tokens are
    :mod:`gti_jax.rec.codes`' ``<a_N><b_N>...``, one per level in level order. Collisions
    (two items with the same tokens) are refused, not resolved: the ID would not name one
    item, and resolving them would change IDs the importer wants kept.

    Args:
      path: the JSON file.
      item_ids: the dataset's item ids, in item-index order.

    Returns:
      :class:`SemanticIds` with no codebooks (codebook sizes: the largest code + 1 per level).

    Raises:
      RecDataError: one line: not a JSON map, a malformed token, an item not covered, IDs of
        different lengths, or two items sharing an ID.

    >>> import json, tempfile
    >>> p = tempfile.mkdtemp() + "/ids.json"
    >>> _ = open(p, "w").write(json.dumps({"0": ["<a_1>", "<b_0>"], "1": ["<a_0>", "<b_2>"]}))
    >>> import_semantic_ids(p, ["x", "y"]).codes.tolist()
    [[1, 0], [0, 2]]
    """
    src = Path(path)
    data = _read_id_map(src)
    by_id = any(str(i) in data for i in item_ids)
    keys = [str(i) for i in item_ids] if by_id else [str(i) for i in range(len(item_ids))]
    missing = [k for k in keys if k not in data]
    if missing:
        what = "ids" if by_id else "indices (no key is an item id)"
        raise RecDataError(
            f"{src}: {len(missing)} of {len(keys)} items have no semantic ID (item {what} "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the map must "
            "cover every item left after filtering"
        )
    rows = [_codes_of(src, k, data[k]) for k in keys]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        odd = next(k for k, r in zip(keys, rows, strict=True) if len(r) != len(rows[0]))
        raise RecDataError(
            f"{src}: semantic IDs have different lengths ({lengths}; item {keys[0]!r} has "
            f"{len(rows[0])}, item {odd!r} {len(data[odd])}); every item needs one token per level"
        )
    seen: dict[tuple[int, ...], str] = {}
    for k, r in zip(keys, rows, strict=True):
        first = seen.setdefault(tuple(r), k)
        if first != k:
            raise RecDataError(
                f"{src}: items {first!r} and {k!r} share the semantic ID {''.join(data[k])}; "
                "IDs must be unique (add a disambiguation level to the map)"
            )
    codes = np.asarray(rows, np.int64)
    sizes = tuple(int(c) + 1 for c in codes.max(axis=0))
    stats = collision_stats(codes, sizes)
    stats.update(imported_from=str(src), resolution=None, extra_level=False)
    return SemanticIds(codes, (), sizes, stats)


def item_embeddings_from_npy(path: str | os.PathLike, num_items: int) -> np.ndarray:
    """Load ``[num_items, D]`` item embeddings from a ``.npy`` file (never unpickles).

    Args:
        path: ``.npy`` file with a 2-D float array, row ``i`` = item ``i``.
        num_items: expected number of rows.

    Returns:
        ``[num_items, D]`` float32 array.

    >>> import tempfile
    >>> p = tempfile.mkdtemp() + "/e.npy"; np.save(p, np.zeros((3, 2)))
    >>> item_embeddings_from_npy(p, 3).shape
    (3, 2)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"item embeddings file {p} not found; pass an existing .npy file.")
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise ValueError(
            f"{p} is not a plain numeric .npy array ({e}); save it with np.save(allow_pickle=False)."
        ) from e
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(
            f"{p} holds an array of shape {arr.shape}; expected [num_items={num_items}, D]."
        )
    if arr.shape[0] != num_items:
        raise ValueError(
            f"{p} has {arr.shape[0]} rows but there are {num_items} items; "
            "write one embedding row per item, in item-id order."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{p} has dtype {arr.dtype}; expected floating-point embeddings.")
    out = np.asarray(arr, np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{p} contains NaN or inf; clean the embeddings first.")
    return out
