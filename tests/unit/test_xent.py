"""The vocabulary-chunked cross-entropy (gti_jax.train.xent) in both training steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gti_jax.train.config import ComputeConfig
from gti_jax.train.data import Batch, target_positions
from gti_jax.train.ground import make_ground_step, split_new_rows
from gti_jax.train.steps import model_lm_loss
from gti_jax.train.xent import (
    AUTO_CHUNK_BYTES,
    AUTO_LOGITS_BYTES,
    VocabHead,
    ce_sums,
    chunked_ce_sums,
    loss_chunk_size,
)
from tests.helpers.hf_models import tiny_gemma3, tiny_llama

VOCAB = 100  # 7 does not divide it (the last chunk overlaps), 20 does
NEW = range(88, 96)  # rows 96..99 are padding rows


def _model(kind: str, vocab: int = VOCAB):
    """A tiny model: gti_jax Llama (tied/untied) or Gemma 3 with soft-capped logits."""
    if kind.startswith("llama"):
        return tiny_llama(vocab, hidden_size=16, tied=kind == "llama_tied", seed=1)
    # soft cap 0.5: small, so the cap really bends these logits
    return tiny_gemma3(vocab, tied=kind == "gemma_tied", seed=1, final_logit_softcapping=0.5)


def _batch(with_targets: bool, seed: int = 0, b: int = 4, t: int = 10) -> Batch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, NEW.stop, size=(b, t)).astype(np.int32)
    ids[:, 2] = rng.integers(NEW.start, NEW.stop, size=b)
    ids[:, -1] = rng.integers(NEW.start, NEW.stop, size=b)
    ids[0, -3] = VOCAB - 1  # a target in the overlapped last chunk (a padding row's column)
    mask = np.zeros((b, t), np.float32)
    mask[:, 5:] = 1.0
    targets = target_positions(list(mask), t, 5) if with_targets else None
    return Batch(ids, mask, np.ones((b, t), np.int32), targets)


# Float32 tolerance: chunking changes only the order in which exp(z - max) terms are added
# (and by which running maximum they are shifted), so sums differ by a few ulps of the
# logsumexp (|loss| ~ 5, eps 1.2e-7 -> ~1e-6), gradients by the same relative amount.
RTOL, ATOL = 2e-5, 2e-6


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def test_chunk_size_rule():
    # Automatic: unchunked up to AUTO_LOGITS_BYTES of float32 logits, chunked past it.
    v = 50_000
    n_at = AUTO_LOGITS_BYTES // (4 * v)
    assert loss_chunk_size(n_at, v) == 0
    c = loss_chunk_size(n_at + 1, v)
    assert 0 < c < v and c % 128 == 0 and (n_at + 1) * c * 4 <= AUTO_CHUNK_BYTES
    assert loss_chunk_size(10**6, v) == 512  # floor on the width
    # Explicit widths; one that covers the vocabulary is the unchunked loss.
    assert loss_chunk_size(8, v, 4096) == 4096
    assert loss_chunk_size(8, v, v) == 0
    with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
        loss_chunk_size(8, v, -1)


@pytest.mark.parametrize("chunk", [7, 20])
def test_chunked_sums_equal_direct_sums(chunk):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((VOCAB, 8)), jnp.float32) * 3
    targets = jnp.asarray(rng.integers(0, VOCAB, (3, 5)))
    targets = targets.at[0, 0].set(VOCAB - 1).at[0, 1].set(0)
    weights = jnp.asarray(rng.random((3, 5)) > 0.3, jnp.float32)
    cap = lambda z: 4.0 * jnp.tanh(z / 4.0)  # noqa: E731

    def direct(h, table):
        return ce_sums(cap(h @ table.T), targets, weights)

    def chunked(h, table):
        cols = lambda s, n: jax.lax.dynamic_slice_in_dim(table, s, n)  # noqa: E731
        return chunked_ce_sums(h, targets, weights, VocabHead(cols, VOCAB, cap), chunk)

    _close(jax.jit(direct)(h, table), jax.jit(chunked)(h, table))
    grad = lambda f: jax.jit(jax.grad(lambda *a: f(*a)[0], argnums=(0, 1)))(h, table)  # noqa: E731
    _close(grad(direct), grad(chunked))


# Each case compiles a loss and its gradient twice (seconds on 2 cores): the fast lane keeps
# a tied, a soft-capped untied and a no-targets case; the full suite runs all five.
@pytest.mark.parametrize(
    "kind, with_targets",
    [
        ("llama_tied", True),
        pytest.param("llama_untied", True, marks=pytest.mark.slow),
        pytest.param("gemma_tied", True, marks=pytest.mark.slow),
        ("gemma_untied", True),
        ("llama_untied", False),  # no Batch.targets: every position's logits
    ],
)
def test_sft_loss_and_gradients_equal_unchunked(kind, with_targets):
    graphdef, state = nnx.split(_model(kind))
    batch = jax.tree.map(jnp.asarray, _batch(with_targets))

    def loss(state, chunk):
        s, n = model_lm_loss(nnx.merge(graphdef, state), batch, loss_chunk=chunk)
        return s / n

    # jit: one compilation each instead of one per primitive in eager mode.
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base, base_grad = value_and_grad(state, 0)  # below the threshold: unchunked
    assert base_grad["embed"]["embedding"][...].any()
    value, grad = value_and_grad(state, 7)  # 7 does not divide 100: overlap too
    _close(base, value)
    _close(base_grad, grad)


# two grounding-step compiles per case (~8 s on 2 cores): the fast lane keeps the soft-capped,
# untied one
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("llama_tied", marks=pytest.mark.slow),
        pytest.param("llama_untied", marks=pytest.mark.slow),
        "gemma_untied",
    ],
)
def test_ground_step_equal_unchunked(kind):
    """One SGD step (lr 1) moves the rows by minus the gradient: equal rows after the step
    mean equal gradients; the step's loss and the evaluation loss agree too."""
    model = _model(kind)
    tied = model.config.tie_word_embeddings
    graphdef, state = nnx.split(model)
    batch = _batch(True)
    out = {}
    for chunk in (0, 7):
        step = make_ground_step(
            graphdef, state, NEW, optax.sgd(1.0), tied=tied, compute=ComputeConfig(loss_chunk=chunk)
        )
        params, opt = step.init(split_new_rows(state, NEW, tied=tied))
        evaluated = step.loss(params, batch)
        params, _, metrics = step(params, opt, batch)
        out[chunk] = (params, metrics["loss"], metrics["grad_norm"], evaluated)
    _close(out[0], out[7])
    assert float(out[0][2]) > 0


def test_chunked_step_memory_is_bounded_by_one_chunk():
    """The compiled grounding step's working memory (XLA's temp buffers): unchunked it holds
    [targets, V] logits several times over; chunked, about one [targets, C] chunk."""
    vocab, chunk, b, t = 32_768, 1_024, 2, 65
    model = tiny_llama(vocab, hidden_size=16, tied=True, seed=0)
    graphdef, state = nnx.split(model)
    new = range(vocab - 64, vocab)
    ids = np.random.default_rng(0).integers(0, vocab - 64, (b, t)).astype(np.int32)
    ids[:, -1] = vocab - 1
    batch = Batch(ids, np.ones((b, t), np.float32), np.ones((b, t), np.int32), None)
    targets = b * (t - 1)
    temps = {}
    for c in (0, chunk):
        step = make_ground_step(
            graphdef, state, new, optax.sgd(1.0), tied=True, compute=ComputeConfig(loss_chunk=c)
        )
        params, opt = step.init(split_new_rows(state, new, tied=True))
        lowered = step.lower(
            params, step.frozen_state, batch, step.prefix_for(batch), opt_state=opt
        )
        temps[c] = lowered.compile().memory_analysis().temp_size_in_bytes
    full_logits, chunk_logits = targets * vocab * 4, targets * chunk * 4  # 16 MiB, 0.5 MiB
    assert temps[0] >= full_logits  # the unchunked step really materializes the logits
    # Margin: forward keeps a chunk's logits and exponentials, the backward their cotangents
    # (about 3 chunk-sized buffers), plus the tiny model's activations; 4 chunks covers it.
    assert temps[chunk] <= 4 * chunk_logits, (temps, chunk_logits)
