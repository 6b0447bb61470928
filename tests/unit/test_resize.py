"""resize_vocab and the initializers: property tests over shapes, dtypes, layouts and trees."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from gti_jax.vocab import initializers as inits
from gti_jax.vocab.resize import EmbeddingSpec, ResizeError, plan_resize, resize_vocab

DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}


def _random(rng, shape, dtype):
    return (rng.standard_normal(shape) * 0.5 + 0.1).astype(dtype)


def _make_tree(kind, rng, num_rows, dim, dtype, tied, layout, bias):
    """A parameter tree of one kind plus its spec and the raw arrays."""
    embed = _random(rng, (num_rows, dim), dtype)
    head = (
        None
        if tied
        else _random(rng, (num_rows, dim) if layout == "vd" else (dim, num_rows), dtype)
    )
    b = _random(rng, (num_rows,), dtype) if bias else None
    other = _random(rng, (3, dim), dtype)
    if kind == "hf":
        tree = {"model.embed_tokens.weight": embed, "model.norm.weight": other}
        if head is not None:
            tree["lm_head.weight"] = head if layout == "vd" else head.T.copy()
        if b is not None:
            tree["lm_head.bias"] = b
        spec = EmbeddingSpec.hf(tied=tied, bias=bias)
        if head is not None:
            head = tree["lm_head.weight"]
        return tree, spec, embed, head, b, "vd"
    tree = {
        "params": {"token_embedder": {"embedding": embed}, "decoder": {"norm": {"scale": other}}}
    }
    spec_head = None
    if head is not None:
        tree["params"]["decoder"]["logits_dense"] = {"kernel": head}
        spec_head = ("params", "decoder", "logits_dense", "kernel")
    spec_bias = None
    if b is not None:
        tree["params"]["decoder"]["logits_bias"] = b
        spec_bias = ("params", "decoder", "logits_bias")
    spec = EmbeddingSpec(("params", "token_embedder", "embedding"), spec_head, layout, spec_bias)
    if kind == "nnx":
        tree = nnx.State(jax.tree.map(lambda x: nnx.Param(jnp.asarray(x)), tree))
    return tree, spec, embed, head, b, layout


def _get(tree, path):
    node = tree
    for k in path:
        node = node[k]
    return np.asarray(node.get_value() if hasattr(node, "get_value") else node)


def _rows(x, layout):
    return x.T if layout == "dv" else x


def _bits(x):
    return np.asarray(x).view(np.uint16 if np.asarray(x).dtype.itemsize == 2 else np.uint32)


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=hst.sampled_from(["dict", "nnx", "hf"]),
    num_tokens=hst.integers(2, 24),
    spare=hst.integers(0, 6),
    num_new=hst.integers(0, 10),
    dim=hst.integers(1, 6),
    dtype=hst.sampled_from(list(DTYPES)),
    tied=hst.booleans(),
    layout=hst.sampled_from(["vd", "dv"]),
    bias=hst.booleans(),
    pad=hst.sampled_from([1, 4, 8]),
    init=hst.sampled_from(["mean", "description", "mean_noise", "normal", "mean_cov"]),
    seed=hst.integers(0, 2**16),
)
def test_resize_properties(
    kind, num_tokens, spare, num_new, dim, dtype, tied, layout, bias, pad, init, seed
):
    rng = np.random.default_rng(seed)
    num_rows = num_tokens + spare
    tree, spec, embed, head, b, layout = _make_tree(
        kind, rng, num_rows, dim, DTYPES[dtype], tied, layout, bias
    )
    desc = [list(rng.integers(0, num_tokens, size=rng.integers(1, 4))) for _ in range(num_new)]
    out = resize_vocab(
        tree,
        spec,
        num_tokens + num_new,
        init,
        jax.random.key(seed),
        num_tokens=num_tokens,
        pad_to_multiple_of=pad,
        description_ids=desc if init == "description" else None,
    )
    plan = plan_resize(num_rows, num_tokens, num_tokens + num_new, pad_to_multiple_of=pad)
    assert plan.new_num_rows >= num_tokens + num_new
    assert plan.new_num_rows == num_rows or plan.new_num_rows % pad == 0
    keep = np.r_[0:num_tokens, num_tokens + num_new : num_rows]  # old rows and untouched spare rows
    new = np.arange(num_tokens, num_tokens + num_new)

    e2 = _get(out, spec.embed)
    assert e2.shape == (plan.new_num_rows, dim) and e2.dtype == embed.dtype
    arrays = [(embed, e2, "vd")]
    if not tied:
        h2 = _get(out, spec.head)
        assert h2.dtype == head.dtype
        arrays.append((head, h2, layout))
    else:
        assert "lm_head.weight" not in (out if kind == "hf" else {})
    for old, res, lay in arrays:
        old_r, res_r = _rows(old, lay), _rows(res, lay)
        assert res_r.shape == (plan.new_num_rows, dim)
        np.testing.assert_array_equal(_bits(res_r[keep]), _bits(old_r[keep]))
        src = old_r[:num_tokens].astype(np.float64)
        if init == "mean" and num_new:
            want = np.broadcast_to(src.mean(0), (num_new, dim)).astype(old.dtype)
            np.testing.assert_allclose(
                res_r[new].astype(np.float64),
                want.astype(np.float64),
                rtol=1e-6 if dtype == "f32" else 2**-7,
                atol=1e-7,
            )
        if init == "description" and num_new:
            want = np.stack([src[d].mean(0) for d in desc]).astype(old.dtype)
            np.testing.assert_allclose(
                res_r[new].astype(np.float64),
                want.astype(np.float64),
                rtol=1e-6 if dtype == "f32" else 2**-7,
                atol=1e-7,
            )
        pad_rows = np.arange(max(num_rows, num_tokens + num_new), plan.new_num_rows)
        if pad_rows.size:
            want = src.mean(0).astype(old.dtype).astype(np.float64)
            np.testing.assert_allclose(
                res_r[pad_rows].astype(np.float64),
                np.broadcast_to(want, (pad_rows.size, dim)),
                rtol=1e-6 if dtype == "f32" else 2**-7,
                atol=1e-7,
            )
    if bias:
        b2 = _get(out, spec.bias)
        assert b2.shape == (plan.new_num_rows,)
        np.testing.assert_array_equal(_bits(b2[keep]), _bits(b[keep]))
    # every other leaf is returned as it was
    other = _get(
        out, ("model.norm.weight",) if kind == "hf" else ("params", "decoder", "norm", "scale")
    )
    np.testing.assert_array_equal(
        _bits(other),
        _bits(
            _get(
                tree,
                ("model.norm.weight",) if kind == "hf" else ("params", "decoder", "norm", "scale"),
            )
        ),
    )


def test_tree_kinds_agree():
    """The same request on a nested dict, an nnx.State and an HF dict gives the same rows."""
    rng = np.random.default_rng(0)
    results = []
    for kind in ("dict", "nnx", "hf"):
        tree, spec, *_ = _make_tree(
            kind, np.random.default_rng(0), 10, 4, np.float32, False, "vd", False
        )
        out = resize_vocab(tree, spec, 13, "mean_cov", jax.random.key(3), pad_to_multiple_of=8)
        results.append((_get(out, spec.embed), _get(out, spec.head)))
    for e, h in results[1:]:
        np.testing.assert_array_equal(e, results[0][0])
        np.testing.assert_array_equal(h, results[0][1])
    del rng


def test_nnx_state_keeps_variable_type_and_merges():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 4, rngs=rngs)
            self.lm_head = nnx.Linear(4, 10, use_bias=False, rngs=rngs)

    model = Tiny(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    out = resize_vocab(state, EmbeddingSpec.nnx_llama(tied=False), 12, pad_to_multiple_of=4)
    assert isinstance(out["embed"]["embedding"], nnx.Param)
    merged = nnx.merge(graphdef, out)
    assert merged.embed.embedding[...].shape == (12, 4)
    assert merged.lm_head.kernel[...].shape == (4, 12)
    np.testing.assert_array_equal(merged.embed.embedding[...][:10], model.embed.embedding[...])


def _stats_table(n=4000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    return (rng.standard_normal((n, d)) @ a + 2.0).astype(np.float32)


def test_mean_noise_statistics():
    old = _stats_table()
    rows = np.asarray(
        inits.mean_noise(std=0.3)(jax.random.key(0), inits.InitContext(jnp.asarray(old), 20000))
    )
    dev = rows - old.astype(np.float64).mean(0)
    assert abs(dev.std() - 0.3) < 0.01 and np.abs(dev.mean(0)).max() < 0.01
    rows = np.asarray(
        inits.mean_noise()(jax.random.key(0), inits.InitContext(jnp.asarray(old), 20000))
    )
    assert abs((rows - old.mean(0)).std() - 1 / np.sqrt(6)) < 0.01


def test_mean_cov_statistics_and_hf_scale():
    old = _stats_table()
    cov = np.cov(old.astype(np.float64), rowvar=False, bias=True)
    rows = np.asarray(
        inits.mean_cov()(jax.random.key(1), inits.InitContext(jnp.asarray(old), 40000))
    )
    np.testing.assert_allclose(rows.mean(0), old.mean(0), atol=0.05 * np.sqrt(np.diag(cov)).max())
    np.testing.assert_allclose(np.cov(rows, rowvar=False), cov, atol=0.05 * np.abs(cov).max())
    rows = np.asarray(
        inits.mean_cov(scale=0.25)(jax.random.key(1), inits.InitContext(jnp.asarray(old), 40000))
    )
    np.testing.assert_allclose(
        np.cov(rows, rowvar=False), 0.25 * cov, atol=0.05 * 0.25 * np.abs(cov).max()
    )
    hf = np.asarray(
        inits.mean_cov(hf_compat=True)(jax.random.key(1), inits.InitContext(jnp.asarray(old), 100))
    )
    spread = np.sqrt(np.diag(cov)).max()
    assert np.abs(hf - old.mean(0)).max() < 1e-3 * spread  # 1e-9 covariance: the mean in practice


def test_mean_cov_singular_covariance():
    """Fewer rows than dimensions: a singular covariance still factorizes (no NaN)."""
    old = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    rows = np.asarray(inits.mean_cov()(jax.random.key(0), inits.InitContext(jnp.asarray(old), 50)))
    assert np.isfinite(rows).all()
    # samples stay in the affine span of the old rows
    centered = old - old.mean(0)
    basis = np.linalg.svd(centered, full_matrices=False)[2][:2]
    resid = (rows - old.mean(0)) - (rows - old.mean(0)) @ basis.T @ basis
    assert np.abs(resid).max() < 1e-3


def test_normal_statistics():
    old = _stats_table()
    rows = np.asarray(
        inits.normal(std=0.02)(jax.random.key(0), inits.InitContext(jnp.asarray(old), 20000))
    )
    assert abs(rows.std() - 0.02) < 5e-4 and abs(rows.mean()) < 5e-4
    rows = np.asarray(inits.normal()(jax.random.key(0), inits.InitContext(jnp.asarray(old), 20000)))
    assert abs(rows.std() - old.std()) < 0.02 * old.std()


def test_custom_initializer_and_compile_once():
    traces = []

    def ones(key, ctx):
        traces.append(1)
        return jnp.ones((ctx.num_new, ctx.old.shape[1]))

    tree = {"e": np.zeros((8, 3), np.float32)}
    spec = EmbeddingSpec(embed=("e",))
    for _ in range(3):
        out = resize_vocab(tree, spec, 10, ones)
    np.testing.assert_array_equal(np.asarray(out["e"])[8:], 1.0)
    assert len(traces) == 1  # traced and compiled once for the same request


def test_random_inits_depend_on_key_only():
    tree = {"e": _stats_table(64, 4)}
    spec = EmbeddingSpec(embed=("e",))
    a = resize_vocab(tree, spec, 70, "mean_noise", jax.random.key(1))["e"]
    b = resize_vocab(tree, spec, 70, "mean_noise", jax.random.key(1))["e"]
    c = resize_vocab(tree, spec, 70, "mean_noise", jax.random.key(2))["e"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_untied_head_initialized_from_its_own_rows():
    rng = np.random.default_rng(0)
    tree = {
        "e": rng.standard_normal((6, 3)).astype(np.float32),
        "h": (rng.standard_normal((6, 3)) + 5).astype(np.float32),
    }
    out = resize_vocab(tree, EmbeddingSpec(("e",), ("h",)), 8, "mean")
    np.testing.assert_allclose(
        np.asarray(out["h"])[6:], np.broadcast_to(tree["h"].mean(0), (2, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(out["e"])[6:], np.broadcast_to(tree["e"].mean(0), (2, 3)), rtol=1e-6
    )


def test_spare_rows_used_first_and_no_growth():
    """Qwen-style padding: the table already has more rows than the tokenizer."""
    tree = {"e": np.arange(40, dtype=np.float32).reshape(10, 4)}
    out = resize_vocab(tree, EmbeddingSpec(("e",)), 9, "mean", num_tokens=7, pad_to_multiple_of=8)
    e = np.asarray(out["e"])
    assert e.shape == (10, 4)
    np.testing.assert_array_equal(e[:7], tree["e"][:7])
    np.testing.assert_array_equal(e[9:], tree["e"][9:])  # the spare row nobody needs is kept
    np.testing.assert_allclose(e[7:9], np.broadcast_to(tree["e"][:7].mean(0), (2, 4)))


def test_shrink_only_when_asked():
    tree = {"e": np.ones((10, 2), np.float32)}
    with pytest.raises(ResizeError, match="allow_shrink"):
        resize_vocab(tree, EmbeddingSpec(("e",)), 8)
    out = resize_vocab(tree, EmbeddingSpec(("e",)), 8, allow_shrink=True)
    assert out["e"].shape == (8, 2)
    # growing past the spare rows with allow_shrink trims to the rounded size
    out = resize_vocab(
        tree, EmbeddingSpec(("e",)), 7, num_tokens=6, allow_shrink=True, pad_to_multiple_of=4
    )
    assert out["e"].shape == (8, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spec=EmbeddingSpec(("nope",))), "not found"),
        (dict(spec=EmbeddingSpec(("e",), ("h",), "dv")), "head_layout='dv'"),
        (dict(num_tokens=11), "more tokens than the model has rows"),
        (dict(init="description"), "needs description_ids"),
        (dict(init="description", description_ids=[[1], []]), "empty descriptions"),
        (dict(init="description", description_ids=[[1]]), "one per new token"),
        (dict(init="description", description_ids=[[1], [10]]), "not old tokens"),
        (dict(init="bogus"), "unknown initializer"),
        (dict(init="normal", init_kwargs={"sdt": 1.0}), "bad arguments"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
    ],
)
def test_bad_requests_fail_before_work(kwargs, match):
    tree = {"e": np.ones((10, 2), np.float32), "h": np.ones((10, 2), np.float32)}
    args = dict(spec=EmbeddingSpec(("e",), ("h",)), new_num_tokens=12)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        resize_vocab(tree, **args)


def test_doc_example_plan():
    assert plan_resize(152064, 151667, 151767).new_num_rows == 152064
    assert plan_resize(152064, 151667, 152100, pad_to_multiple_of=128).new_num_rows == 152192
    assert list(plan_resize(10, 8, 11).new_ids) == [8, 9, 10]
