"""Retrieval metrics against hand-computed values."""

import math

import pytest

from gti_jax.metrics import (
    ndcg_at_k,
    popularity_baseline,
    popularity_ranking,
    recall_at_k,
    retrieval_metrics,
    valid_rate,
)

L2, L3, L4 = 1.0, 1 / math.log2(3), 1 / math.log2(4)

# (ranked lists, targets, k, recall, ndcg)
CASES = [
    pytest.param([[1, 2, 3]], [1], 1, 1.0, L2, id="hit-at-top"),
    pytest.param([[1, 2, 3]], [3], 2, 0.0, 0.0, id="hit-below-cutoff-is-miss"),
    pytest.param([[1, 2, 3]], [3], 3, 1.0, L4, id="hit-at-rank-2"),
    pytest.param([[1, 2, 3]], [9], 3, 0.0, 0.0, id="absent"),
    pytest.param([[5, 5, 7]], [7], 2, 1.0, L3, id="duplicates-counted-once"),
    pytest.param([[5, 5, 5, 7]], [7], 2, 1.0, L3, id="triplicate"),
    pytest.param([[1, 2]], [2], 50, 1.0, L3, id="k-beyond-list-hit"),
    pytest.param([[1, 2]], [9], 50, 0.0, 0.0, id="k-beyond-list-miss"),
    pytest.param([[]], [1], 5, 0.0, 0.0, id="empty-list"),
    pytest.param(
        [[1, 2], [3, 4], [5, 6], [7, 8]],
        [1, 4, 9, 8],
        2,
        0.75,
        (1 + 2 * L3) / 4,
        id="mean-over-users",
    ),
    pytest.param([["<a_1><b_2>", "<a_1><b_3>"]], ["<a_1><b_3>"], 5, 1.0, L3, id="string-ids"),
    pytest.param([[(0, 1), (0, 2)]], [(0, 2)], 1, 0.0, 0.0, id="tuple-ids-miss"),
]


@pytest.mark.parametrize(("ranked", "targets", "k", "recall", "ndcg"), CASES)
def test_recall_and_ndcg_table(ranked, targets, k, recall, ndcg):
    assert recall_at_k(ranked, targets, k) == pytest.approx(recall)
    assert ndcg_at_k(ranked, targets, k) == pytest.approx(ndcg)
    m = retrieval_metrics(ranked, targets, ks=(k,))
    assert m == pytest.approx({f"recall@{k}": recall, f"ndcg@{k}": ndcg})


def test_retrieval_metrics_keys_and_monotone():
    ranked = [[3, 1, 2, 4, 5, 6], [9, 8, 7], [1]]
    targets = [5, 7, 2]
    m = retrieval_metrics(ranked, targets)
    assert list(m) == [f"{name}@{k}" for k in (5, 10, 20, 50) for name in ("recall", "ndcg")]
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(4)) / 3)
    assert m["recall@10"] == m["recall@50"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("ranked", "targets", "k", "match"),
    [
        ([[1]], [1, 2], 1, "2 targets"),
        ([], [], 1, "empty"),
        ([[1]], [1], 0, "positive"),
        (["abc"], ["a"], 1, "string"),
    ],
)
def test_bad_input_names_the_problem(ranked, targets, k, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(ranked, targets, k)


def test_popularity_ranking_breaks_ties_by_id():
    assert popularity_ranking({"d": 1, "c": 3, "a": 5, "b": 3}) == ["a", "b", "c", "d"]
    assert popularity_ranking([0, 2, 2, 7]) == [3, 1, 2, 0]


def test_popularity_baseline_toy():
    counts = {"a": 5, "b": 3, "c": 3, "d": 1}  # ranking a, b, c, d
    targets = ["c", "a", "d"]  # ranks 2, 0, 3
    m = popularity_baseline(counts, targets, ks=(1, 3, 10))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((L4 + 1) / 3)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((L4 + 1 + 1 / math.log2(5)) / 3)


def test_popularity_baseline_excludes_history():
    counts = {"a": 5, "b": 3, "c": 3, "d": 1}
    # user 0 saw a -> b, c, d (c at rank 1); user 1 saw b -> a, c, d (a at 0);
    # user 2 saw nothing -> a, b, c, d (d at 3, beyond k=3).
    m = popularity_baseline(counts, ["c", "a", "d"], ks=(3,), exclude_history=[{"a"}, ["b"], []])
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((L3 + 1) / 3)
    with pytest.raises(ValueError, match="one history per user"):
        popularity_baseline(counts, ["a"], ks=(1,), exclude_history=[[], []])


def test_valid_rate():
    cands = {"<a_1><b_1>", "<a_1><b_2>"}
    assert valid_rate(["<a_1><b_1>", "<a_9><b_1>", "<a_1><b_2>", "x"], cands) == 0.5
    assert valid_rate([(0, 1)], [(0, 1)]) == 1.0
    assert valid_rate(["x"], cands) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        valid_rate([], cands)
