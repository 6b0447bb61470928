"""GTI for any Flax model (gti_jax.train.generic): a Linen and an NNX model written here, trees
shaped like MaxText's, bonsai's and tunix's, and parity with the fast path on gti_jax's Llama."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gti_jax.errors import BadInput
from gti_jax.train.config import GroundConfig
from gti_jax.train.data import Batch
from gti_jax.train.generic import (
    EmbeddingSpec,
    GroundParams,
    fold_back,
    make_generic_ground_step,
    split_rows,
)
from gti_jax.train.ground import ground_optimizer, make_ground_step, split_new_rows
from gti_jax.train.steps import model_lm_loss
from gti_jax.vocab.resize import get_path

V, D, B, T = 40, 8, 4, 10
NEW = [37, 31, 39, 33, 35]  # any order, not contiguous: row i belongs to NEW[i]
OLD = np.setdiff1d(np.arange(V), NEW)


def _tokens(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 30, size=(B, T)).astype(np.int32)
    ids[:, 2] = NEW[:B]  # new ids as inputs ...
    ids[:, 6] = NEW[1 : B + 1]  # ... and as targets
    return ids


def _ce_sums(logits, ids):
    """Next-token cross-entropy ``(sum, count)`` over every position."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked), jnp.float32(picked.size)


def _causal_mean(x):
    return jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]


# --------------------------------------------------------------------------------------------
# The user's models: written here, not gti_jax's.
# --------------------------------------------------------------------------------------------


class LinenLM(nn.Module):
    """Embed -> a residual MLP -> causal mean -> untied Dense head (kernel [D, V])."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        x = x + nn.Dense(D, name="mix")(jnp.tanh(x))
        return nn.Dense(V, use_bias=False, name="head")(_causal_mean(x))


class NnxLM(nnx.Module):
    """The same in NNX: tied (``tok.attend``) or an untied ``[V, D]`` head ``out``."""

    def __init__(self, *, tied: bool, rngs: nnx.Rngs):
        self.tok = nnx.Embed(V, D, rngs=rngs)
        self.mix = nnx.Linear(D, D, rngs=rngs)
        self.out = None if tied else nnx.Param(jax.random.normal(rngs.params(), (V, D)))

    def __call__(self, ids):
        x = self.tok(ids)
        x = _causal_mean(x + self.mix(jnp.tanh(x)))
        return self.tok.attend(x) if self.out is None else x @ self.out[...].T


def _linen():
    # jitted: one compilation instead of one per initializer op
    params = jax.jit(LinenLM().init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    spec = EmbeddingSpec(("params", "embed", "embedding"), ("params", "head", "kernel"), "dv")

    def loss_fn(p, batch):
        return _ce_sums(LinenLM().apply(p, batch["ids"]), batch["ids"])

    return params, spec, loss_fn


def _nnx(tied: bool):
    graphdef, state = nnx.split(NnxLM(tied=tied, rngs=nnx.Rngs(0)))
    spec = EmbeddingSpec(("tok", "embedding"), None if tied else ("out",), "vd")

    def loss_fn(s, batch):
        return _ce_sums(nnx.merge(graphdef, s)(batch["ids"]), batch["ids"])

    return state, spec, loss_fn


MODELS = {"linen": _linen, "nnx_tied": lambda: _nnx(True), "nnx_untied": lambda: _nnx(False)}


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _head_old(head, spec):
    return head[:, OLD] if spec.head_layout == "dv" else head[OLD]


@pytest.fixture(scope="module", params=list(MODELS))
def run(request):
    """One grounding run per model (one compilation): 25 AdamW steps (weight decay, clipping:
    the trainer's optimizer) on a simple objective, then the fold-back."""
    params, spec, loss_fn = MODELS[request.param]()
    before = _flat(params)
    ids = _tokens()
    ids[:, 3] = 7  # after each new id at position 2 comes one fixed token
    batch = {"ids": ids}
    tx = ground_optimizer(GroundConfig(steps=25, lr=0.1, weight_decay=0.01, clip_norm=1.0))
    step = make_generic_ground_step(loss_fn, params, spec, NEW, tx)
    rows, opt = step.init()
    losses = []  # each step reports the loss before its update
    for _ in range(25):
        rows, opt, metrics = step(rows, opt, batch)
        losses.append(float(metrics["loss"]))
    out = step.fold_back(params, rows)
    return dict(
        params=params,
        spec=spec,
        before=before,
        rows=rows,
        opt=opt,
        out=out,
        losses=losses,
        step=step,
    )


def test_only_the_new_rows_change(run):
    params, spec, rows, out, before = (run[k] for k in ("params", "spec", "rows", "out", "before"))
    assert jax.tree.structure(out) == jax.tree.structure(params)
    after = _flat(out)
    for k, v in _flat(params).items():  # the input tree is untouched ...
        np.testing.assert_array_equal(v, before[k])
    table = np.asarray(get_path(out, spec.embed))
    old_table = np.asarray(get_path(params, spec.embed))
    np.testing.assert_array_equal(table[OLD], old_table[OLD])  # ... old rows bit for bit
    np.testing.assert_array_equal(table[NEW], np.asarray(rows.embed))
    assert not np.array_equal(table[NEW], old_table[NEW])
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    want = {k for k in before if before[k].shape in ((V, D), (D, V))}  # table, head
    assert len(want) == (1 if spec.head is None else 2)
    assert moved == want, (moved, want)
    if spec.head is not None:
        head, old_head = (np.asarray(get_path(t, spec.head)) for t in (out, params))
        np.testing.assert_array_equal(_head_old(head, spec), _head_old(old_head, spec))
        new_head = head[:, NEW].T if spec.head_layout == "dv" else head[NEW]
        np.testing.assert_array_equal(new_head, np.asarray(rows.head))


def test_optimizer_state_is_n_by_d(run):
    spec, rows, opt = run["spec"], run["rows"], run["opt"]
    arrays = [x for x in jax.tree.leaves(opt) if np.ndim(x)]
    heads = 1 if spec.head is None else 2
    # Adam's two moments per trainable array, each [N, D]; everything else is a scalar
    assert [np.shape(x) for x in arrays] == [(len(NEW), D)] * (2 * heads)
    assert jax.tree.map(np.shape, rows) == GroundParams(
        (len(NEW), D), None if spec.head is None else (len(NEW), D)
    )


def test_loss_decreases(run):
    losses = run["losses"]
    assert losses[-1] < losses[0] - 0.1
    assert run["step"].traces == 1  # one batch shape, one compilation


@pytest.mark.parametrize("kind", ["linen", "nnx_tied"])  # a [D, V] head; tied
def test_row_gradient_is_the_full_table_gradient_at_the_new_ids(kind):
    params, spec, loss_fn = MODELS[kind]()
    # Zero the new rows first: then one step of sgd(-1) leaves rows = 0 + grad exactly, so the
    # step's own gradient is read back without rounding.
    n = len(NEW)
    zeros = GroundParams(jnp.zeros((n, D)), None if spec.head is None else jnp.zeros((n, D)))
    params = fold_back(params, spec, NEW, zeros)
    batch = {"ids": _tokens()}
    step = make_generic_ground_step(loss_fn, params, spec, NEW, optax.sgd(-1.0))
    rows, opt = step.init()
    grads, _, _ = step(rows, opt, batch)

    def mean_loss(p):
        s, c = loss_fn(p, batch)
        return s / c

    full = jax.jit(jax.grad(mean_loss))(params)
    # The same float32 operations in both; jit may fuse and reorder the sums: a few ulps.
    tol = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads.embed, np.asarray(get_path(full, spec.embed))[NEW], **tol)
    if spec.head is not None:
        g = np.asarray(get_path(full, spec.head))
        want = g[:, NEW].T if spec.head_layout == "dv" else g[NEW]
        np.testing.assert_allclose(grads.head, want, **tol)
    assert float(jnp.abs(grads.embed).max()) > 0  # the new ids are in the batch


@pytest.mark.slow  # two more compilations; tests/sharding/test_generic_sharding.py also runs it
def test_grad_accum_equals_one_shot_with_summed_losses():
    params, spec, loss_fn = _nnx(True)
    batch = {"ids": _tokens()}
    out = []
    for accum in (1, 2):
        step = make_generic_ground_step(
            loss_fn, params, spec, NEW, optax.sgd(-1.0), grad_accum=accum
        )
        rows, opt = step.init()
        out.append(step(rows, opt, batch))
    # per-micro-batch sums, one division by the whole batch's count: equal up to f32 rounding
    np.testing.assert_allclose(out[0][0].embed - out[1][0].embed, 0, atol=1e-6)
    assert float(out[0][2]["loss"]) == pytest.approx(float(out[1][2]["loss"]), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Parity with the fast path on gti_jax's own Llama.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # two compiled Llama steps: tens of seconds on 2 cores
def test_same_rows_as_the_fast_path_on_gti_jax_llama():
    from tests.helpers.hf_models import tiny_llama

    model = tiny_llama(64, hidden_size=16, tied=False, seed=0)
    new = range(52, 60)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 52, size=(4, 12)).astype(np.int32)
    ids[:, 3] = [52, 53, 54, 55]
    ids[:, -2] = [56, 57, 58, 59]
    mask = np.zeros((4, 12), np.float32)
    mask[:, 6:] = 1.0
    batch = Batch(ids, mask, np.ones((4, 12), np.int32))
    tx = lambda: ground_optimizer(GroundConfig(steps=3, lr=1e-2, warmup_steps=0))  # noqa: E731

    fast = make_ground_step(graphdef, state, new, tx(), tied=False, split_prefix=False)
    rows_f, opt_f = fast.init(split_new_rows(state, new, tied=False))

    def loss_fn(s, b):
        return model_lm_loss(nnx.merge(graphdef, s), b)

    spec = EmbeddingSpec.nnx_llama(tied=False)
    generic = make_generic_ground_step(loss_fn, state, spec, new, tx())
    rows_g, opt_g = generic.init()
    for _ in range(3):
        rows_f, opt_f, m_f = fast(rows_f, opt_f, batch)
        rows_g, opt_g, m_g = generic(rows_g, opt_g, batch)
        # the same loss computed two ways (new logit columns apart vs in the full head)
        assert float(m_g["loss"]) == pytest.approx(float(m_f["loss"]), rel=1e-5)
    # Adam normalizes each update to ~lr, so f32 differences in the gradients stay far below
    # the 1e-2 steps: 3 steps agree to 1e-5.
    np.testing.assert_allclose(rows_g.embed, rows_f.embed, atol=1e-5)
    np.testing.assert_allclose(rows_g.head, rows_f.head, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Trees shaped like MaxText's, bonsai's and tunix's, and the presets that find their tables.
# --------------------------------------------------------------------------------------------


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _maxtext(tied):
    decoder = {"decoder_norm": {"scale": jnp.ones(D)}}
    if not tied:
        decoder["logits_dense"] = {"kernel": _rand(1, (D, V))}
    tree = {"params": {"token_embedder": {"embedding": _rand(0, (V, D))}, "decoder": decoder}}
    head = None if tied else tree["params"]["decoder"]["logits_dense"]["kernel"]
    return tree, tree["params"]["token_embedder"]["embedding"], head


class _BonsaiQwen3(nnx.Module):
    def __init__(self, rngs):
        self.embedder = nnx.Embed(V, D, rngs=rngs)
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Einsum("BTD,DV->BTV", (D, V), rngs=rngs)


class _ScaledEmbed(nnx.Module):
    def __init__(self, rngs):
        self.weight = nnx.Embed(V, D, rngs=rngs)


class _BonsaiGemma3(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = _ScaledEmbed(rngs)
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)


class _TunixEmbedder(nnx.Module):
    def __init__(self, rngs):
        self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (V, D)))


class _TunixEinsum(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, V)))


class _Tunix(nnx.Module):
    def __init__(self, tied, rngs):
        self.embedder = _TunixEmbedder(rngs)
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)
        if not tied:
            self.lm_head = _TunixEinsum(rngs)


def _nnx_tree(module, table, head):
    return nnx.state(module), table(module)[...], None if head is None else head(module)[...]


PRESETS = {
    "maxtext_untied": (lambda: _maxtext(False), EmbeddingSpec.maxtext(tied=False)),
    "maxtext_tied": (lambda: _maxtext(True), EmbeddingSpec.maxtext(tied=True)),
    "bonsai_qwen3": (
        lambda: _nnx_tree(
            _BonsaiQwen3(nnx.Rngs(0)), lambda m: m.embedder.embedding, lambda m: m.lm_head.kernel
        ),
        EmbeddingSpec.bonsai_qwen3(),
    ),
    "bonsai_gemma3": (
        lambda: _nnx_tree(
            _BonsaiGemma3(nnx.Rngs(0)), lambda m: m.embed_tokens.weight.embedding, None
        ),
        EmbeddingSpec.bonsai_gemma3(),
    ),
    "tunix_untied": (
        lambda: _nnx_tree(
            _Tunix(False, nnx.Rngs(0)), lambda m: m.embedder.input_embedding, lambda m: m.lm_head.w
        ),
        EmbeddingSpec.tunix(tied=False),
    ),
    "tunix_tied": (
        lambda: _nnx_tree(_Tunix(True, nnx.Rngs(0)), lambda m: m.embedder.input_embedding, None),
        EmbeddingSpec.tunix(tied=True),
    ),
}


def _preset_loss(spec):
    """A loss written against the spec's layout: [V, D] table, [D, V] kernel or tied."""

    def loss_fn(tree, batch):
        table = get_path(tree, spec.embed)
        x = _causal_mean(table[batch])
        if spec.head is None:
            logits = x @ table.T
        else:
            head = get_path(tree, spec.head)
            logits = x @ head if spec.head_layout == "dv" else x @ head.T
        return _ce_sums(logits, batch)

    return loss_fn


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_find_the_table_and_head(name):
    build, spec = PRESETS[name]
    tree, table, head = build()
    assert (head is None) == spec.tied
    rows = split_rows(tree, spec, NEW)
    np.testing.assert_array_equal(rows.embed, np.asarray(table)[NEW])
    if head is not None:
        assert np.shape(head) == (D, V)  # every preset's untied head is a [D, V] kernel
        np.testing.assert_array_equal(rows.head, np.asarray(head)[:, NEW].T)
    # the rows a step would train (its own run on dicts and nnx.State is tested above)
    trained = jax.tree.map(lambda x: x + 1.0, rows)
    out = fold_back(tree, spec, NEW, trained)
    assert type(out) is type(tree)
    new_table = np.asarray(get_path(out, spec.embed))
    np.testing.assert_array_equal(new_table[OLD], np.asarray(table)[OLD])
    np.testing.assert_array_equal(new_table[NEW], np.asarray(trained.embed))
    if head is not None:
        new_head = np.asarray(get_path(out, spec.head))
        np.testing.assert_array_equal(new_head[:, OLD], np.asarray(head)[:, OLD])
        np.testing.assert_array_equal(new_head[:, NEW].T, np.asarray(trained.head))


def test_eval_loss_is_the_users_loss_with_the_rows_in_place():
    tree, _, _ = _maxtext(False)
    spec = EmbeddingSpec.maxtext(tied=False)
    loss_fn = _preset_loss(spec)
    step = make_generic_ground_step(loss_fn, tree, spec, NEW, optax.adam(0.1))
    rows = jax.tree.map(lambda x: x * 3.0, split_rows(tree, spec, NEW))
    s, c = step.loss(rows, _tokens())
    want_s, want_c = jax.jit(loss_fn)(fold_back(tree, spec, NEW, rows), _tokens())
    assert float(c) == float(want_c)
    # the same float32 computation, compiled twice: XLA may fuse and reorder the sums
    assert float(s) == pytest.approx(float(want_s), rel=1e-6)


def test_fold_back_into_a_bf16_table_keeps_old_rows_and_casts_new_ones():
    tree, table, head = _maxtext(False)
    tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
    spec = EmbeddingSpec.maxtext(tied=False)
    rows = split_rows(tree, spec, NEW)
    assert rows.embed.dtype == jnp.float32  # the trained rows are float32 ...
    rows = jax.tree.map(lambda x: x + 1e-3, rows)
    out = fold_back(tree, spec, NEW, rows)
    new_table = get_path(out, spec.embed)
    assert new_table.dtype == jnp.bfloat16  # ... the table keeps its dtype
    old_table = np.asarray(get_path(tree, spec.embed).astype(jnp.float32))
    got = np.asarray(new_table.astype(jnp.float32))
    np.testing.assert_array_equal(got[OLD], old_table[OLD])
    np.testing.assert_array_equal(got[NEW], np.asarray(rows.embed.astype(jnp.bfloat16), np.float32))


def _one_line_bad_input(fn, match):
    with pytest.raises(BadInput, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_specs_and_ids_are_one_line_bad_input():
    tree, _, _ = _maxtext(False)
    loss = _preset_loss(EmbeddingSpec.maxtext(tied=False))
    tx = optax.adam(0.1)

    maxtext = EmbeddingSpec.maxtext(tied=False)

    def make(spec=maxtext, ids=NEW, loss_fn=loss):
        return make_generic_ground_step(loss_fn, tree, spec, ids, tx)

    _one_line_bad_input(lambda: make(EmbeddingSpec.tunix(tied=True)), "not found")
    wrong = EmbeddingSpec(
        ("params", "token_embedder", "embedding"),
        ("params", "decoder", "logits_dense", "kernel"),
        "vd",
    )
    _one_line_bad_input(lambda: make(wrong), "head_layout")
    norm = EmbeddingSpec(("params", "decoder", "decoder_norm", "scale"))
    _one_line_bad_input(lambda: make(norm), "2-D")
    _one_line_bad_input(lambda: make(ids=[3, V]), "outside the table")
    _one_line_bad_input(lambda: make(ids=[-1]), "outside the table")
    _one_line_bad_input(lambda: make(ids=[3, 3]), "repeated")
    _one_line_bad_input(lambda: make(ids=[]), "non-empty")
    _one_line_bad_input(lambda: make(ids=[1.5]), "ints")
    _one_line_bad_input(lambda: make(loss_fn=None), "loss_fn")
    step = make()
    _one_line_bad_input(
        lambda: step.init(GroundParams(jnp.zeros((2, D)), jnp.zeros((2, D)))), r"\[5, 8\]"
    )
    _one_line_bad_input(lambda: step.init(GroundParams(jnp.zeros((5, D)))), "head must be None")
    rows, opt = step.init()
    _one_line_bad_input(
        lambda: step(rows, opt, {"a": np.zeros((4, T)), "b": np.zeros((3, T))}), "leading"
    )
    bad = make_generic_ground_step(
        lambda p, b: jnp.zeros(3), tree, EmbeddingSpec.maxtext(tied=False), NEW, tx
    )
    r, o = bad.init()
    _one_line_bad_input(lambda: bad(r, o, _tokens()), "scalar")
    accum = make_generic_ground_step(
        loss, tree, EmbeddingSpec.maxtext(tied=False), NEW, tx, grad_accum=3
    )
    r, o = accum.init()
    _one_line_bad_input(lambda: accum(r, o, _tokens()), "grad_accum")


# --------------------------------------------------------------------------------------------
# The README's example runs as written.
# --------------------------------------------------------------------------------------------


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Grounding your own model", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert code, "README's 'Grounding your own model' has no python example"
    scope: dict = {}
    exec(compile(code[0], "README.md", "exec"), scope)  # noqa: S102 (our own README)
    assert scope["losses"][-1] < scope["losses"][0]
