"""GTI for any model (gti_jax.train.generic) on 8 fake CPU devices equals the one-device run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gti_jax.models.sharding import make_mesh
from gti_jax.train.config import GroundConfig
from gti_jax.train.generic import EmbeddingSpec, make_generic_ground_step
from gti_jax.train.ground import ground_optimizer
from gti_jax.vocab.resize import get_path

# SPMD programs over 8 fake devices: tens of seconds of compiling on 2 cores
pytestmark = pytest.mark.slow

V, D, T = 64, 16, 12
NEW = [60, 50, 61, 51, 62, 63]
OLD = np.setdiff1d(np.arange(V), NEW)
SPEC = EmbeddingSpec.maxtext(tied=False)


def _tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "params": {
            "token_embedder": {"embedding": jax.random.normal(k[0], (V, D))},
            "decoder": {
                "decoder_norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[1], (D,))},
                "logits_dense": {"kernel": jax.random.normal(k[2], (D, V)) / 4},
            },
        }
    }


def _loss_fn(tree, batch):
    p = tree["params"]
    x = p["token_embedder"]["embedding"][batch["ids"]] * p["decoder"]["decoder_norm"]["scale"]
    x = jnp.cumsum(x, axis=1) / jnp.arange(1, T + 1)[:, None]
    logp = jax.nn.log_softmax(x[:, :-1] @ p["decoder"]["logits_dense"]["kernel"])
    picked = jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked), jnp.float32(picked.size)


def _batch():
    ids = np.random.default_rng(0).integers(0, 50, size=(8, T)).astype(np.int32)
    ids[:, 3] = NEW + NEW[:2]
    ids[:, 8] = NEW[::-1] + NEW[:2]
    return {"ids": ids}


def _run(tree, mesh, accum):
    tx = ground_optimizer(GroundConfig(steps=3, lr=1e-2, warmup_steps=0))
    step = make_generic_ground_step(_loss_fn, tree, SPEC, NEW, tx, grad_accum=accum, mesh=mesh)
    rows, opt = step.init()
    losses = []
    for _ in range(3):
        rows, opt, m = step(rows, opt, _batch())
        losses.append(float(m["loss"]))
    return step, rows, losses


@pytest.mark.parametrize("accum", [1, 2])
def test_sharded_generic_step_equals_one_device(accum):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = _tree()
    sharded = {
        "params": {
            "token_embedder": {"embedding": NamedSharding(mesh, P("tensor", "fsdp"))},
            "decoder": {
                "decoder_norm": {"scale": NamedSharding(mesh, P())},
                "logits_dense": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
            },
        }
    }
    placed = jax.device_put(tree, sharded)
    _, ref_rows, ref_losses = _run(tree, None, 1)
    step, rows, losses = _run(placed, mesh, accum)
    # the same sums split over devices and micro-batches: float32 rounding only
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(rows.embed, ref_rows.embed, atol=1e-5)
    np.testing.assert_allclose(rows.head, ref_rows.head, atol=1e-5)
    assert isinstance(rows.embed.sharding, NamedSharding) and rows.embed.sharding.mesh == mesh
    # the held tree kept the caller's shardings
    held = get_path(step.frozen[0], SPEC.embed)
    assert held.sharding.spec == P("tensor", "fsdp")
    out = step.fold_back(placed, rows)
    table = get_path(out, SPEC.embed)
    assert table.sharding == placed["params"]["token_embedder"]["embedding"].sharding
    np.testing.assert_array_equal(
        np.asarray(table)[OLD], np.asarray(tree["params"]["token_embedder"]["embedding"])[OLD]
    )
    np.testing.assert_array_equal(np.asarray(table)[NEW], np.asarray(rows.embed))
    head = get_path(out, SPEC.head)
    assert head.sharding == placed["params"]["decoder"]["logits_dense"]["kernel"].sharding
    np.testing.assert_array_equal(np.asarray(head)[:, NEW].T, np.asarray(rows.head))
