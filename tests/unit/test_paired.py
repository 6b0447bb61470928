"""Paired tests between arms on the same users (gti_jax.rec.paired)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gti_jax.rec.paired import hits_at_k, mcnemar_exact, ndcg_at_k_per_user, paired_bootstrap


def _binom_two_sided(b: int, c: int) -> float:
    n, lo = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(lo + 1)) / 2**n)


@pytest.mark.parametrize(("b", "c"), [(3, 10), (10, 3), (0, 5), (7, 7), (40, 60), (400, 480)])
def test_mcnemar_matches_the_exact_binomial(b, c):
    # b users only arm a hits, c only arm b, plus concordant users that must not matter
    a = np.array([1] * b + [0] * c + [1] * 20 + [0] * 30)
    bb = np.array([0] * b + [1] * c + [1] * 20 + [0] * 30)
    r = mcnemar_exact(a, bb)
    assert (r["a_only"], r["b_only"]) == (b, c)
    assert r["p"] == pytest.approx(_binom_two_sided(b, c), rel=1e-9)


def test_mcnemar_without_discordant_pairs_and_bad_shapes():
    assert mcnemar_exact(np.ones(5), np.ones(5))["p"] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact(np.ones(5), np.ones(4))


def test_per_user_scores_match_the_metric_definitions():
    ranks = [1, 2, 10, 11, None]
    assert hits_at_k(ranks, 10).tolist() == [1, 1, 1, 0, 0]
    assert ndcg_at_k_per_user(ranks, 10).tolist() == pytest.approx(
        [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0]
    )


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.random(943) < 0.05
    better = base | (rng.random(943) < 0.06)  # strictly more hits, on the same users
    r = paired_bootstrap(better.astype(float), base.astype(float))
    assert r["diff"] > 0 and r["p"] < 0.01 and r["ci_low"] > 0
    # two independent draws of the same rate: no difference to find most of the time
    same = rng.random(943) < 0.05
    r0 = paired_bootstrap(same.astype(float), (rng.random(943) < 0.05).astype(float))
    assert r0["ci_low"] < 0 < r0["ci_high"] or r0["p"] > 0.001
    assert paired_bootstrap(base.astype(float), base.astype(float))["p"] == 1.0


def test_paired_bootstrap_averages_seeds_per_user():
    a = np.array([[1.0, 0.0], [1.0, 0.0]])  # 2 seeds x 2 users
    b = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert paired_bootstrap(a, b, samples=100)["diff"] == pytest.approx(0.25)
