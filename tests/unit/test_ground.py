"""GTI grounding: only the new rows train (gti_jax.train.ground), and the masked loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gti_jax.models import LlamaForCausalLM
from gti_jax.train.config import GroundConfig
from gti_jax.train.data import Batch, target_positions
from gti_jax.train.ground import (
    GroundError,
    GroundParams,
    eval_loss,
    grad_free_prefix,
    ground_optimizer,
    join_new_rows,
    make_ground_step,
    shared_prefix,
    split_new_rows,
)
from gti_jax.train.steps import hidden_lm_loss, lr_schedule, masked_lm_loss
from tests.helpers.hf_models import tiny_llama

VOCAB, DIM = 64, 16
NEW = range(52, 60)  # rows 60..63 are padding rows that stay frozen


def _model(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, hidden_size=DIM, tied=tied, seed=seed)


def _batch(seed: int = 0, b: int = 4, t: int = 12) -> Batch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(b, t)).astype(np.int32)
    ids[:, 3] = rng.choice(np.arange(NEW.start, NEW.stop), size=b)  # new ids as inputs
    ids[:, -2] = np.arange(NEW.start, NEW.start + b)  # and as targets
    mask = np.zeros((b, t), np.float32)
    mask[:, 6:] = 1.0
    attn = np.ones((b, t), np.int32)
    attn[1, -1] = 0
    mask[1, -1] = 0
    return Batch(ids, mask, attn)


def _tx(steps=3, lr=1e-2, **kw):
    return ground_optimizer(GroundConfig(steps=steps, lr=lr, warmup_steps=0, **kw))


def _np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _flat(state):
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(state)
    }


def _adam_sizes(opt_state):
    sizes = []
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(node, optax.ScaleByAdamState):
            sizes.append(
                (
                    sum(x.size for x in jax.tree.leaves(node.mu)),
                    sum(x.size for x in jax.tree.leaves(node.nu)),
                )
            )
    return sizes


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("tied", [True, False])
def test_grounding_changes_only_new_rows(tied):
    model = _model(tied)
    graphdef, state = nnx.split(model)
    before = _flat(state)
    params = split_new_rows(state, NEW, tied=tied)
    assert (params.head is None) == tied
    step = make_ground_step(graphdef, state, NEW, _tx(weight_decay=0.1), tied=tied)
    params, opt_state = step.init(params)
    start = _np(params)
    for s in range(3):
        params, opt_state, metrics = step(params, opt_state, _batch(s))
    assert float(metrics["tokens"]) == 4 * 6 - 1
    # The frozen state is never updated.
    assert all(np.array_equal(before[k], v) for k, v in _flat(step.frozen_state).items())
    assert all(np.array_equal(before[k], v) for k, v in _flat(state).items())

    joined = _flat(join_new_rows(state, params, NEW, tied=tied))
    emb, head = "['embed']['embedding'].value", "['lm_head']['kernel'].value"
    assert set(joined) == set(before)
    for k, v in joined.items():
        if k not in (emb, head):
            assert np.array_equal(v, before[k]), k  # bitwise
    old = np.r_[0 : NEW.start, NEW.stop : VOCAB]
    assert np.array_equal(joined[emb][old], before[emb][old])
    assert not np.allclose(joined[emb][NEW.start : NEW.stop], before[emb][NEW.start : NEW.stop])
    np.testing.assert_array_equal(joined[emb][NEW.start : NEW.stop], params.embed)
    if tied:
        assert head not in joined
    else:
        assert np.array_equal(joined[head][:, old], before[head][:, old])
        new_cols = joined[head][:, NEW.start : NEW.stop]
        assert not np.allclose(new_cols, before[head][:, NEW.start : NEW.stop])
        assert not np.allclose(params.head, start.head)  # untied head rows are trained
        np.testing.assert_array_equal(new_cols, np.asarray(params.head).T)


@pytest.mark.parametrize("tied", [True, False])
def test_optimizer_state_holds_only_new_rows(tied):
    graphdef, state = nnx.split(_model(tied))
    params = split_new_rows(state, NEW, tied=tied)
    step = make_ground_step(graphdef, state, NEW, _tx(), tied=tied)
    params, opt_state = step.init(params)
    params, opt_state, _ = step(params, opt_state, _batch())
    per_moment = len(NEW) * DIM * (1 if tied else 2)
    assert _adam_sizes(opt_state) == [(per_moment, per_moment)]
    # Everything else in the optimizer state is scalar counters.
    total = sum(x.size for x in jax.tree.leaves(opt_state))
    assert total == 2 * per_moment + sum(1 for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0)


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("tied", [True, False])
def test_step_loss_equals_model_with_joined_rows(tied):
    model = _model(tied, seed=1)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(5)
    params = split_new_rows(state, NEW, tied=tied)
    params = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    step = make_ground_step(graphdef, state, NEW, _tx(), tied=tied)
    batch = _batch(3)
    s, n = step.loss(params, batch)
    joined = nnx.merge(graphdef, join_new_rows(state, params, NEW, tied=tied))
    logits = joined(jnp.asarray(batch.input_ids), attention_mask=jnp.asarray(batch.attention_mask))
    ref_s, ref_n = masked_lm_loss(
        logits, jnp.asarray(batch.input_ids), jnp.asarray(batch.loss_mask)
    )
    np.testing.assert_allclose(float(s / n), float(ref_s / ref_n), rtol=1e-6)
    assert float(n) == float(ref_n)
    assert eval_loss(graphdef, state, params, [batch, _batch(4)], NEW) == pytest.approx(
        (float(s) + float(step.loss(params, _batch(4))[0]))
        / (float(n) + float(step.loss(params, _batch(4))[1])),
        rel=1e-6,
    )


def _with_targets(batch: Batch, width: int = 8) -> Batch:
    t = batch.input_ids.shape[1]
    return batch._replace(targets=target_positions(list(batch.loss_mask), t, width))


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("tied", [True, False])
def test_target_positions_give_the_full_logits_step(tied):
    """Projecting only the target positions changes nothing but the cost."""
    graphdef, state = nnx.split(_model(tied, seed=2))
    params = split_new_rows(state, NEW, tied=tied)
    out = []
    for batch in (_batch(0), _with_targets(_batch(0))):
        step = make_ground_step(graphdef, state, NEW, _tx(), tied=tied, grad_accum=2)
        p, o = step.init(params)
        for _ in range(2):
            p, o, m = step(p, o, batch)
        out.append((_np(p), float(m["loss"]), float(m["grad_norm"]), float(m["tokens"])))
    assert out[0][1:] == pytest.approx(out[1][1:], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_hidden_lm_loss_matches_masked_loss_and_its_gradient():
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 9, 5, 7
    ids = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = rng.uniform(0.2, 1.0, size=(b, t)) * (rng.uniform(size=(b, t)) < 0.5)
    mask[2] = 0.0  # a row without targets
    mask = jnp.asarray(mask, jnp.float32)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    full = Batch(ids, mask, jnp.ones((b, t), jnp.int32))
    sparse = _with_targets(full, width=t - 1)

    def loss(h, w, batch):
        s, n = hidden_lm_loss(h, batch, lambda x: x @ w)
        return s / n

    ref_s, ref_n = masked_lm_loss(h @ w, ids, mask)
    assert float(loss(h, w, sparse)) == pytest.approx(float(ref_s / ref_n), rel=1e-6)
    assert float(loss(h, w, full)) == pytest.approx(float(ref_s / ref_n), rel=1e-6)
    g_full = jax.grad(loss, argnums=(0, 1))(h, w, full)
    g_sparse = jax.grad(loss, argnums=(0, 1))(h, w, sparse)
    for a, c in zip(g_full, g_sparse, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)


def _late_batch(seed: int, b: int = 4, t: int = 44) -> Batch:
    """Rows whose new tokens come late (a shared prompt first), some right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, NEW.start, size=(b, t)).astype(np.int32)
    first = rng.integers(18, 30, size=b)
    for r in range(b):
        ids[r, first[r]] = rng.integers(NEW.start, NEW.stop)
    ids[:, -3] = rng.integers(NEW.start, NEW.stop, size=b)
    mask = np.zeros((b, t), np.float32)
    mask[:, 34:] = 1.0
    attn = np.ones((b, t), np.int32)
    attn[1, -2:] = 0
    mask[1, -2:] = 0
    return Batch(ids, mask, attn, target_positions(list(mask), t, t - 1))


def test_grad_free_prefix():
    ids = np.zeros((2, 64), np.int32)
    ids[0, 40], ids[1, 50] = NEW.start, NEW.stop - 1
    assert grad_free_prefix(ids, None, NEW) == 32
    attn = np.ones((2, 64), np.int32)
    attn[1, 20:] = 0  # padding ends the prefix too
    assert grad_free_prefix(ids, attn, NEW) == 16
    assert grad_free_prefix(ids, attn, NEW, multiple=8) == 16
    free = np.zeros((2, 64), np.int32)  # no new token at all: leave >= `multiple` positions
    assert grad_free_prefix(free, None, NEW) == 48
    ids[0, 3] = NEW.start
    assert grad_free_prefix(ids, None, NEW) == 0
    assert _late_batch(0).input_ids.shape == (4, 44)
    assert grad_free_prefix(_late_batch(0).input_ids, _late_batch(0).attention_mask, NEW) == 16
    rows = [np.zeros(40, np.int32), np.zeros(20, np.int32)]
    rows[0][35] = NEW.start
    assert shared_prefix(rows, NEW) == 16  # the short row without new ids bounds it
    rows[1][5] = NEW.start
    assert shared_prefix(rows, NEW) == 0 and shared_prefix([], NEW) == 0


def test_max_prefix_bounds_the_prefix():
    graphdef, state = nnx.split(_model(True))
    step = make_ground_step(graphdef, state, NEW, _tx(), tied=True, max_prefix=16)
    late = _late_batch(0, t=64)
    late.input_ids[:, :33] %= NEW.start
    late.input_ids[:, 33] = NEW.start  # the first new id at 33: the batch alone allows 32
    assert grad_free_prefix(late.input_ids, late.attention_mask, NEW) == 32
    assert step.prefix_for(late) == 16
    off = make_ground_step(graphdef, state, NEW, _tx(), tied=True, split_prefix=False)
    assert off.prefix_for(late) == 0


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("tied", [True, False])
def test_grad_free_prefix_step_equals_full_backward(tied):
    """Skipping the backward pass over the shared prefix changes nothing but the cost."""
    graphdef, state = nnx.split(_model(tied, seed=3))
    params = split_new_rows(state, NEW, tied=tied)
    out = []
    for split in (False, True):
        step = make_ground_step(
            graphdef, state, NEW, _tx(), tied=tied, grad_accum=2, split_prefix=split
        )
        p, o = step.init(params)
        for s in range(2):
            assert step.prefix_for(_late_batch(s)) == (16 if split else 0)
            p, o, m = step(p, o, _late_batch(s))
        out.append((_np(p), float(m["loss"]), float(m["grad_norm"])))
        assert step.traces == 1
    assert out[0][1:] == pytest.approx(out[1][1:], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_matches_one_shot():
    graphdef, state = nnx.split(_model(False))
    params = split_new_rows(state, NEW, tied=False)
    out = []
    for accum in (1, 2):
        step = make_ground_step(graphdef, state, NEW, _tx(), tied=False, grad_accum=accum)
        p, o = step.init(params)
        p, o, m = step(p, o, _batch(0))
        out.append((_np(p), float(m["loss"]), float(m["grad_norm"])))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_compiles_once_per_bucket():
    graphdef, state = nnx.split(_model(True))
    step = make_ground_step(graphdef, state, NEW, _tx(steps=10), tied=True)
    params, opt_state = step.init(split_new_rows(state, NEW, tied=True))
    for s in range(4):
        params, opt_state, _ = step(params, opt_state, _batch(s, t=12))
    assert step.traces == 1
    params, opt_state, _ = step(params, opt_state, _batch(9, t=16))
    params, opt_state, _ = step(params, opt_state, _batch(10, t=16))
    assert step.traces == 2


def test_loss_mask_selects_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 10)), jnp.float32)
    ids = rng.integers(0, 10, size=(2, 6))
    mask = np.zeros((2, 6), np.float32)
    mask[:, 4:] = 1.0
    s, n = masked_lm_loss(logits, jnp.asarray(ids), jnp.asarray(mask))
    assert float(n) == 4.0
    # Reference: mean over masked positions of -log softmax at the next token.
    logp = jax.nn.log_softmax(np.asarray(logits), axis=-1)
    ref = -np.mean([logp[b, t - 1, ids[b, t]] for b in range(2) for t in (4, 5)])
    np.testing.assert_allclose(float(s / n), ref, rtol=1e-6)
    prompt_changed = ids.copy()
    prompt_changed[:, 1:4] = (ids[:, 1:4] + 3) % 10  # targets of prompt positions
    s2, _ = masked_lm_loss(logits, jnp.asarray(prompt_changed), jnp.asarray(mask))
    assert float(s2) == float(s)
    completion_changed = ids.copy()
    completion_changed[0, 5] = (ids[0, 5] + 1) % 10
    s3, _ = masked_lm_loss(logits, jnp.asarray(completion_changed), jnp.asarray(mask))
    assert float(s3) != float(s)


def test_prompt_targets_do_not_change_grounding_loss():
    graphdef, state = nnx.split(_model(True))
    step = make_ground_step(graphdef, state, NEW, _tx(), tied=True)
    params = split_new_rows(state, NEW, tied=True)
    batch = _batch(2)
    s, _ = step.loss(params, batch)
    # Without completion targets nothing counts; a changed completion token changes the loss.
    empty = Batch(batch.input_ids, np.zeros_like(batch.loss_mask), batch.attention_mask)
    assert float(step.loss(params, empty)[1]) == 0.0
    changed = batch.input_ids.copy()
    changed[:, -3] = (changed[:, -3] + 1) % VOCAB  # a completion token
    s2, _ = step.loss(params, Batch(changed, batch.loss_mask, batch.attention_mask))
    assert float(s2) != float(s)


def test_split_join_roundtrip_and_dict_states():
    table = jnp.arange(24.0).reshape(8, 3)
    state = {"embed": {"embedding": table}, "lm_head": {"kernel": table.T * 2}}
    p = split_new_rows(state, range(5, 7), tied=False)
    np.testing.assert_array_equal(p.embed, table[5:7])
    np.testing.assert_array_equal(p.head, table[5:7] * 2)
    out = join_new_rows(state, GroundParams(p.embed + 1, p.head - 1), range(5, 7), tied=False)
    np.testing.assert_array_equal(out["embed"]["embedding"][5:7], table[5:7] + 1)
    np.testing.assert_array_equal(out["lm_head"]["kernel"][:, 5:7], (table[5:7] * 2 - 1).T)
    np.testing.assert_array_equal(state["embed"]["embedding"], table)  # input untouched
    bf16 = {"embed": {"embedding": table.astype(jnp.bfloat16)}}
    p16 = split_new_rows(bf16, range(1, 3), tied=True)
    assert p16.embed.dtype == jnp.float32
    assert (
        join_new_rows(bf16, p16, range(1, 3), tied=True)["embed"]["embedding"].dtype == jnp.bfloat16
    )


def test_errors():
    model = _model(True)
    graphdef, state = nnx.split(model)
    with pytest.raises(GroundError, match="tied=False but the model has tie_word_embeddings=True"):
        make_ground_step(graphdef, state, NEW, _tx(), tied=False)
    with pytest.raises(GroundError, match="contiguous"):
        split_new_rows(state, [52, 54], tied=True)
    with pytest.raises(GroundError, match="exceed the embedding's 64 rows"):
        split_new_rows(state, range(60, 70), tied=True)
    with pytest.raises(GroundError, match="no lm_head/kernel"):
        split_new_rows(state, NEW, tied=False)
    p = split_new_rows(state, NEW, tied=True)
    with pytest.raises(GroundError, match="params.head must be None"):
        join_new_rows(state, GroundParams(p.embed, p.embed), NEW, tied=True)
    step = make_ground_step(graphdef, state, NEW, _tx(), tied=True, grad_accum=3)
    params, opt = step.init(p)
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        step(params, opt, _batch())


def test_schedule_warmup_and_decay():
    f = lr_schedule(1e-2, 100, 10)
    assert float(f(0)) == pytest.approx(1e-2 / 11)
    assert float(f(10)) == pytest.approx(1e-2)
    assert float(f(100)) == pytest.approx(1e-3)
    assert float(f(55)) == pytest.approx(1e-3 + (1e-2 - 1e-3) * 0.5, rel=1e-5)
    g = lr_schedule(1e-2, 100, 0, kind="constant")
    assert float(g(0)) == float(g(99)) == pytest.approx(1e-2)
