"""Grounding and fine-tuning steps on 8 fake CPU devices equal the single-device steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gti_jax.models import LlamaForCausalLM
from gti_jax.models.sharding import make_mesh, state_shardings
from gti_jax.train.config import GroundConfig, SFTConfig
from gti_jax.train.data import Batch, target_positions
from gti_jax.train.ground import ground_optimizer, make_ground_step, split_new_rows
from gti_jax.train.lora import apply_lora
from gti_jax.train.steps import make_sft_step, sft_optimizer
from tests.helpers.hf_models import tiny_llama

# SPMD programs over 8 fake devices: minutes of compiling on 2 cores
pytestmark = pytest.mark.slow

VOCAB = 64
NEW = range(56, 62)
MESHES = {"2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}, "8x1": {"fsdp": 8, "tensor": 1}}


def _model(tied: bool) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, hidden_size=32, heads=4, kv_heads=2, tied=tied)


def _batch(seed: int, targets: bool = False) -> Batch:
    """Sharded runs list target positions (logits there only); references use every position.

    New tokens come after a shared 16-token prompt, so sharded grounding also runs its
    gradient-free prefix (the references differentiate every position).
    """
    rng = np.random.default_rng(seed)
    t = 36
    ids = rng.integers(0, NEW.start, size=(8, t)).astype(np.int32)
    ids[:, 18] = rng.integers(NEW.start, NEW.stop, size=8)
    ids[:, -1] = rng.integers(NEW.start, NEW.stop, size=8)
    mask = np.zeros((8, t), np.float32)
    mask[:, 26:] = 1.0
    mask[3, 26:30] = 0.0  # rows with different numbers of targets
    pos = target_positions(list(mask), t, 16) if targets else None
    return Batch(ids, mask, np.ones((8, t), np.int32), pos)


@functools.cache
def _ref_ground(tied):
    return _run_ground(None, tied, 1)[1:]


def _run_ground(mesh, tied, accum):
    graphdef, state = nnx.split(_model(tied))
    tx = ground_optimizer(GroundConfig(steps=4, lr=1e-3, warmup_steps=0))
    step = make_ground_step(
        graphdef,
        state,
        NEW,
        tx,
        tied=tied,
        grad_accum=accum,
        mesh=mesh,
        split_prefix=mesh is not None,
    )
    params, opt = step.init(split_new_rows(state, NEW, tied=tied))
    losses, first_mu = [], None
    for s in range(2):
        assert step.prefix_for(_batch(s)) == (16 if mesh is not None else 0)
        params, opt, m = step(params, opt, _batch(s, targets=mesh is not None))
        losses.append(float(m["loss"]))
        if first_mu is None:  # Adam's first moment after one step: 0.1 x the gradient
            first_mu = jax.tree.map(np.asarray, _adam_states(opt)[0].mu)
    return step, params, opt, losses, first_mu


def _adam_states(opt):
    return [
        x
        for x in jax.tree.leaves(opt, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)
    ]


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("tied", [True, False])
def test_ground_step_sharded_equals_single_device(mesh_name, tied):
    mesh = make_mesh(MESHES[mesh_name])
    _, _, ref_losses, ref_mu = _ref_ground(tied)
    step, params, opt, losses, mu = _run_ground(mesh, tied, 2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # the gradient, read before Adam's normalization (see _GRAD_TOL)
    _close_grads(mu, ref_mu)
    rows = NamedSharding(mesh, P(None, "fsdp"))  # new rows sharded on the embedding dim
    for x in jax.tree.leaves(params):
        assert x.sharding.is_equivalent_to(rows, 2)
    adam = _adam_states(opt)
    moments = jax.tree.leaves((adam[0].mu, adam[0].nu))
    assert len(moments) == (2 if tied else 4)
    for x in moments:  # Adam moments are placed like their rows
        assert x.sharding.is_equivalent_to(rows, 2)
    table = step.frozen_state["embed"]["embedding"].get_value()
    want = P("tensor", "fsdp") if mesh_name == "2x2x2" else P(None, "fsdp")
    assert table.sharding.is_equivalent_to(NamedSharding(mesh, want), 2)
    assert step.traces == 1


# What float32 can promise for a sharded step against a single-device one: every gradient is
# a sum over the batch's 8 x 36 token positions, added in another order (and, with
# accumulation, in two halves), so its error is bounded by eps * (terms) relative to the
# gradient's own scale. AdamW's normalization divides each gradient by its own running
# size, which magnifies the rounding of near-zero gradients far past that bound (it failed
# once: 1 of 512 elements off by 1.3e-6 after two steps), and so does comparing parameters,
# whose rounding hides small updates; so the equality is checked on the gradients, which the
# optimizer below keeps as its state (and applies as plain SGD).
_GRAD_TOL = np.finfo(np.float32).eps * 8 * 36


def _sgd_keeping_grads(lr: float = 1e-2) -> optax.GradientTransformation:
    """Plain SGD whose state is the last gradient it was given."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda g, state, params=None: (jax.tree.map(lambda x: -lr * x, g), g),
    )


def _close_grads(got, want):
    """Each gradient leaf equals the reference within _GRAD_TOL of its largest entry."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.abs(b).max()
        err = np.abs(a - b).max()
        assert err <= _GRAD_TOL * scale, f"gradient off by {err:.3g} of {scale:.3g}"


def _run_sft(mesh, lora, accum, tx=None):
    model = _model(False)
    if lora:
        model = apply_lora(
            model, rank=4, alpha=8.0, dropout=0.1, targets=("q", "o", "up"), rngs=nnx.Rngs(3)
        )
    tx = tx or sft_optimizer(SFTConfig(steps=4, lr=1e-3, warmup_steps=0))
    step = make_sft_step(model, tx, lora=lora, grad_accum=accum, mesh=mesh)
    state = step.init(model)
    losses, grads = [], []
    for s in range(2):
        state, m = step(state, _batch(s, targets=mesh is not None), jax.random.key(s))
        losses.append(float(m["loss"]))
        grads.append(jax.tree.map(np.asarray, state.opt_state))  # with _sgd_keeping_grads
    return step, state, losses, grads


@functools.cache
def _ref_sft_grads(lora):
    return _run_sft(None, lora, 1, _sgd_keeping_grads())[1:]


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("lora", [False, True])
def test_sft_step_sharded_equals_single_device(mesh_name, lora):
    mesh = make_mesh(MESHES[mesh_name])
    _, ref_losses, ref_grads = _ref_sft_grads(lora)
    step, state, losses, grads = _run_sft(mesh, lora, 1 if lora else 2, _sgd_keeping_grads())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):  # both steps
        _close_grads(got, want)
    want = state_shardings(state.trainable, mesh)
    for x, sh in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(want), strict=True):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
    assert step.traces == 1
