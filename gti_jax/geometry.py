"""Geometry of new-token embeddings: collapse under mean init, structure after GTI.

Pure functions over arrays (numpy or jax; everything is pulled to the host and computed in
float64). They know nothing of files, models or NNX; :mod:`gti_jax.diagnose` records them for
a run (``diagnostics.json``, arrays, figures). (This module was ``gti_jax.diagnostics``.)

The paper (arXiv 2604.02324) diagnoses the new-token matrix ``E_new`` ``[N, D]`` with:

* its singular-value spectrum and effective rank ``exp(-sum p_i log p_i)``,
  ``p_i = s_i / sum_j s_j`` (Roy & Vetterli, 2007). Mean init gives rank ~1;
* pairwise cosine matrices (old vs new rows at init, new vs new after training);
* RSA: Pearson and Spearman correlation between the upper triangles of the cosine matrix of
  the semantic-ID code vectors and that of the learned embeddings.

Conventions: a zero row has cosine 0 with everything (itself included); the effective and
stable rank of a zero matrix are 0.0; correlations with a constant side are ``nan``
(``None`` in :func:`summarize`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "cosine_matrix",
    "effective_rank",
    "max_pairwise_cosine",
    "mean_pairwise_cosine",
    "nearest_tokens",
    "rsa",
    "singular_values",
    "stable_rank",
    "summarize",
]

# Largest number of float64 cosines held at once by the chunked routines (~128 MiB).
_BLOCK_ELEMENTS = 1 << 24


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """Returns ``x`` as a float64 ``[N, D]`` host array, or raises a one-line ValueError."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] matrix, got shape {a.shape}; pass rows.")
    try:
        a = a.astype(np.float64, copy=False)  # also bfloat16 / float8 from ml_dtypes
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}.") from err
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; fix the embeddings before diagnosing.")
    return a


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """Returns rows scaled to unit norm; zero rows stay zero. ``a`` is float64 ``[N, D]``."""
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def singular_values(E: Any, *, center: bool = False) -> np.ndarray:
    """Singular values of a matrix, largest first, computed in float64.

    The paper uses the raw (uncentered) matrix; mean init then shows one dominant value.

    Args:
      E: matrix ``[N, D]`` (numpy or jax array).
      center: subtract the column mean first (spectrum of the spread around the mean).

    Returns:
      ``[min(N, D)]`` float64 array, descending, all ``>= 0``.

    >>> import numpy as np
    >>> singular_values(np.diag([3.0, 1.0])).tolist()
    [3.0, 1.0]
    """
    a = _as_matrix(E, "E")
    if center:
        a = a - a.mean(axis=0, keepdims=True)
    if a.size == 0:
        return np.zeros((0,), np.float64)
    return np.linalg.svd(a, compute_uv=False)


def effective_rank(s_or_matrix: Any) -> float:
    """Effective rank ``exp(H(p))``, ``p_i = s_i / sum s`` (Roy & Vetterli, 2007).

    Lies in ``[1, rank]`` for a nonzero matrix: 1 for rank one, ``k`` for ``k`` orthonormal
    rows. Invariant to scaling. A zero matrix (or empty spectrum) gives ``0.0`` by definition.

    Args:
      s_or_matrix: a 1-D array of singular values, or a 2-D matrix ``[N, D]`` whose singular
        values are computed (raw, uncentered).

    Returns:
      The effective rank as a Python float.

    >>> import numpy as np
    >>> round(effective_rank(np.eye(3)), 6)
    3.0
    >>> round(effective_rank(np.ones((4, 5))), 6)  # rank one
    1.0
    """
    a = np.asarray(s_or_matrix)
    if a.ndim == 2:
        s = singular_values(a)
    elif a.ndim == 1:
        s = a.astype(np.float64)
        if np.any(s < 0) or not np.all(np.isfinite(s)):
            raise ValueError("singular values must be finite and >= 0; pass s or the matrix.")
    else:
        raise ValueError(f"expected singular values [K] or a matrix [N, D], got shape {a.shape}.")
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    # exp(0) is exactly 1; round away float noise below 1 (a rank-one matrix's tail of ~1e-17
    # singular values cannot push the entropy below 0).
    return max(float(np.exp(entropy)), 1.0)


def stable_rank(E: Any) -> float:
    """Stable rank ``||E||_F^2 / ||E||_2^2``: in ``[1, rank]``; ``0.0`` for a zero matrix.

    Args:
      E: matrix ``[N, D]``.

    Returns:
      The stable rank as a Python float.

    >>> import numpy as np
    >>> stable_rank(np.eye(4))
    4.0
    """
    s = singular_values(E)
    if s.size == 0 or s[0] <= 0.0:
        return 0.0
    return float(np.sum(s**2) / s[0] ** 2)


def cosine_matrix(A: Any, B: Any = None) -> np.ndarray:
    """Cosine similarity between the rows of ``A`` and ``B`` (``B`` defaults to ``A``).

    A zero row has cosine 0 with every row, itself included. Values are clipped to
    ``[-1, 1]``.

    Args:
      A: ``[N, D]``.
      B: ``[M, D]`` or None for ``A``.

    Returns:
      float64 ``[N, M]``.

    >>> import numpy as np
    >>> cosine_matrix(np.array([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]])).round(3).tolist()
    [[1.0, 0.707, 0.0], [0.707, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    ua = _unit_rows(_as_matrix(A, "A"))
    if B is None:
        ub = ua
    else:
        ub = _unit_rows(_as_matrix(B, "B"))
        if ub.shape[1] != ua.shape[1]:
            raise ValueError(
                f"A and B must have the same width D, got {ua.shape[1]} and {ub.shape[1]}."
            )
    return np.clip(ua @ ub.T, -1.0, 1.0)


def _check_pairs(u: np.ndarray) -> None:
    if u.shape[0] < 2:
        raise ValueError(f"pairwise cosine needs at least 2 rows, got {u.shape[0]}.")


def mean_pairwise_cosine(E: Any) -> float:
    """Mean cosine over distinct pairs ``i < j`` of rows; O(N D) memory, no ``[N, N]`` matrix.

    Uses ``sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2`` for unit rows ``u``.

    Args:
      E: ``[N, D]`` with ``N >= 2``.

    Returns:
      The mean as a Python float (1.0 when all rows point the same way).

    >>> import numpy as np
    >>> mean_pairwise_cosine(np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]))  # (1 + 0 + 0) / 3
    0.3333333333333333
    """
    u = _unit_rows(_as_matrix(E, "E"))
    _check_pairs(u)
    n = u.shape[0]
    total = float(np.sum(u.sum(axis=0) ** 2) - np.sum(u * u))
    return float(np.clip(total / (n * (n - 1)), -1.0, 1.0))


def max_pairwise_cosine(E: Any) -> float:
    """Largest cosine over distinct pairs ``i < j`` of rows, computed in row blocks.

    Args:
      E: ``[N, D]`` with ``N >= 2``.

    Returns:
      The maximum as a Python float.

    >>> import numpy as np
    >>> max_pairwise_cosine(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])).__round__(4)
    0.7071
    """
    u = _unit_rows(_as_matrix(E, "E"))
    _check_pairs(u)
    n = u.shape[0]
    block = max(1, _BLOCK_ELEMENTS // n)
    best = -np.inf
    for start in range(0, n - 1, block):
        stop = min(start + block, n)
        c = u[start:stop] @ u.T  # [b, N]
        rows = np.arange(start, stop)[:, None]
        c = np.where(np.arange(n)[None, :] > rows, c, -np.inf)
        best = max(best, float(c.max()))
    return float(np.clip(best, -1.0, 1.0))


def nearest_tokens(
    new_rows: Any,
    table: Any,
    k: int = 5,
    *,
    exclude_ids: Sequence[int] | np.ndarray | None = None,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``table`` by cosine to each of ``new_rows``, streamed in chunks.

    The table (e.g. 150k x 1k) is normalized and scored chunk by chunk, so memory stays at
    about ``N * chunk_rows`` cosines plus the running top-k; no full normalized copy of the
    table is made. Ties are broken by the smaller id.

    Args:
      new_rows: queries ``[N, D]``.
      table: candidates ``[V, D]`` (the full embedding table is fine).
      k: neighbours per query, ``1 <= k <= V - len(exclude_ids)``.
      exclude_ids: table rows never returned (e.g. the new ids, to list old neighbours only).
      chunk_rows: table rows scored per chunk; the default keeps both the chunk's float64
        copy and its cosines at ~16M values (128 MiB).

    Returns:
      ``(ids, cos)``: int64 ``[N, k]`` and float64 ``[N, k]``, best first.

    >>> import numpy as np
    >>> table = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    >>> ids, cos = nearest_tokens(np.array([[1.0, 0.0]]), table, k=2, exclude_ids=[0])
    >>> ids.tolist()
    [[2, 1]]
    """
    q = _unit_rows(_as_matrix(new_rows, "new_rows"))
    t = np.asarray(table)
    if t.ndim != 2:
        raise ValueError(f"table must be a 2-D [V, D] matrix, got shape {t.shape}.")
    if t.shape[1] != q.shape[1]:
        raise ValueError(
            f"new_rows and table must have the same width D, got {q.shape[1]} and {t.shape[1]}."
        )
    v = t.shape[0]
    keep = np.ones((v,), bool)
    if exclude_ids is not None:
        ex = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
        if ex.size and (ex.min() < 0 or ex.max() >= v):
            raise ValueError(f"exclude_ids must lie in [0, {v}); got ids outside that range.")
        keep[ex] = False
    available = int(keep.sum())
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] (rows left after exclusion), got {k}.")
    n = q.shape[0]
    if chunk_rows is None:
        chunk_rows = max(k, _BLOCK_ELEMENTS // max(n, t.shape[1], 1))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")

    best_ids = np.zeros((n, 0), np.int64)
    best_cos = np.zeros((n, 0), np.float64)
    for start in range(0, v, chunk_rows):
        stop = min(start + chunk_rows, v)
        chunk = _as_matrix(t[start:stop], "table")
        c = q @ _unit_rows(chunk).T  # [N, c]
        c = np.where(keep[start:stop][None, :], np.clip(c, -1.0, 1.0), -np.inf)
        ids = np.broadcast_to(np.arange(start, stop, dtype=np.int64), c.shape)
        all_cos = np.concatenate([best_cos, c], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        m = min(k, all_cos.shape[1])
        # Order by (-cos, id) so ties keep the smaller id; exact and deterministic.
        order = np.lexsort((all_ids, -all_cos), axis=1)[:, :m]
        best_cos = np.take_along_axis(all_cos, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
    return best_ids, best_cos


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    n = x.size
    # Start index of each run of equal sorted values.
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [n]])  # exclusive
    run_rank = (starts + ends - 1) / 2.0 + 1.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(n, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def rsa(code_vectors: Any, embeddings: Any) -> dict[str, float]:
    """Representational similarity between code vectors and embeddings of the same items.

    Correlates the upper triangles (``i < j``) of ``cosine_matrix(code_vectors)`` and
    ``cosine_matrix(embeddings)``: Pearson on the values, Spearman on their average ranks
    (ties share the mean rank, as ``scipy.stats.spearmanr``). A constant side (e.g. exact
    mean init) gives ``nan``. Memory is ``O(N^2)``: subsample large ``N`` first.

    Args:
      code_vectors: ``[N, C]`` (e.g. semantic-ID codebook vectors, or one-hot codes).
      embeddings: ``[N, D]`` learned new-token embeddings, rows aligned with ``code_vectors``.

    Returns:
      ``{"rsa_pearson": r, "rsa_spearman": rho}`` as Python floats.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(6, 3))
    >>> {k: round(v, 6) for k, v in rsa(x, 2.0 * x).items()}
    {'rsa_pearson': 1.0, 'rsa_spearman': 1.0}
    """
    a = _as_matrix(code_vectors, "code_vectors")
    b = _as_matrix(embeddings, "embeddings")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"code_vectors and embeddings must have the same rows N, got {a.shape[0]} and "
            f"{b.shape[0]}; align the codebook with the new ids."
        )
    if a.shape[0] < 3:
        raise ValueError(f"RSA needs at least 3 items (2 pairs), got {a.shape[0]}.")
    iu = np.triu_indices(a.shape[0], k=1)
    x = cosine_matrix(a)[iu]
    y = cosine_matrix(b)[iu]
    return {
        "rsa_pearson": _pearson(x, y),
        "rsa_spearman": _pearson(_average_ranks(x), _average_ranks(y)),
    }


def _spread(ids: np.ndarray, count: int) -> np.ndarray:
    """Deterministic, evenly spaced subset of ``count`` entries of ``ids`` (all if fewer)."""
    if ids.size <= count:
        return ids
    return ids[np.unique(np.linspace(0, ids.size - 1, count).round().astype(np.int64))]


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def summarize(
    table: Any,
    new_ids: Sequence[int] | np.ndarray,
    *,
    codebook: Any = None,
    old_sample: int = 50,
    decode: Callable[[int], str] | None = None,
    top_k: int = 5,
    num_nearest: int = 20,
    rsa_sample: int = 2000,
    old_ids: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """All diagnostics of the new rows of an embedding table, as a JSON-serialisable dict.

    Args:
      table: embedding table ``[V, D]`` (rows may include padding).
      new_ids: ids of the new tokens ``[N]``, ``N >= 2``, distinct.
      codebook: optional code vectors ``[N, C]`` aligned with ``new_ids``; adds RSA.
      old_sample: size of the evenly spaced sample of old rows for ``old_effective_rank``.
      decode: optional ``id -> text`` used to label neighbours.
      top_k: neighbours listed per new token.
      num_nearest: how many new tokens (evenly spaced over ``new_ids``) get neighbours.
      rsa_sample: RSA uses an evenly spaced subset of at most this many new tokens
        (its cost is quadratic).
      old_ids: rows that count as old (default: every row not in ``new_ids``); pass the
        original vocabulary to keep padding rows out of samples and neighbours.

    Returns:
      A dict with ``num_new``, ``effective_rank``, ``stable_rank``, ``mean_cos``,
      ``max_cos``, ``singular_values`` (list), ``old_effective_rank``, ``nearest`` (list of
      ``{"id", "neighbors": [{"id", "text", "cos"}]}``; neighbours are old rows only, and
      ``text`` is present only with ``decode``) and, with a codebook, ``rsa_pearson`` and
      ``rsa_spearman`` (None when undefined, e.g. all new rows equal). Floats are Python
      floats.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> table = rng.normal(size=(40, 8))
    >>> table[30:] = table[:30].mean(0) + 1e-9 * rng.normal(size=(10, 8))  # mean init
    >>> out = summarize(table, np.arange(30, 40))
    >>> round(out["effective_rank"], 3), round(out["mean_cos"], 3)
    (1.0, 1.0)
    """
    t = np.asarray(table)
    if t.ndim != 2:
        raise ValueError(f"table must be a 2-D [V, D] matrix, got shape {t.shape}.")
    new, old = _new_and_old_ids(new_ids, old_ids, t.shape[0])
    code = None
    if codebook is not None:
        code = _as_matrix(codebook, "codebook")
        if code.shape[0] != new.size:
            raise ValueError(
                f"codebook must have one row per new id ({new.size}), got {code.shape[0]}."
            )
    if top_k < 1 or old_sample < 0 or num_nearest < 0 or rsa_sample < 3:
        raise ValueError("need top_k >= 1, old_sample >= 0, num_nearest >= 0, rsa_sample >= 3.")

    e_new = _as_matrix(t[new], "table[new_ids]")
    s = singular_values(e_new)
    out: dict[str, Any] = {
        "num_new": int(new.size),
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(e_new),
        "mean_cos": mean_pairwise_cosine(e_new),
        "max_cos": max_pairwise_cosine(e_new),
        "singular_values": [float(x) for x in s],
    }
    if code is not None:
        pick = _spread(np.arange(new.size), rsa_sample)
        r = rsa(code[pick], e_new[pick])
        out["rsa_pearson"] = _finite_or_none(r["rsa_pearson"])
        out["rsa_spearman"] = _finite_or_none(r["rsa_spearman"])
    sample = _spread(old, old_sample)
    out["old_effective_rank"] = (
        effective_rank(_as_matrix(t[sample], "table[old]")) if sample.size else 0.0
    )
    out["nearest"] = _nearest_old(t, _spread(new, num_nearest), old, top_k, decode)
    return out


def _new_and_old_ids(
    new_ids: Sequence[int] | np.ndarray, old_ids: Sequence[int] | np.ndarray | None, v: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`summarize`'s new and old row ids, checked against the table's ``v`` rows."""
    new = np.asarray(new_ids)
    if new.ndim != 1 or not np.issubdtype(new.dtype, np.integer):
        raise ValueError("new_ids must be a 1-D sequence of integer token ids.")
    new = new.astype(np.int64)
    if new.size < 2:
        raise ValueError(f"summarize needs at least 2 new ids, got {new.size}.")
    if new.min() < 0 or new.max() >= v:
        raise ValueError(f"new_ids must lie in [0, {v}) (the table's rows); some do not.")
    if np.unique(new).size != new.size:
        raise ValueError("new_ids contains duplicates; pass each new token id once.")
    if old_ids is None:
        is_old = np.ones((v,), bool)
        is_old[new] = False
        return new, np.flatnonzero(is_old)
    old = np.asarray(old_ids, dtype=np.int64).reshape(-1)
    if old.size and (old.min() < 0 or old.max() >= v):
        raise ValueError(f"old_ids must lie in [0, {v}); some do not.")
    if np.intersect1d(old, new).size:
        raise ValueError("old_ids and new_ids overlap; a row is either old or new.")
    return new, old


def _nearest_old(
    t: np.ndarray,
    queries: np.ndarray,
    old: np.ndarray,
    top_k: int,
    decode: Callable[[int], str] | None,
) -> list[dict[str, Any]]:
    """The ``top_k`` nearest old rows (by cosine) of each query row, as :func:`summarize` lists."""
    nearest: list[dict[str, Any]] = []
    if not (queries.size and old.size):
        return nearest
    keep = np.zeros((t.shape[0],), bool)
    keep[old] = True
    ids, cos = nearest_tokens(
        t[queries], t, k=min(top_k, old.size), exclude_ids=np.flatnonzero(~keep)
    )
    for qid, row_ids, row_cos in zip(queries, ids, cos, strict=True):
        neighbors = []
        for nid, c in zip(row_ids, row_cos, strict=True):
            item: dict[str, Any] = {"id": int(nid)}
            if decode is not None:
                item["text"] = str(decode(int(nid)))
            item["cos"] = float(c)
            neighbors.append(item)
        nearest.append({"id": int(qid), "neighbors": neighbors})
    return nearest
