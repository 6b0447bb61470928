"""LoRA adapters (gti_jax.train.lora) and the fine-tuning step (gti_jax.train.steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gti_jax.models import LlamaForCausalLM
from gti_jax.train.config import SFTConfig
from gti_jax.train.data import Batch, target_positions
from gti_jax.train.lora import LoRAError, LoRAParam, apply_lora, lora_modules, merge_lora
from gti_jax.train.steps import StepError, make_sft_step, sft_optimizer
from tests.helpers.hf_models import tiny_llama

VOCAB = 48
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _model(tied: bool = True) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, intermediate_size=24, tied=tied)


def _batch(seed: int = 0, b: int = 4, t: int = 10) -> Batch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[:, 4:] = 1.0
    return Batch(ids, mask, np.ones((b, t), np.int32))


def _tx(lr=1e-2):
    return sft_optimizer(SFTConfig(steps=5, lr=lr, warmup_steps=0, weight_decay=0.01))


_logits = nnx.jit(lambda m, ids: m(ids))


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _lora(model, dropout=0.0, targets=TARGETS):
    return apply_lora(model, rank=4, alpha=8.0, dropout=dropout, targets=targets, rngs=nnx.Rngs(1))


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_zero_init_keeps_logits_and_input_model():
    base = _model()
    ids = jnp.asarray(_batch().input_ids)
    lora = _lora(base, dropout=0.3)
    np.testing.assert_array_equal(np.asarray(_logits(lora, ids)), np.asarray(_logits(base, ids)))
    assert len(lora_modules(lora)) == len(TARGETS) and lora_modules(base) == []
    q = lora.layers[0].self_attn.q_proj.adapter
    o = lora.layers[0].self_attn.o_proj.adapter
    assert q.lora_a.shape == (16, 4) and q.lora_b.shape == (4, 2, 8)
    assert o.lora_a.shape == (2, 8, 4) and o.lora_b.shape == (4, 16)
    assert isinstance(q.lora_a, LoRAParam) and isinstance(q.lora_a, nnx.Param)
    assert q.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert q.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads", "head_dim")


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("tied", [True, False])
def test_lora_sft_trains_only_adapters_embed_and_head(tied):
    lora = _lora(_model(tied))
    before = _flat(nnx.state(lora))
    step = make_sft_step(lora, _tx(), lora=True)
    state = step.init(lora)
    trained = set(_flat(state.trainable))
    assert all("lora_" in k or "['embed']" in k or "['lm_head']" in k for k in trained)
    assert any("['embed']" in k for k in trained) and any("lora_b" in k for k in trained)
    assert any("['lm_head']" in k for k in trained) != tied
    for s in range(3):
        state, metrics = step(state, _batch(s))
    assert np.isfinite(float(metrics["loss"]))
    after = _flat(nnx.state(step.merge(state)))
    assert set(after) == set(before)
    for k in before:
        if k in trained:
            assert not np.array_equal(after[k], before[k]), k
        else:
            assert np.array_equal(after[k], before[k]), k  # base weights bitwise unchanged
    # Merging folds the adapters into the kernels: same logits, base parameter structure.
    tuned = step.merge(state)
    merged = merge_lora(tuned)
    ids = jnp.asarray(_batch(7).input_ids)
    np.testing.assert_allclose(
        np.asarray(_logits(merged, ids)), np.asarray(_logits(tuned, ids)), atol=1e-5, rtol=1e-5
    )
    assert set(_flat(nnx.state(merged))) == set(_flat(nnx.state(_model(tied))))
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(merged))
    assert lora_modules(tuned), "merge_lora leaves its input alone"


def test_lora_dropout_uses_the_step_key():
    lora = _lora(_model(), dropout=0.5, targets=("q", "v", "down"))
    step = make_sft_step(lora, _tx(), lora=True)
    with pytest.raises(StepError, match="pass key="):
        step(step.init(lora), _batch())
    outs = []
    for key in (1, 1, 2):
        state, _ = step(step.init(lora), _batch(), jax.random.key(key))
        state, m = step(state, _batch(1), jax.random.key(key + 10))
        outs.append((float(m["loss"]), _flat(state.trainable)))
    same = all(np.array_equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
    assert same and outs[0][0] == outs[1][0]
    assert outs[0][0] != outs[2][0]
    # Outside a step the model computes without dropout (deterministic).
    tuned = step.merge(state)
    ids = jnp.asarray(_batch().input_ids)
    np.testing.assert_array_equal(np.asarray(_logits(tuned, ids)), np.asarray(_logits(tuned, ids)))
    np.testing.assert_allclose(
        np.asarray(_logits(merge_lora(tuned), ids)), np.asarray(_logits(tuned, ids)), atol=1e-5
    )


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_full_sft_trains_everything_and_accumulates():
    model = _model(False)
    results = []
    for accum in (1, 2):
        step = make_sft_step(model, _tx(lr=1e-3), lora=False, grad_accum=accum)
        state = step.init(model)
        assert set(_flat(state.trainable)) == set(_flat(nnx.state(model)))
        assert jax.tree.leaves(state.frozen) == []
        state, m = step(state, _batch(0))
        results.append((float(m["loss"]), float(m["grad_norm"]), _flat(state.trainable)))
        assert step.traces == 1
        state, m = step(state, _batch(1))
        assert step.traces == 1  # same shapes: no retrace
        if accum == 1:
            state, m = step(state, _batch(2, t=16))
            assert step.traces == 2  # a new bucket: one more compile
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
    for k, v in results[0][2].items():
        np.testing.assert_allclose(v, results[1][2][k], rtol=1e-5, atol=1e-6)
    changed = [
        k for k, v in results[0][2].items() if not np.array_equal(v, _flat(nnx.state(model))[k])
    ]
    assert len(changed) == len(results[0][2])


def test_errors():
    model = _model()
    with pytest.raises(LoRAError, match="unknown LoRA targets \\['qkv'\\]"):
        apply_lora(model, rank=2, alpha=4, dropout=0.0, targets=("qkv",), rngs=nnx.Rngs(0))
    with pytest.raises(LoRAError, match="rank must be >= 1"):
        apply_lora(model, rank=0, alpha=4, dropout=0.0, targets=("q",), rngs=nnx.Rngs(0))
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        _lora(_lora(model))
    with pytest.raises(StepError, match="call gti_jax.train.lora.apply_lora"):
        make_sft_step(model, _tx(), lora=True)


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("lora", [False, True])
def test_sft_step_with_target_positions_equals_full_logits(lora):
    """``Batch.targets`` (logits at target positions only) gives the same step."""
    out = []
    for with_targets in (False, True):
        model = _model(False)
        if lora:
            model = _lora(model)
        step = make_sft_step(model, _tx(lr=1e-3), lora=lora)
        state = step.init(model)
        batch = _batch(0)
        batch.loss_mask[1, :7] = 0.0  # rows with different numbers of targets
        if with_targets:
            batch = batch._replace(targets=target_positions(list(batch.loss_mask), 10, 8))
        for _ in range(2):
            state, m = step(state, batch)
        out.append((float(m["loss"]), float(m["grad_norm"]), _flat(state.trainable)))
    assert out[0][:2] == pytest.approx(out[1][:2], rel=1e-5)
    for k, v in out[0][2].items():
        np.testing.assert_allclose(v, out[1][2][k], rtol=1e-5, atol=1e-6)
