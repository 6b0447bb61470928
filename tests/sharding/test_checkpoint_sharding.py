"""A checkpoint written on one mesh restores onto another mesh's shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gti_jax.train.checkpoint import Checkpointer

# SPMD programs over 8 fake devices: minutes of compiling on 2 cores
pytestmark = pytest.mark.slow


def _mesh(rows, cols):
    return Mesh(np.array(jax.devices()).reshape(rows, cols), ("data", "model"))


def _values():
    return {
        "emb_vd": np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 7.0,
        "mlp_df": (np.arange(8 * 4, dtype=np.float32).reshape(8, 4) - 3).astype(jnp.bfloat16),
        "bias_d": np.linspace(-1, 1, 8, dtype=np.float32),
        "count": np.array(11, np.int32),
    }


SAVE_SPECS = {
    "emb_vd": P("data", "model"),
    "mlp_df": P("model", "data"),
    "bias_d": P("model"),
    "count": P(),
}

RESTORE_SPECS = {
    (8, 1): {
        "emb_vd": P("data", None),
        "mlp_df": P("data", None),
        "bias_d": P("data"),
        "count": P(),
    },
    (2, 4): {
        "emb_vd": P("model", "data"),
        "mlp_df": P(None, "model"),
        "bias_d": P(),
        "count": P(),
    },
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    mesh = _mesh(4, 2)
    state = {k: jax.device_put(v, NamedSharding(mesh, SAVE_SPECS[k])) for k, v in _values().items()}
    assert len(state["emb_vd"].sharding.device_set) == 8
    with Checkpointer(directory, keep=1, async_save=True) as ckpt:
        assert ckpt.save(3, state, {"mesh": [4, 2]})
        ckpt.wait()
    return directory


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
def test_restore_onto_another_mesh(saved, shape):
    mesh = _mesh(*shape)
    values = _values()
    target = {
        k: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=NamedSharding(mesh, RESTORE_SPECS[shape][k])
        )
        for k, v in values.items()
    }
    with Checkpointer(saved) as ckpt:
        restored, meta = ckpt.restore(target=target)
    assert meta == {"mesh": [4, 2]}
    for k, v in values.items():
        out = restored[k]
        want = target[k].sharding
        assert out.sharding.mesh.devices.shape == shape, k
        assert out.sharding.spec == want.spec, k
        assert out.sharding.is_equivalent_to(want, out.ndim), k
        assert out.dtype == v.dtype and out.shape == v.shape, k
        np.testing.assert_array_equal(np.asarray(out), v)
        # every device holds exactly its slice of the target layout
        for shard in out.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), v[shard.index])


def test_restore_with_array_targets_keeps_their_sharding(saved):
    mesh = _mesh(2, 4)
    target = {
        k: jax.device_put(
            jnp.zeros(v.shape, v.dtype), NamedSharding(mesh, RESTORE_SPECS[(2, 4)][k])
        )
        for k, v in _values().items()
    }
    with Checkpointer(saved) as ckpt:
        restored, _ = ckpt.restore(3, target=target)
    for k, v in _values().items():
        assert restored[k].sharding.is_equivalent_to(target[k].sharding, v.ndim)
        np.testing.assert_array_equal(np.asarray(restored[k]), v)
