"""Paired tests between two rankers evaluated on the same users.

Two arms of an experiment rank the same held-out item of the same users, so their
difference is best judged per user: McNemar's exact test on hit@K (which users one arm gets
and the other misses), and a paired bootstrap over users of any per-user score (hit@K,
NDCG@K). With several seeds per arm, per-user scores are averaged over the seeds first (the
user is the unit that is resampled), and McNemar counts every (user, seed) pair.

Ranks are 1-based positions of the target in a ranked list, ``None`` for a miss (the
``ranks`` of ``run_dir/eval_ranks.json``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["hits_at_k", "mcnemar_exact", "ndcg_at_k_per_user", "paired_bootstrap"]

Ranks = Sequence[int | None]


def hits_at_k(ranks: Ranks, k: int) -> np.ndarray:
    """1.0 where the target is in the top `k`, else 0.0.

    >>> hits_at_k([1, None, 11, 10], 10).tolist()
    [1.0, 0.0, 0.0, 1.0]
    """
    return np.asarray([1.0 if r is not None and r <= k else 0.0 for r in ranks])


def ndcg_at_k_per_user(ranks: Ranks, k: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` for a hit in the top `k` (1-based rank), else 0.

    >>> ndcg_at_k_per_user([1, 3, None], 5).round(3).tolist()
    [1.0, 0.5, 0.0]
    """
    return np.asarray([1.0 / math.log2(r + 1) if r is not None and r <= k else 0.0 for r in ranks])


def mcnemar_exact(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float]:
    """McNemar's exact (binomial) two-sided test on paired hits.

    Args:
        hits_a, hits_b: 0/1 arrays of the same pairs (users, or user x seed).

    Returns:
        ``{"a_only", "b_only", "p"}``: pairs only a hits, only b hits, and the two-sided
        p-value of "a and b hit equally often" (1.0 without discordant pairs).

    >>> round(mcnemar_exact(np.array([1, 1, 1, 1, 1, 1, 0]), np.zeros(7))["p"], 6)
    0.03125
    """
    a, b = np.asarray(hits_a) > 0, np.asarray(hits_b) > 0
    if a.shape != b.shape:
        raise ValueError(f"paired hits need the same shape, got {a.shape} and {b.shape}")
    n01, n10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    n = n01 + n10
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    lo = min(n01, n10)
    # P(X <= lo) for X ~ Binomial(n, 1/2), summed in log space (n can be thousands)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(lo + 1)]
    top = max(logs)
    cdf = math.exp(top + math.log(sum(math.exp(x - top) for x in logs)) - n * math.log(2))
    return {"a_only": n10, "b_only": n01, "p": min(1.0, 2.0 * cdf)}


def paired_bootstrap(
    scores_a: np.ndarray, scores_b: np.ndarray, *, samples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap over users of the mean difference ``a - b``.

    Args:
        scores_a, scores_b: ``[users]`` per-user scores (or ``[seeds, users]``: averaged
            over seeds first).
        samples: bootstrap resamples.
        seed: the resampling seed.

    Returns:
        ``{"diff", "ci_low", "ci_high", "p"}``: the observed mean difference, its 95%
        percentile interval, and the two-sided p-value (twice the share of resampled
        differences on the other side of zero, at most 1).

    >>> r = paired_bootstrap(np.ones(50), np.zeros(50))
    >>> r["diff"], r["p"]
    (1.0, 0.0)
    """
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape, got {a.shape} and {b.shape}")
    d = (a - b).mean(axis=0) if a.ndim == 2 else a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    boot = d[idx].mean(axis=1)
    diff = float(d.mean())
    below, above = float(np.mean(boot <= 0)), float(np.mean(boot >= 0))
    p = min(1.0, 2.0 * min(below, above)) if diff != 0 else 1.0
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": diff, "ci_low": float(lo), "ci_high": float(hi), "p": p}
