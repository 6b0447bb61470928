"""Known answers for gti_jax.geometry and smoke checks (real PNG bytes) for gti_jax.plots."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gti_jax import geometry as dg
from gti_jax import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _orthonormal(k: int, d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return q.T  # [k, d], orthonormal rows


# ---------------------------------------------------------------- ranks and spectra


def test_rank_one_table_has_effective_and_stable_rank_one():
    rng = np.random.default_rng(0)
    table = np.outer(rng.normal(size=12), rng.normal(size=16))
    assert dg.effective_rank(table) == pytest.approx(1.0, abs=1e-6)
    assert dg.stable_rank(table) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_orthonormal_rows_reach_the_maximum_rank_k(k):
    table = _orthonormal(k, 10) * 3.0
    assert dg.effective_rank(table) == pytest.approx(k, abs=1e-9)
    assert dg.stable_rank(table) == pytest.approx(k, abs=1e-9)
    # k is the maximum for a rank-k matrix: a non-flat spectrum scores lower on both.
    skewed = table * np.linspace(1.0, 2.0, k)[:, None]
    if k > 1:
        assert dg.effective_rank(skewed) < k - 1e-3
        assert dg.stable_rank(skewed) < k - 1e-3


def test_effective_rank_accepts_singular_values_and_defines_zero():
    assert dg.effective_rank(np.array([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    assert dg.effective_rank(np.zeros((4, 3))) == 0.0
    assert dg.effective_rank(np.zeros((0,))) == 0.0
    assert dg.stable_rank(np.zeros((4, 3))) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        dg.effective_rank(np.array([1.0, -1.0]))


def test_singular_values_raw_versus_centered_and_jax_input():
    rng = np.random.default_rng(1)
    table = 5.0 + 0.01 * rng.normal(size=(8, 6))  # mean init + noise
    s = dg.singular_values(jnp.asarray(table, jnp.float32))
    assert s.dtype == np.float64 and s.shape == (6,)
    assert np.all(np.diff(s) <= 0)
    assert s[1] / s[0] < 1e-2  # raw: one dominant direction (the shared mean)
    sc = dg.singular_values(table, center=True)
    np.testing.assert_allclose(
        sc, np.linalg.svd(table - table.mean(0), compute_uv=False), rtol=1e-12
    )
    assert sc[1] / sc[0] > 0.1  # centered: the noise spreads over all directions


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        dg.singular_values(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        dg.stable_rank(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="at least 2"):
        dg.mean_pairwise_cosine(np.ones((1, 3)))


# ---------------------------------------------------------------- cosines


def test_cosine_matrix_matches_definition_and_zero_rows_give_zero():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    a[2] = 0.0
    got = dg.cosine_matrix(a, b)
    assert got.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            na, nb = np.linalg.norm(a[i]), np.linalg.norm(b[j])
            want = 0.0 if na == 0 else a[i] @ b[j] / (na * nb)
            assert got[i, j] == pytest.approx(want, abs=1e-12)
    self_cos = dg.cosine_matrix(a)
    assert self_cos[2, 2] == 0.0 and np.allclose(np.delete(np.diag(self_cos), 2), 1.0)
    with pytest.raises(ValueError, match="same width"):
        dg.cosine_matrix(a, np.ones((2, 3)))


def test_rows_identical_up_to_scale_have_mean_and_max_cos_one():
    base = np.random.default_rng(3).normal(size=7)
    table = np.stack([c * base for c in (0.5, 1.0, 2.0, 10.0)])
    assert dg.mean_pairwise_cosine(table) == pytest.approx(1.0, abs=1e-12)
    assert dg.max_pairwise_cosine(table) == pytest.approx(1.0, abs=1e-12)


def test_pairwise_means_and_max_equal_upper_triangle_of_dense_matrix(monkeypatch):
    rng = np.random.default_rng(4)
    table = rng.normal(size=(23, 5))
    table[4] = 0.0
    c = dg.cosine_matrix(table)[np.triu_indices(23, k=1)]
    assert dg.mean_pairwise_cosine(table) == pytest.approx(c.mean(), abs=1e-12)
    monkeypatch.setattr(dg, "_BLOCK_ELEMENTS", 50)  # force several row blocks
    assert dg.max_pairwise_cosine(table) == pytest.approx(c.max(), abs=1e-12)
    # Excludes the diagonal: orthogonal rows have max pairwise cosine 0, not 1.
    assert dg.max_pairwise_cosine(np.eye(4)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- nearest tokens


def _brute_force(q, table, k, exclude=()):
    c = dg.cosine_matrix(q, table)
    c[:, list(exclude)] = -np.inf
    ids = np.argsort(-c, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(c, ids, axis=1)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_nearest_tokens_chunked_equals_dense_brute_force(chunk_rows):
    rng = np.random.default_rng(5)
    table = rng.normal(size=(61, 6))
    q = rng.normal(size=(4, 6))
    exclude = [0, 3, 17, 60]
    ids, cos = dg.nearest_tokens(q, table, k=5, exclude_ids=exclude, chunk_rows=chunk_rows)
    want_ids, want_cos = _brute_force(q, table, 5, exclude)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(cos, want_cos, atol=1e-12)
    assert not np.isin(ids, exclude).any()
    # Without exclusion a query that is a table row finds itself first.
    ids, cos = dg.nearest_tokens(table[[10, 20]], table, k=3, chunk_rows=chunk_rows)
    np.testing.assert_array_equal(ids[:, 0], [10, 20])
    np.testing.assert_allclose(cos[:, 0], 1.0)
    np.testing.assert_array_equal(ids, _brute_force(table[[10, 20]], table, 3)[0])


def test_nearest_tokens_ties_prefer_smaller_ids_and_validates_k():
    table = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    ids, _ = dg.nearest_tokens(np.array([[2.0, 0.0]]), table, k=3, chunk_rows=2)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    with pytest.raises(ValueError, match="k must be in"):
        dg.nearest_tokens(table[:1], table, k=4, exclude_ids=[0, 1])
    with pytest.raises(ValueError, match="exclude_ids"):
        dg.nearest_tokens(table[:1], table, k=1, exclude_ids=[5])


# ---------------------------------------------------------------- RSA


def test_rsa_of_a_table_with_itself_is_one():
    x = np.random.default_rng(6).normal(size=(12, 5))
    r = dg.rsa(x, x)
    assert r["rsa_pearson"] == pytest.approx(1.0, abs=1e-12)
    assert r["rsa_spearman"] == pytest.approx(1.0, abs=1e-12)
    assert all(isinstance(v, float) for v in r.values())


def test_rsa_matches_numpy_pearson_and_scipy_spearman_with_ties():
    rng = np.random.default_rng(7)
    # Integer-valued code vectors (one-hot-ish semantic IDs) produce many tied cosines.
    codes = rng.integers(0, 2, size=(15, 4)).astype(float)
    emb = rng.normal(size=(15, 8))
    iu = np.triu_indices(15, k=1)
    x, y = dg.cosine_matrix(codes)[iu], dg.cosine_matrix(emb)[iu]
    assert np.unique(x).size < x.size / 3  # really has ties
    r = dg.rsa(codes, emb)
    assert r["rsa_pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert r["rsa_spearman"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_average_ranks_match_scipy_rankdata():
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 0.5])
    np.testing.assert_allclose(dg._average_ranks(x), scipy.stats.rankdata(x))


def test_rsa_is_nan_for_a_constant_side_and_checks_alignment():
    codes = np.random.default_rng(8).normal(size=(5, 3))
    r = dg.rsa(codes, np.ones((5, 4)))  # exact mean init: every cosine is 1
    assert np.isnan(r["rsa_pearson"]) and np.isnan(r["rsa_spearman"])
    with pytest.raises(ValueError, match="same rows"):
        dg.rsa(codes, np.ones((4, 4)))


# ---------------------------------------------------------------- summarize


def _table_with_new_rows(new_rows: np.ndarray, num_old: int = 40, seed: int = 9) -> np.ndarray:
    old = np.random.default_rng(seed).normal(size=(num_old, new_rows.shape[1]))
    return np.concatenate([old, new_rows])


def test_summarize_mean_init_collapses_and_random_does_not():
    rng = np.random.default_rng(10)
    d, n = 16, 12
    old = rng.normal(size=(40, d))
    mean_rows = old.mean(0) + 1e-6 * rng.normal(size=(n, d))
    new_ids = np.arange(40, 40 + n)
    codebook = rng.normal(size=(n, 4))
    words = {i: f"tok{i}" for i in range(40 + n)}

    collapsed = dg.summarize(
        np.concatenate([old, mean_rows]), new_ids, codebook=codebook, decode=words.__getitem__
    )
    spread = dg.summarize(np.concatenate([old, rng.normal(size=(n, d))]), new_ids)

    assert collapsed["effective_rank"] < 1.01
    assert collapsed["stable_rank"] < 1.001
    assert collapsed["mean_cos"] > 0.999
    assert spread["effective_rank"] > 0.6 * n
    assert spread["mean_cos"] < 0.3
    assert collapsed["old_effective_rank"] > 0.6 * d
    assert collapsed["num_new"] == n and len(collapsed["singular_values"]) == min(n, d)

    # JSON-serialisable with plain Python floats.
    back = json.loads(json.dumps(collapsed, allow_nan=False))
    assert back["num_new"] == n
    assert all(type(v) is float for v in collapsed["singular_values"])
    assert isinstance(collapsed["rsa_pearson"], float)
    assert "rsa_pearson" not in spread

    # Neighbours are old rows, decoded, best first; mean init gives every new token the same.
    assert 1 <= len(collapsed["nearest"]) <= 20
    first = collapsed["nearest"][0]
    assert first["id"] in new_ids.tolist()
    nb = first["neighbors"]
    assert len(nb) == 5 and all(x["id"] < 40 for x in nb)
    assert [x["text"] for x in nb] == [f"tok{x['id']}" for x in nb]
    assert [x["cos"] for x in nb] == sorted((x["cos"] for x in nb), reverse=True)
    assert len({tuple(x["id"] for x in e["neighbors"]) for e in collapsed["nearest"]}) == 1
    assert "text" not in spread["nearest"][0]["neighbors"][0]


def test_summarize_rsa_recovers_structure_and_none_when_undefined():
    rng = np.random.default_rng(11)
    codes = rng.normal(size=(10, 6))
    grounded = _table_with_new_rows(codes @ rng.normal(size=(6, 6)) * 0.01 + codes)
    out = dg.summarize(grounded, np.arange(40, 50), codebook=codes, rsa_sample=8)
    assert out["rsa_pearson"] > 0.8 and out["rsa_spearman"] > 0.8
    exact_mean = _table_with_new_rows(np.ones((10, 6)))
    out = dg.summarize(exact_mean, np.arange(40, 50), codebook=codes)
    assert out["rsa_pearson"] is None and out["rsa_spearman"] is None
    json.dumps(out, allow_nan=False)


def test_summarize_old_ids_and_bad_input():
    table = _table_with_new_rows(np.random.default_rng(12).normal(size=(4, 5)), num_old=8)
    out = dg.summarize(table, [8, 9, 10, 11], old_ids=[0, 1, 2], top_k=5)
    assert {x["id"] for x in out["nearest"][0]["neighbors"]} == {0, 1, 2}  # k capped at 3
    with pytest.raises(ValueError, match="duplicates"):
        dg.summarize(table, [8, 8, 9])
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        dg.summarize(table, [8, 12])
    with pytest.raises(ValueError, match="one row per new id"):
        dg.summarize(table, [8, 9], codebook=np.ones((3, 2)))
    with pytest.raises(ValueError, match="overlap"):
        dg.summarize(table, [8, 9], old_ids=[0, 8])


# ---------------------------------------------------------------- properties

_matrices = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 6)),
    elements=st.floats(-10, 10, allow_nan=False, width=64),
)


@settings(max_examples=40, deadline=None)
@given(_matrices)
def test_effective_rank_lies_between_one_and_rank(m):
    assume(np.linalg.norm(m) > 1e-6)
    er, sr = dg.effective_rank(m), dg.stable_rank(m)
    assert 1.0 <= er <= min(m.shape) + 1e-9
    assert 1.0 - 1e-9 <= sr <= min(m.shape) + 1e-9


@settings(max_examples=40, deadline=None)
@given(_matrices, st.floats(1e-3, 1e3))
def test_ranks_and_cosines_are_scale_invariant(m, c):
    assume(np.linalg.norm(m) > 1e-3)
    assert dg.effective_rank(c * m) == pytest.approx(dg.effective_rank(m), rel=1e-9)
    assert dg.stable_rank(c * m) == pytest.approx(dg.stable_rank(m), rel=1e-9)
    np.testing.assert_allclose(dg.cosine_matrix(c * m), dg.cosine_matrix(m), atol=1e-12)


# ---------------------------------------------------------------- plots


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(13)
    spectra = {
        "mean init": dg.singular_values(np.ones((6, 4)) + 1e-9 * rng.normal(size=(6, 4))),
        "gti": dg.singular_values(rng.normal(size=(6, 4))),
        "exact mean": [2.0, 0.0, 0.0],  # zeros are floored on the log axis
    }
    p = plots.plot_spectra(spectra, tmp_path / "a" / "spectra.png")
    assert p == tmp_path / "a" / "spectra.png"
    _assert_png(p)

    m = dg.cosine_matrix(rng.normal(size=(10, 4)))
    p = plots.plot_cosine_heatmap(
        m, tmp_path / "heat.png", split=5, labels=[f"t{i}" for i in range(10)]
    )
    _assert_png(p)
    p = plots.plot_cosine_heatmap(m, tmp_path / "ordered.png", order=np.arange(10)[::-1])
    _assert_png(p)
    p = plots.plot_cosine_heatmap(m[:, :3], tmp_path / "rect.png", split=2)
    _assert_png(p)

    p = plots.plot_loss_curves(
        {"gti": ([0, 1, 2], [3.0, 2.0, 1.0]), "sft": (np.arange(5), np.linspace(2, 1, 5))},
        tmp_path / "loss.png",
        log_y=True,
    )
    _assert_png(p)


def test_plots_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plots.plot_spectra({"x": [1.0]}, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="all zero"):
        plots.plot_spectra({"x": [0.0, 0.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="permutation"):
        plots.plot_cosine_heatmap(np.eye(3), tmp_path / "x.png", order=[0, 0, 1])
    with pytest.raises(ValueError, match="equal length"):
        plots.plot_loss_curves({"x": ([0, 1], [1.0])}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_importing_the_modules_does_not_import_matplotlib():
    code = "import sys, gti_jax.geometry, gti_jax.plots; sys.exit(int('matplotlib' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
