"""resize_vocab on 8 fake CPU devices: shardings survive, values equal the unsharded result."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gti_jax.vocab import resize as R
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab

# SPMD programs over 8 fake devices: minutes of compiling on 2 cores
pytestmark = pytest.mark.slow


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


# Every collective XLA may emit (async ones as "-start"/"-done" pairs: the "-done" is counted).
_COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
    "reduce-scatter",
)
_INSTR = re.compile(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s(?P<op>[a-z][a-z\-]*)\(")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """``(opcode, elements)`` of each collective in compiled HLO text, any dtype; a tuple
    result counts all its elements (what lands on one device)."""
    out = []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m is None or m.group("op").endswith("-start"):
            continue
        op = m.group("op").removesuffix("-done")
        if op not in _COLLECTIVES:
            continue
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d]))
            for dims in _SHAPE.findall(m.group("type"))
        ]
        out.append((op, sum(sizes)))
    return out


def _assert_no_gather(hlo: str, rows: int, dim: int, vocab_shards: int) -> None:
    """No collective brings a device more than one vocabulary shard's rows (all columns) of a
    [rows, dim] table: the vocabulary axis is never gathered."""
    found = _collectives(hlo)
    assert found, "no collectives at all: is the table sharded?"
    limit = rows * dim // vocab_shards
    too_big = [(op, n) for op, n in found if n > limit]
    assert not too_big, f"collectives over {limit} elements (table: {rows * dim}): {too_big}"


def _table(mesh, rows, dim, spec, seed):
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return jax.device_put(x, NamedSharding(mesh, spec))


@pytest.mark.parametrize("init", ["mean", "mean_cov"])
def test_never_gathers_the_table_onto_one_device(init):
    """The compiled program moves shards around but never gathers the vocabulary axis of the
    embedding or of the untied head, with any collective."""
    mesh = _mesh((4, 2))
    rows, dim = 1024, 64
    e = _table(mesh, rows, dim, P("x", "y"), 0)
    h = _table(mesh, dim, rows, P("y", "x"), 1)  # untied head [D, V]: vocabulary on axis 1
    spec = EmbeddingSpec(("e",), ("h",), "dv")
    out = resize_vocab({"e": e, "h": h}, spec, rows + 100, init)
    plan = R.plan_resize(rows, rows, rows + 100, pad_to_multiple_of=4)
    assert out["e"].shape == (plan.new_num_rows, dim) and out["h"].shape == (dim, plan.new_num_rows)
    fn = R._compiled(
        plan, R._named_initializer(init, ()), ("vd", "dv"), (e.sharding, h.sharding), False
    )
    hlo = fn.lower(jax.random.key(0), (e, h), None).compile().as_text()
    _assert_no_gather(hlo, rows, dim, vocab_shards=4)
    # each device holds only its shard of the results
    assert out["e"].addressable_shards[0].data.shape == (plan.new_num_rows // 4, dim // 2)
    assert out["h"].addressable_shards[0].data.shape == (dim // 2, plan.new_num_rows // 4)


@pytest.mark.parametrize("kind", ["replicate", "gather_rows", "all_reduce"])
def test_gather_check_catches_a_gathering_program(kind):
    """Positive control: programs that do bring the table onto every device fail the check
    above, whichever collective they use (an all-gather, or an all-reduce of zero-padded
    shards, which a check for all-gathers alone would miss)."""
    mesh = _mesh((4, 2))
    rows, dim = 1024, 64
    e = _table(mesh, rows, dim, P("x", "y"), 0)

    def by_all_reduce(block):  # each device writes its block into zeros; the sum is the table
        i, j = jax.lax.axis_index("x"), jax.lax.axis_index("y")
        start = (i * block.shape[0], j * block.shape[1])
        full = jax.lax.dynamic_update_slice(jnp.zeros((rows, dim), block.dtype), block, start)
        return jax.lax.psum(full, ("x", "y"))

    def gathering(x):
        if kind == "all_reduce":
            x = jax.shard_map(by_all_reduce, mesh=mesh, in_specs=P("x", "y"), out_specs=P())(x)
        else:
            spec = P() if kind == "replicate" else P(None, "y")  # all rows on every device
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        new = jnp.tile(x.mean(0, keepdims=True), (4, 1))  # 4 rows: divides the shards
        return jnp.concatenate([x, new], 0)

    hlo = jax.jit(gathering, out_shardings=e.sharding).lower(e).compile().as_text()
    with pytest.raises(AssertionError, match="collectives over"):
        _assert_no_gather(hlo, rows, dim, vocab_shards=4)
