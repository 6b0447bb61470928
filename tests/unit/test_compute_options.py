"""The ``compute`` options (issue 14 item 5): remat per layer, attention through
`jax.nn.dot_product_attention`, bfloat16 parameters with a float32 optimizer; each leaves the
loss and gradients equal to the default on CPU, through the model and through both steps."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gti_jax.errors import ConfigError
from gti_jax.models.config import LlamaConfig
from gti_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from gti_jax.models.llama import LlamaForCausalLM, configure_compute
from gti_jax.train.config import ComputeConfig
from gti_jax.train.data import Batch
from gti_jax.train.ground import GroundParams, make_ground_step, split_new_rows
from gti_jax.train.lora import apply_lora
from gti_jax.train.steps import (
    MasterState,
    cast_params,
    make_sft_step,
    model_lm_loss,
    set_compute,
)

V = 96
_TINY = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
)
CONFIGS = {
    # q/k norms and a head_dim that is not hidden_size / heads
    "qwen3": LlamaConfig(**_TINY, head_dim=16, qk_norm=True, model_type="qwen3"),
    # a sliding window shorter than the batch, in every layer
    "mistral": LlamaConfig(**_TINY, model_type="mistral", sliding_window=4),
    # local + global layers, scores scaled by query_pre_attn_scalar**-0.5 (not head_dim's),
    # soft-capped logits, tied head
    "gemma3": Gemma3Config(
        **_TINY,
        head_dim=8,
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
        query_pre_attn_scalar=12.0,
        final_logit_softcapping=6.0,
    ),
}
OPTIONS = {
    "dot_product": ComputeConfig(attention="dot_product"),
    "remat_full": ComputeConfig(remat="full"),
    "remat_dots": ComputeConfig(remat="dots"),
}

# float32 options: the same float32 arithmetic, fused or ordered differently, so results
# differ by summation order only: a few ulps (2**-23 ~ 1.2e-7) per op, grown through two
# layers and a softmax; 1e-5 relative to the largest value is ~100 ulps.
F32_RTOL = 1e-5
# bfloat16 keeps 8 significant bits: rounding a weight moves it by at most u = 2**-8 of
# itself. The loss moves by about u times its sensitivity to a relative change of every
# weight at once (~1 here: random weights, logits of order 1), so 2u bounds it; each
# gradient leaf moves by u from its own rounding to bf16 plus the propagated change of the
# weights it depends on, so 8u bounds the leaf's relative (Frobenius) error.
BF16_U = 2.0**-8


def _model(name: str, seed: int = 0):
    cfg = CONFIGS[name]
    cls = Gemma3ForCausalLM if isinstance(cfg, Gemma3Config) else LlamaForCausalLM
    return cls(cfg, rngs=nnx.Rngs(seed))


def _batch(seed: int = 0) -> Batch:
    """Rows of 12: one full, one right-padded (training's layout), one left-padded
    (decoding's); targets after the first 3 real tokens of each row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(3, 12)).astype(np.int32)
    att = np.ones((3, 12), np.int32)
    att[1, 8:] = 0
    att[2, :3] = 0
    loss = att.astype(np.float32)
    for r in range(3):
        loss[r, np.flatnonzero(att[r])[:3]] = 0
    return Batch(jnp.asarray(ids), jnp.asarray(loss), jnp.asarray(att))


# Which options each family is checked with at the model level: dot_product everywhere (the
# GQA layout, the window and Gemma's scaling are where it could differ), each remat policy
# on two families, bf16 parameters everywhere. Every pair is one compile, so the grid is
# kept to what can differ (a remat policy does not depend on the family's attention).
MODEL_CHECKS = {
    "qwen3": ("dot_product", "remat_full", "remat_dots"),
    "mistral": ("dot_product", "remat_full"),
    "gemma3": ("dot_product", "remat_dots"),
}


@functools.cache
def _loss_and_grads(name: str, option: str | None = None, bf16: bool = False):
    """Mean loss and flat float32 gradients of model `name` on `_batch()` (cached: the
    default of each family is shared by the option and bf16 tests)."""
    model, batch = _model(name), _batch()
    compute = None if option is None else OPTIONS[option]
    graphdef, params = nnx.split(set_compute(nnx.merge(*nnx.split(model)), compute))
    if bf16:
        params = cast_params(params, jnp.bfloat16)

    def mean_loss(p):
        s, n = model_lm_loss(nnx.merge(graphdef, p), batch)
        return s / n

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    return float(loss), _flat(grads)


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x, np.float32)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _assert_close(got: dict, want: dict, rtol: float):
    assert got.keys() == want.keys()
    scale = max(float(np.abs(w).max()) for w in want.values())
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=rtol * scale, err_msg=k)


def _fast_on_qwen3(*params):
    """Parameters for a family grid: qwen3's in the fast lane, the other families' slow (each
    is a few compiles of a tiny model's loss and gradient; the full suite runs every one)."""
    return [p if p[0] == "qwen3" else pytest.param(*p, marks=pytest.mark.slow) for p in params]


@pytest.mark.parametrize(
    ("name", "option"), _fast_on_qwen3(*((n, o) for n, opts in MODEL_CHECKS.items() for o in opts))
)
def test_option_keeps_loss_and_gradients(name, option):
    loss, grads = _loss_and_grads(name)
    got_loss, got_grads = _loss_and_grads(name, option)
    assert got_loss == pytest.approx(loss, rel=F32_RTOL)
    _assert_close(got_grads, grads, F32_RTOL)


@pytest.mark.parametrize(("name",), _fast_on_qwen3(*((n,) for n in sorted(CONFIGS))))
def test_bf16_params_within_bf16_rounding(name):
    loss, grads = _loss_and_grads(name)
    got_loss, got_grads = _loss_and_grads(name, bf16=True)
    assert got_loss == pytest.approx(loss, rel=2 * BF16_U)
    assert got_loss != loss  # the rounding did happen: the comparison is not vacuous
    for k, want in grads.items():
        err = np.linalg.norm(got_grads[k] - want) / max(np.linalg.norm(want), 1e-12)
        assert err <= 8 * BF16_U, (k, err)


def test_dot_product_attention_with_a_kv_cache():
    """Decoding (prefill, then one token over the cache; sliding layers included) gives the
    einsum path's logits."""
    model, batch = _model("gemma3"), _batch()
    ids, att = batch.input_ids, batch.attention_mask

    @nnx.jit
    def decode(m, ids, att):
        first, cache = m(ids[:, :11], attention_mask=att[:, :11], cache=m.init_cache(3, 12))
        last, _ = m(ids[:, 11:], attention_mask=att[:, 11:], cache=cache)
        return jnp.concatenate([first, last], axis=1)

    want = np.asarray(decode(model, ids, att))
    fused = configure_compute(nnx.merge(*nnx.split(model)), attention="dot_product")
    got = np.asarray(decode(fused, ids, att))
    real = np.asarray(att, bool)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=F32_RTOL * np.abs(want).max())


def _sgd_sft(model, compute, *, lora=False, grad_accum=1, lr=0.1):
    step = make_sft_step(model, optax.sgd(lr), lora=lora, grad_accum=grad_accum, compute=compute)
    state = step.init(model)
    before = _flat(state.trainable)
    state, metrics = step(state, _batch())
    return step, state, metrics, before


# The steps are checked with both float32 options at once (each alone is checked on the
# model above): what is tested here is that the step carries them into its compiled function.
STEP_OPTION = ComputeConfig(attention="dot_product", remat="full")


@pytest.mark.slow  # compiles whole training steps (tens of seconds on 2 cores)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_step_options(lora):
    """Through the compiled fine-tuning step (the options set in its graph definition): the
    same loss, gradient norm and updated parameters; the caller's model is left as it was."""
    model = _model("qwen3")
    if lora:
        model = apply_lora(
            model, rank=2, alpha=4.0, dropout=0.0, targets=("q", "v", "down"), rngs=nnx.Rngs(1)
        )
    _, ref, ref_m, _ = _sgd_sft(model, None, lora=lora)
    step, state, m, _ = _sgd_sft(model, STEP_OPTION, lora=lora)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=F32_RTOL)
    assert float(m["grad_norm"]) == pytest.approx(float(ref_m["grad_norm"]), rel=F32_RTOL)
    _assert_close(_flat(state.trainable), _flat(ref.trainable), F32_RTOL)
    merged = step.merge(state)
    assert merged.remat == "full" and merged.layers[0].self_attn.kernel == "dot_product"
    assert model.remat == "none" and model.layers[0].self_attn.kernel == "einsum"


@pytest.mark.slow  # compiles whole training steps (tens of seconds on 2 cores)
def test_ground_step_options():
    """Through the compiled grounding step: the same loss, gradient norm and rows."""
    model = _model("gemma3")
    graphdef, state = nnx.split(model)
    new = range(V - 8, V)

    def run(compute):
        step = make_ground_step(graphdef, state, new, optax.sgd(1.0), tied=True, compute=compute)
        params, opt = step.init(split_new_rows(state, new, tied=True))
        batch = _batch()._replace(input_ids=_batch().input_ids.at[:, 5].set(V - 3))
        params, _, m = step(params, opt, batch)
        return np.asarray(params.embed), m

    ref_rows, ref_m = run(None)
    rows, m = run(STEP_OPTION)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=F32_RTOL)
    assert float(m["grad_norm"]) == pytest.approx(float(ref_m["grad_norm"]), rel=F32_RTOL)
    np.testing.assert_allclose(rows, ref_rows, rtol=0, atol=F32_RTOL * np.abs(ref_rows).max())


@pytest.mark.slow  # compiles whole training steps (tens of seconds on 2 cores)
def test_bf16_sft_step_keeps_float32_master():
    """Parameters (trained and frozen) in bf16, every optimizer-state leaf float32; the
    update math runs on the float32 master copy, so an update far below bf16's resolution
    is kept there (it would round away on the bf16 parameters), and the parameters are the
    master cast to bf16. With grad_accum=3 the micro-batch gradients add up in float32."""
    # lr 1e-4 moves a weight by ~1e-4 x its gradient: far below half a bf16 ulp of a 0.02
    # weight (2**-9 x 0.02 ~ 4e-5), far above a float32 ulp (~2e-9)
    model, lr = _model("mistral"), 1e-4
    compute = ComputeConfig(param_dtype="bfloat16")
    step, state, m, before = _sgd_sft(model, compute, grad_accum=3, lr=lr, lora=False)
    _, ref, ref_m, ref_before = _sgd_sft(model, None, grad_accum=3, lr=lr)
    assert isinstance(state.opt_state, MasterState)
    assert {str(x.dtype) for x in jax.tree.leaves(state.trainable)} == {"bfloat16"}
    float_leaves = [
        x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert float_leaves and {str(x.dtype) for x in float_leaves} == {"float32"}
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=2 * BF16_U)
    master, params = _flat(state.opt_state.master), _flat(state.trainable)
    for k, p in params.items():
        np.testing.assert_array_equal(p, master[k].astype(jnp.bfloat16).astype(np.float32))
    # the master moved by -lr * (float32 gradient), within the gradients' bf16 bound
    for k in master:
        delta, want = master[k] - before[k], _flat(ref.trainable)[k] - ref_before[k]
        err = np.linalg.norm(delta - want) / max(np.linalg.norm(want), 1e-30)
        assert err <= 8 * BF16_U, (k, err)
    moved = sum(int((master[k] != before[k]).sum()) for k in master)
    rounded_away = sum(int((params[k] == before[k]).sum()) for k in params)
    total = sum(x.size for x in params.values())
    assert moved > total // 2 and rounded_away > total * 9 // 10


@pytest.mark.slow  # compiles whole training steps (tens of seconds on 2 cores)
def test_bf16_ground_step_keeps_rows_float32():
    model = _model("qwen3")
    graphdef, state = nnx.split(model)
    new = range(V - 8, V)
    compute = ComputeConfig(param_dtype="bfloat16")
    step = make_ground_step(graphdef, state, new, optax.adam(1e-2), tied=False, compute=compute)
    ref = make_ground_step(graphdef, state, new, optax.adam(1e-2), tied=False)
    frozen_dtypes = {str(x.dtype) for x in jax.tree.leaves(step.frozen_state)}
    assert frozen_dtypes == {"bfloat16"}
    params, opt = step.init(split_new_rows(state, new, tied=False))
    assert isinstance(params, GroundParams) and params.head is not None
    batch = _batch()._replace(input_ids=_batch().input_ids.at[:, 6].set(V - 2))
    s, n = step.loss(params, batch)
    rs, rn = ref.loss(params, batch)
    assert float(s / n) == pytest.approx(float(rs / rn), rel=2 * BF16_U)
    params, opt, _ = step(params, opt, batch)
    leaves = jax.tree.leaves((params, opt))
    assert {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {"float32"}


def _remat_model(remat: str):
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return configure_compute(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), remat=remat)


def _residual_bytes(remat: str, t: int = 128) -> int:
    """Bytes the backward pass keeps from the forward (the residuals of `jax.vjp` of the
    loss), from shapes alone: nothing is compiled or run."""
    graphdef, params = nnx.split(_remat_model(remat))
    b = Batch(jnp.zeros((2, t), jnp.int32), jnp.ones((2, t)), jnp.ones((2, t), jnp.int32))
    loss = lambda p: model_lm_loss(nnx.merge(graphdef, p), b)[0]  # noqa: E731
    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def test_remat_keeps_fewer_residuals():
    """What remat promises: the forward keeps less for the backward. "full" keeps each
    layer's input (plus the final norm and head's own), "dots" the projections' outputs
    too; "none" every activation, [B, H, T, T] attention probabilities included."""
    none, full, dots = (_residual_bytes(r) for r in ("none", "full", "dots"))
    assert full < dots < none, (none, dots, full)
    assert full < 0.25 * none, (none, full)


def _compiled_step(remat: str):
    model = _remat_model("none")
    step = make_sft_step(model, optax.sgd(0.1), lora=False, compute=ComputeConfig(remat=remat))
    state = step.init(model)
    b, t = 2, 128
    batch = Batch(jnp.zeros((b, t), jnp.int32), jnp.ones((b, t)), jnp.ones((b, t), jnp.int32))
    key = jax.random.key(0)
    return step.lower(
        state.trainable, state.frozen, batch, key, opt_state=state.opt_state
    ).compile()


@pytest.mark.slow  # compiles whole training steps (tens of seconds on 2 cores)
def test_remat_in_the_compiled_step():
    """The compiled step (not just the jaxpr) recomputes: "full" runs every forward matmul of
    a layer again in the backward, "dots" only the attention's batched ones, so the compiled
    program has more dot ops; and its temporary buffers shrink. On the CPU backend they
    shrink by a few percent only (measured: 3 layers, 2 x 128 tokens, none 5.89 MB, full
    5.81 MB, dots 5.76 MB): XLA's CPU scheduler is free to hoist the recomputation next to
    the forward pass, which keeps most activations alive anyway; the residuals above are
    what a memory-aware scheduler (GPU, TPU) can drop."""
    compiled = {r: _compiled_step(r) for r in ("none", "full", "dots")}
    dots = {r: len(re.findall(r"= \S+ dot\(", c.as_text())) for r, c in compiled.items()}
    assert dots["none"] < dots["dots"] < dots["full"], dots
    temp = {r: c.memory_analysis().temp_size_in_bytes for r, c in compiled.items()}
    assert temp["full"] < temp["none"] and temp["dots"] < temp["none"], temp


def test_bad_option_names_the_choices():
    model = _model("qwen3")
    with pytest.raises(ConfigError, match="remat='some'.*'full'"):
        configure_compute(model, remat="some")
    with pytest.raises(ConfigError, match="attention='flash'.*'dot_product'"):
        configure_compute(model, attention="flash")
