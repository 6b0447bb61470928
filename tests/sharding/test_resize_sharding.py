"""resize_vocab on 8 fake CPU devices: shardings survive, values equal the unsharded result."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gti_jax.vocab import resize as R
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab


def _mesh(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), ("x", "y"))


CASES = [
    # mesh, embedding spec, head spec (a [D, V] kernel), rows, new tokens
    ((8, 1), P("x", None), P(None, "x"), 64, 10),  # vocab axis sharded 8 ways
    ((4, 2), P("x", "y"), P("y", "x"), 64, 9),  # vocab on x, model dim on y
    ((4, 2), P(None, "y"), P("y", None), 60, 7),  # model axis only
    ((4, 2), P(("x", "y"), None), None, 48, 3),  # vocab over both axes, tied
]


@pytest.mark.parametrize("mesh_shape, e_spec, h_spec, rows, new", CASES)
@pytest.mark.parametrize("init", ["mean", "mean_cov"])
def test_sharded_equals_unsharded_and_keeps_sharding(mesh_shape, e_spec, h_spec, rows, new, init):
    mesh = _mesh(mesh_shape)
    rng = np.random.default_rng(0)
    dim = 16
    e = rng.standard_normal((rows, dim)).astype(np.float32)
    h = rng.standard_normal((dim, rows)).astype(np.float32)
    spec = EmbeddingSpec(("e",), None if h_spec is None else ("h",), "dv")
    host = {"e": e} if h_spec is None else {"e": e, "h": h}
    sharded = {"e": jax.device_put(e, NamedSharding(mesh, e_spec))}
    if h_spec is not None:
        sharded["h"] = jax.device_put(h, NamedSharding(mesh, h_spec))

    key = jax.random.key(7)
    ref = resize_vocab(host, spec, rows + new, init, key, pad_to_multiple_of=1)
    out = resize_vocab(sharded, spec, rows + new, init, key, pad_to_multiple_of=1)
    for name, arr in out.items():
        assert isinstance(arr.sharding, NamedSharding)
        assert arr.sharding.spec == sharded[name].sharding.spec
        assert arr.sharding.mesh.shape == mesh.shape
        # the vocabulary axis is padded so it divides its shards
        axis = 1 if name == "h" else 0
        names = arr.sharding.spec[axis] if len(arr.sharding.spec) > axis else None
        names = () if names is None else (names,) if isinstance(names, str) else names
        assert arr.shape[axis] % int(np.prod([mesh.shape[n] for n in names])) == 0
        want = np.asarray(ref[name])
        got = np.asarray(arr)
        n = min(got.shape[axis], want.shape[axis])
        sl = (slice(None), slice(0, n)) if axis else (slice(0, n),)
        # mean: same reduction, tiny reordering; mean_cov: an eigendecomposition of a
        # covariance summed in another order, so float32 round-off is larger
        tol = 1e-6 if init == "mean" else 1e-4
        np.testing.assert_allclose(got[sl], want[sl], rtol=1e-5, atol=tol)
        old = host[name]
        keep = (slice(None), slice(0, rows)) if axis else (slice(0, rows),)
        np.testing.assert_array_equal(got[keep], old)  # old rows bit for bit


def test_never_gathers_the_table_onto_one_device():
    """The compiled program moves shards around but never materializes the whole table."""
    mesh = _mesh((4, 2))
    rows, dim = 1024, 64
    e = jax.device_put(
        np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32),
        NamedSharding(mesh, P("x", "y")),
    )
    out = resize_vocab({"e": e}, EmbeddingSpec(("e",)), rows + 100, "mean_cov")
    plan = R.plan_resize(rows, rows, rows + 100, pad_to_multiple_of=4)
    assert out["e"].shape == (plan.new_num_rows, dim)
    fn = R._compiled(plan, R._named_initializer("mean_cov", ()), ("vd",), (e.sharding,), False)
    hlo = fn.lower(jax.random.key(0), (e,), None).compile().as_text()
    biggest = 0
    for m in re.finditer(r"= f32\[([\d,]+)\][^ ]* all-gather", hlo):
        biggest = max(biggest, int(np.prod([int(d) for d in m.group(1).split(",")])))
    assert biggest < rows * dim // 2, f"an all-gather of {biggest} elements (table: {rows * dim})"
    # each device holds only its shard of the result
    shard = out["e"].addressable_shards[0].data
    assert shard.shape == (plan.new_num_rows // 4, dim // 2)
