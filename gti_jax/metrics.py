"""Retrieval metrics for leave-one-out recommendation: Recall@K, NDCG@K, validity, popularity.

Each user has one held-out target item and one ranked list of predicted items (e.g. the
beams of a constrained beam search, best first). Items are any hashable values (ints,
strings such as ``"<a_1><b_7><c_3>"``, tuples of codes).

Conventions:

* A ranked list is de-duplicated, keeping each item's first position, before scoring.
* ``k`` may exceed a list's length: only the returned items count, and a target not among
  them is a miss. So a decoder that returns 20 beams scores Recall@50 as Recall@20.
* With one target, Recall@K = hit rate, and NDCG@K = ``1 / log2(rank + 2)`` for a hit at
  0-based ``rank < K`` (the ideal DCG is 1), else 0. Both are averaged over users.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence

__all__ = [
    "ndcg_at_k",
    "popularity_baseline",
    "popularity_ranking",
    "recall_at_k",
    "retrieval_metrics",
    "valid_rate",
]


def _dedupe(items: Iterable[Hashable]) -> list[Hashable]:
    return list(dict.fromkeys(items))


def _check(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable]) -> None:
    if isinstance(ranked, str | bytes) or isinstance(targets, str | bytes):
        raise ValueError("ranked and targets must be sequences, one entry per user, not a string.")
    if len(ranked) != len(targets):
        raise ValueError(
            f"got {len(ranked)} ranked lists for {len(targets)} targets; pass one ranked list "
            "per target."
        )
    if len(targets) == 0:
        raise ValueError("no users to score: ranked and targets are empty.")
    for i, r in enumerate(ranked):
        if isinstance(r, str | bytes):
            raise ValueError(
                f"ranked[{i}] is a string; each entry must be a list of items, e.g. [{r!r}]."
            )


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"k values must be positive integers, got {ks}.")
    return ks


def _ranks(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable]) -> list[int | None]:
    """0-based rank of each target in its de-duplicated list, or ``None`` when absent."""
    out: list[int | None] = []
    for r, t in zip(ranked, targets, strict=True):
        deduped = _dedupe(r)
        try:
            out.append(deduped.index(t))
        except ValueError:
            out.append(None)
    return out


def _recall(ranks: Sequence[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r < k) / len(ranks)


def _ndcg(ranks: Sequence[int | None], k: int) -> float:
    return sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks)


def recall_at_k(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable], k: int) -> float:
    """Recall@K with one target per user (the hit rate).

    Args:
        ranked: one ranked list of items per user, best first (duplicates counted once).
        targets: the held-out item of each user.
        k: cut-off; may exceed a list's length (absent targets are misses).

    Returns:
        Share of users whose target is among their first ``k`` distinct items.

    >>> recall_at_k([[1, 2, 3], [4, 5, 6]], [2, 9], k=2)
    0.5
    """
    _check(ranked, targets)
    (k,) = _check_ks((k,))
    return _recall(_ranks(ranked, targets), k)


def ndcg_at_k(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable], k: int) -> float:
    """NDCG@K with one target per user: ``1 / log2(rank + 2)`` on a hit, 0 on a miss.

    Args:
        ranked: one ranked list of items per user, best first (duplicates counted once).
        targets: the held-out item of each user.
        k: cut-off; may exceed a list's length (absent targets are misses).

    Returns:
        Mean over users.

    >>> round(ndcg_at_k([[1, 2, 3], [4, 5, 6]], [2, 9], k=2), 4)
    0.3155
    """
    _check(ranked, targets)
    (k,) = _check_ks((k,))
    return _ndcg(_ranks(ranked, targets), k)


def retrieval_metrics(
    ranked: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    ks: Iterable[int] = (5, 10, 20, 50),
) -> dict[str, float]:
    """Recall@K and NDCG@K for several cut-offs in one pass.

    ``k`` larger than a list's length is still reported: only returned items can hit, so
    Recall@50 of 20-beam outputs equals their Recall@20 (decode at least ``max(ks)`` beams for
    a faithful number).

    Args:
        ranked: one ranked list of items per user, best first (duplicates counted once).
        targets: the held-out item of each user.
        ks: cut-offs.

    Returns:
        ``{"recall@5": ..., "ndcg@5": ..., "recall@10": ..., ...}`` in the order of ``ks``.

    >>> retrieval_metrics([[1, 2], [3, 4]], [1, 4], ks=(1, 2))["recall@2"]
    1.0
    """
    _check(ranked, targets)
    ks = _check_ks(ks)
    ranks = _ranks(ranked, targets)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = _recall(ranks, k)
        out[f"ndcg@{k}"] = _ndcg(ranks, k)
    return out


def popularity_ranking(train_counts: Mapping[Hashable, float] | Sequence[float]) -> list[Hashable]:
    """All items by descending training count; ties broken by ascending item.

    Args:
        train_counts: ``{item: count}``, or a sequence where index ``i`` is item ``i``'s count.

    Returns:
        The items, most popular first.

    >>> popularity_ranking({"a": 1, "b": 3, "c": 3})
    ['b', 'c', 'a']
    """
    if isinstance(train_counts, Mapping):
        pairs = list(train_counts.items())
    elif isinstance(train_counts, str | bytes):
        raise ValueError("train_counts must be a mapping or a sequence of counts, not a string.")
    else:
        pairs = list(enumerate(train_counts))
    if not pairs:
        raise ValueError("train_counts is empty; count the training interactions per item first.")
    try:
        return [item for item, _ in sorted(pairs, key=lambda p: (-float(p[1]), p[0]))]
    except TypeError as e:
        raise ValueError(
            f"popularity ties need mutually comparable item ids ({e}); use one id type."
        ) from e


def popularity_baseline(
    train_counts: Mapping[Hashable, float] | Sequence[float],
    targets: Sequence[Hashable],
    ks: Iterable[int] = (5, 10, 20, 50),
    *,
    exclude_history: Sequence[Collection[Hashable]] | None = None,
) -> dict[str, float]:
    """Metrics of recommending every user the most popular training items.

    Items are ranked by training count (ties by ascending item id, see
    :func:`popularity_ranking`); with ``exclude_history`` each user's already-seen items are
    removed from their list first.

    Args:
        train_counts: ``{item: count}`` or counts indexed by item id.
        targets: the held-out item of each user.
        ks: cut-offs.
        exclude_history: optional per-user collections of items to skip.

    Returns:
        The :func:`retrieval_metrics` dictionary.

    >>> popularity_baseline({1: 5, 2: 3, 3: 1}, [2, 3], ks=(1, 2))["recall@2"]
    0.5
    """
    ks = _check_ks(ks)
    ranking = popularity_ranking(train_counts)
    if isinstance(targets, str | bytes) or len(targets) == 0:
        raise ValueError("targets must be a non-empty sequence, one held-out item per user.")
    kmax = max(ks)
    if exclude_history is None:
        top = ranking[:kmax]
        ranked = [top] * len(targets)
    else:
        if len(exclude_history) != len(targets):
            raise ValueError(
                f"exclude_history has {len(exclude_history)} entries for {len(targets)} "
                "targets; give one history per user."
            )
        ranked = []
        for hist in exclude_history:
            seen = hist if isinstance(hist, set | frozenset) else set(hist)
            row: list[Hashable] = []
            for item in ranking:
                if item not in seen:
                    row.append(item)
                    if len(row) == kmax:
                        break
            ranked.append(row)
    return retrieval_metrics(ranked, targets, ks)


def valid_rate(generated: Iterable[Hashable], candidates_set: Collection[Hashable]) -> float:
    """Share of generated items that are valid candidates (e.g. existing semantic IDs).

    Args:
        generated: a flat iterable of generated items (flatten per-user beams first).
        candidates_set: the valid items.

    Returns:
        ``valid / total`` in ``[0, 1]``.

    >>> valid_rate(["<a_1>", "<a_9>", "<a_1>"], {"<a_1>", "<a_2>"})
    0.6666666666666666
    """
    if isinstance(generated, str | bytes):
        raise ValueError("generated must be an iterable of items, not one string.")
    cands = candidates_set if isinstance(candidates_set, set | frozenset) else set(candidates_set)
    items = list(generated)
    if not items:
        raise ValueError("valid_rate got no generated items; the rate is undefined.")
    return sum(1 for g in items if g in cands) / len(items)
