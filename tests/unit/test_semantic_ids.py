"""Semantic IDs: k-means pieces, RQ-KMeans, RQ-VAE, collisions, files."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gti_jax.rec import semantic_ids as sid
from gti_jax.rec.semantic_ids import (
    SemanticIds,
    collision_stats,
    item_embeddings_from_npy,
    kmeans,
    kmeans_plus_plus,
    load_semantic_ids,
    resolve_collisions,
    rq_kmeans,
    rq_vae,
    save_semantic_ids,
    sinkhorn_assign,
)

VAE_KW = dict(
    num_levels=3,
    codebook_size=8,
    hidden=(32,),
    latent_dim=8,
    steps=300,
    batch_size=128,
    lr=1e-2,
    dead_code_restart=50,
)


@pytest.fixture(scope="module")
def clustered():
    """512 points from 64 tight gaussian clusters in 16-d; label per point."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(64, 16)).astype(np.float32)
    labels = np.repeat(np.arange(64), 8)
    x = centers[labels] + 0.1 * rng.normal(size=(512, 16)).astype(np.float32)
    return x, labels


@pytest.fixture(scope="module")
def vae_ids(clustered):
    return rq_vae(clustered[0], key=0, **VAE_KW)


def _unique_rows(codes):
    return len(np.unique(codes, axis=0)) == codes.shape[0]


def _ratio(counts):
    return counts.max() / counts.min()


# ------------------------------------------------------------------ k-means pieces


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_plus_plus_picks_one_center_per_separated_cluster(seed):
    rng = np.random.default_rng(seed)
    means = 20.0 * np.eye(16, dtype=np.float32)[:8]
    x = np.repeat(means, 32, axis=0) + rng.normal(size=(256, 16)).astype(np.float32)
    centers = np.asarray(kmeans_plus_plus(x, 8, key=seed))
    nearest = np.argmin(((centers[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert sorted(nearest.tolist()) == list(range(8))
    # every center is one of the points
    assert np.all(np.min(((centers[:, None] - x[None]) ** 2).sum(-1), axis=1) < 1e-8)


def test_kmeans_recovers_clusters():
    rng = np.random.default_rng(3)
    means = 10.0 * rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 25)
    x = means[labels] + 0.1 * rng.normal(size=(100, 3)).astype(np.float32)
    centers, a = kmeans(x, 4, key=0)
    a = np.asarray(a)
    # same partition as the labels (up to renaming)
    assert all(len(set(a[labels == c])) == 1 for c in range(4))
    assert len(set(a.tolist())) == 4
    for c in range(4):
        np.testing.assert_allclose(np.asarray(centers)[c], x[a == c].mean(0), atol=1e-5)


def test_lloyd_reseeds_empty_cluster_from_farthest_point():
    x = jnp.array([[50.0], [50.1], [60.0], [60.1]])
    init = jnp.array([[50.0], [50.05], [1000.0]])  # the third center captures nothing
    centers, a = sid._lloyd(x, init, 10)
    a = np.asarray(a)
    assert sorted(set(a.tolist())) == [0, 1, 2]
    for c in range(3):
        np.testing.assert_allclose(np.asarray(centers)[c], np.asarray(x)[a == c].mean(0))


def test_sinkhorn_balances_skewed_preferences():
    rng = np.random.default_rng(0)
    d = rng.uniform(1.0, 2.0, size=(64, 4)).astype(np.float32)
    d[:, 0] = 0.0  # every point prefers code 0
    assert np.bincount(np.argmin(d, 1), minlength=4).max() == 64
    counts = np.bincount(np.asarray(sinkhorn_assign(d)), minlength=4)
    assert counts.min() >= 14 and counts.max() <= 18


# ------------------------------------------------------------------ RQ-KMeans


def test_rq_kmeans_unique_balanced_and_semantic(clustered):
    x, labels = clustered
    s = rq_kmeans(x, num_levels=3, codebook_size=8, key=0)
    assert s.codes.dtype == np.int32 and s.codes.shape[0] == 512
    assert _unique_rows(s.codes)
    assert s.num_levels == s.codes.shape[1] == s.stats["levels"]
    assert len(s.codebooks) == 3 and all(c.shape == (8, 16) for c in s.codebooks)
    assert s.codebook_sizes[:3] == (8, 8, 8)
    if s.stats["extra_level"]:
        assert s.codebook_sizes[3] == s.stats["max_group"] == s.codes[:, 3].max() + 1
    level1 = np.bincount(s.codes[:, 0], minlength=8)
    assert level1.min() > 0 and _ratio(level1) <= 4
    assert s.stats["codebook_usage"][0] == 1.0
    # a tight cluster keeps one level-1 code and one 2-level prefix
    assert all(len(set(s.codes[labels == c, 0])) == 1 for c in range(64))
    assert 0.0 <= s.stats["collision_rate"] <= 1.0


def test_rq_kmeans_is_deterministic(clustered):
    x, _ = clustered
    a = rq_kmeans(x, num_levels=2, codebook_size=8, key=7)
    b = rq_kmeans(x, num_levels=2, codebook_size=8, key=7)
    c = rq_kmeans(x, num_levels=2, codebook_size=8, key=8)
    np.testing.assert_array_equal(a.codes, b.codes)
    for u, v in zip(a.codebooks, b.codebooks, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.codes, c.codes)


def test_rq_kmeans_rejects_bad_input():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="codebook size 8"):
        rq_kmeans(x, num_levels=1, codebook_size=8, key=0)
    with pytest.raises(ValueError, match="NaN"):
        rq_kmeans(np.full((4, 3), np.nan), num_levels=1, codebook_size=2, key=0)
    with pytest.raises(ValueError, match="resolve"):
        rq_kmeans(x, num_levels=1, codebook_size=2, key=0, resolve="bogus")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        rq_kmeans(np.zeros(5), num_levels=1, codebook_size=2, key=0)


# ------------------------------------------------------------------ RQ-VAE


def test_rq_vae_unique_balanced_and_trained(clustered, vae_ids):
    x, _ = clustered
    s = vae_ids
    assert _unique_rows(s.codes) and s.codes.shape[0] == 512
    assert len(s.codebooks) == 3 and all(c.shape == (8, 8) for c in s.codebooks)
    assert s.stats["codebook_usage"][0] == 1.0
    level1 = np.bincount(s.codes[:, 0], minlength=8)
    assert _ratio(level1) <= 10
    last = np.bincount(s.codes[:, 2], minlength=8)  # Sinkhorn level
    assert _ratio(last) <= 1.3
    # training reduced the reconstruction error well below the data variance (~1)
    assert s.stats["recon_loss"] < 0.8 * float(x.var())
    assert s.code_vectors().shape == (512, 8)
    assert s.code_vectors(mode="concat").shape == (512, 24)


def test_rq_vae_sinkhorn_balances_the_last_level(clustered, vae_ids):
    plain = rq_vae(clustered[0], key=0, sinkhorn_last_level=False, **VAE_KW)
    np.testing.assert_array_equal(plain.codes[:, :2], vae_ids.codes[:, :2])  # same model
    plain_last = np.bincount(plain.codes[:, 2], minlength=8)
    balanced_last = np.bincount(vae_ids.codes[:, 2], minlength=8)
    assert _ratio(balanced_last) < _ratio(plain_last)
    assert plain.stats["collision_rate"] >= vae_ids.stats["collision_rate"]


def test_rq_vae_is_deterministic(clustered, vae_ids):
    again = rq_vae(clustered[0], key=0, **VAE_KW)
    other = rq_vae(clustered[0], key=1, **VAE_KW)
    np.testing.assert_array_equal(again.codes, vae_ids.codes)
    for u, v in zip(again.codebooks, vae_ids.codebooks, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(other.codes, vae_ids.codes)


# ------------------------------------------------------------------ collisions

HAND = np.array([[0, 1], [0, 1], [1, 0], [1, 1], [0, 1], [2, 2]])


def test_collision_stats_exact():
    st = collision_stats(HAND, [3, 4])
    assert st == {
        "num_items": 6,
        "num_unique": 4,
        "collision_rate": 0.5,
        "codebook_usage": [1.0, 0.75],
        "max_group": 3,
    }
    assert collision_stats(np.array([[0], [1]]))["collision_rate"] == 0.0


def test_resolve_extra_level():
    codes, st = resolve_collisions(HAND, codebook_sizes=[3, 4])
    np.testing.assert_array_equal(codes[:, :2], HAND)
    assert codes[:, 2].tolist() == [0, 1, 0, 0, 2, 0]
    assert st["codebook_sizes"] == [3, 4, 3] and st["extra_level"]
    assert st["collision_rate"] == 0.5  # reported before resolution
    assert _unique_rows(codes) and codes.dtype == np.int32


def test_resolve_last_level_balance():
    codes, st = resolve_collisions(HAND, method="last_level_balance", codebook_sizes=[3, 4])
    assert codes[:, 1].tolist() == [1, 0, 0, 1, 2, 2]  # lowest free codes, first item kept
    assert st["codebook_sizes"] == [3, 4] and not st["extra_level"]
    dist = np.zeros((6, 4))
    dist[1] = [5, 5, 5, 0]  # item 1 prefers code 3
    dist[4] = [0, 5, 5, 5]  # item 4 prefers code 0
    codes, _ = resolve_collisions(
        HAND, method="last_level_balance", codebook_sizes=[3, 4], last_level_distances=dist
    )
    assert codes[:, 1].tolist() == [1, 3, 0, 1, 0, 2]
    assert _unique_rows(codes)
    with pytest.raises(ValueError, match="extra_level"):
        resolve_collisions(
            np.zeros((3, 2), int), method="last_level_balance", codebook_sizes=[1, 2]
        )


def test_resolve_without_collisions_is_identity():
    codes = np.array([[0, 1], [1, 0]])
    new, st = resolve_collisions(codes)
    np.testing.assert_array_equal(new, codes)
    assert st["max_group"] == 1 and not st["extra_level"]


# ------------------------------------------------------------------ files and the dataclass


def test_code_vectors_sum_and_concat_ignore_extra_level():
    books = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0, 0.0], [0.0, 10.0]]))
    s = SemanticIds(np.array([[0, 1, 0], [0, 1, 1], [1, 0, 0]]), books, (2, 2, 2))
    np.testing.assert_array_equal(s.code_vectors(), [[1, 10], [1, 10], [10, 1]])
    np.testing.assert_array_equal(
        s.code_vectors(np.array([[1, 1]]), mode="concat"), [[0, 1, 0, 10]]
    )
    with pytest.raises(ValueError, match="outside"):
        SemanticIds(np.array([[0, 2]]), books, (2, 2))


def test_save_load_round_trip(tmp_path, vae_ids):
    out = tmp_path / "sids"
    save_semantic_ids(out, vae_ids)
    save_semantic_ids(out, vae_ids)  # overwriting keeps one clean directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sids"]
    back = load_semantic_ids(out)
    np.testing.assert_array_equal(back.codes, vae_ids.codes)
    for u, v in zip(back.codebooks, vae_ids.codebooks, strict=True):
        np.testing.assert_array_equal(u, v)
    assert back.codebook_sizes == vae_ids.codebook_sizes
    assert back.stats == json.loads(json.dumps(vae_ids.stats))
    assert np.load(out / "codes.npy", allow_pickle=False).dtype == np.int32
    with pytest.raises(FileNotFoundError, match="save_semantic_ids"):
        load_semantic_ids(tmp_path / "missing")


def test_item_embeddings_from_npy(tmp_path):
    good = tmp_path / "e.npy"
    np.save(good, np.ones((5, 3), np.float64))
    arr = item_embeddings_from_npy(good, 5)
    assert arr.shape == (5, 3) and arr.dtype == np.float32
    with pytest.raises(ValueError, match="5 rows but there are 4 items"):
        item_embeddings_from_npy(good, 4)
    with pytest.raises(FileNotFoundError):
        item_embeddings_from_npy(tmp_path / "nope.npy", 5)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        item_embeddings_from_npy(obj, 1)
