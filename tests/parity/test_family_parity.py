"""Parity of every model family with transformers + torch on tiny random checkpoints.

The families (built by `tests.helpers.hf_models.make_tiny_hf_model`, seed 1): Llama (tied,
Llama-3 RoPE), Qwen2 (biases, spare rows), Qwen3 (q/k norms, head_dim != hidden / heads),
Mistral (sliding window, through the Llama code), Gemma 3 (local/global layers, soft-caps,
tied) and Gemma 3 as released (no soft-caps, untied, `sliding_window_pattern`).

Shared tests, one per mechanism, run on every family: logits with and without left padding,
greedy decoding through the KV cache against `generate`, export -> transformers reload,
config round trip, sharded load, resize -> export -> reload, bf16. Family-specific tests
follow them, each on the families it was written for.

Speed: on the fast lane (`-m "not slow"`) the Llama-family tests run on qwen3 only (llama
and qwen2 are slow), and the tests that compile long loops (greedy decoding, generation after
resize) are slow where they were before; the sliding families keep their fast tests, but
constrained beam search runs on gemma3 only in the fast lane.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gti_jax.io.safetensors import load_dir_tensors, read_header
from gti_jax.models import (
    CheckpointMismatchError,
    ConfigError,
    LlamaConfig,
    export_hf_dir,
    load_hf_dir,
    load_pretrained,
    model_from_tensors,
    model_to_tensors,
)
from gti_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from gti_jax.models.sharding import make_mesh
from tests.helpers.beams import CANDIDATES, assert_like_transformers, hf_constrained_beams
from tests.helpers.hf_models import (
    ALL_FAMILIES,
    FAMILIES,
    SLIDING_FAMILIES,
    WINDOW,
    make_tiny_hf_model,
)

ATOL = 1e-4
B, T, NEW = 3, 9, 16
# Left padding of row 0 in the padded batch: 4 for the Llama families, 3 for the sliding
# ones (6 real tokens > WINDOW, so the window cuts into the padded row too).
LEFT_PAD = {f: 3 if f in SLIDING_FAMILIES else 4 for f in ALL_FAMILIES}


def families(among=ALL_FAMILIES, *, slow=("llama", "qwen2")):
    """`ckpt` parameters for `among`, slow where named (by default the Llama families other
    than qwen3, which the fast lane checks: q/k norms, head_dim != hidden / heads)."""
    return [pytest.param(f, marks=pytest.mark.slow) if f in slow else f for f in among]


# Jitted entry points: one compile per shape instead of one per eager op.
_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
_prefill = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))
_step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))


def _logits(model, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def _hf_logits(hf, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = hf(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


def _batch(tok, family, *, padded: bool):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tok), size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[0, : LEFT_PAD[family]] = 0
        mask[1, :1] = 0
        ids[mask == 0] = 0
    return ids, mask


def _greedy(model, ids, mask, steps):
    """The simplest greedy loop over the KV cache API: prefill, then one token a step."""
    cache = model.init_cache(ids.shape[0], ids.shape[1] + steps)
    logits, cache = _prefill(model, jnp.asarray(ids), jnp.asarray(mask), cache)
    step_logits = [logits[:, -1]]
    tokens = [jnp.argmax(logits[:, -1], axis=-1)]
    for _ in range(steps - 1):
        logits, cache = _step(model, tokens[-1][:, None], cache)
        step_logits.append(logits[:, 0])
        tokens.append(jnp.argmax(logits[:, 0], axis=-1))
    assert int(cache.index) == ids.shape[1] + steps - 1
    return np.stack([np.asarray(t) for t in tokens], 1), np.stack(step_logits, 1)


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_tiny_hf_model(root, family, seed=1) for family in ALL_FAMILIES}


@pytest.fixture(scope="module")
def ckpt(request, ckpt_dirs):
    """(family, checkpoint dir, torch model, jax model, tokenizer) for one family; tests pick
    the families with `@pytest.mark.parametrize("ckpt", families(...), indirect=True)`."""
    family = request.param
    path = ckpt_dirs[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model, tok = load_hf_dir(path)
    return family, path, hf.eval(), model, tok


def _resize_and_export(model, tok, tmp_path):
    """extend + resize_vocab on the NNX model, then export: (grown model, tokenizer, old
    token count, transformers reload of the export)."""
    from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab
    from gti_jax.vocab.tokens import extend_tokenizer

    tok = copy.deepcopy(tok)
    n_old = len(tok)
    extend_tokenizer(tok, [f"<z_{i}>" for i in range(5)])
    graphdef, state = nnx.split(model)
    state = resize_vocab(
        state,
        EmbeddingSpec.nnx_llama(tied=bool(model.config.tie_word_embeddings)),
        len(tok),
        "mean_noise",
        jax.random.key(3),
        num_tokens=n_old,
        pad_to_multiple_of=16,
    )
    grown = nnx.merge(graphdef, state)
    out = export_hf_dir(grown, None, tok, tmp_path / "export")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf2.config.vocab_size == grown.num_rows
    return grown, tok, n_old, hf2


# ---------------------------------------------------------------- shared: every family


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ckpt", families(), indirect=True)
def test_logits_match_transformers(ckpt, padded):
    family, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=padded)
    assert T > WINDOW  # the window masks keys the full causal mask would keep
    ref = _hf_logits(hf, ids, mask)
    out = _logits(model, ids, mask)
    assert out.dtype == np.float32 and out.shape == (B, T, model.num_rows)
    real = mask.astype(bool)
    assert np.abs(ref).std() > 0.1, "random weights too small to test anything"
    assert np.abs(out - ref)[real].max() <= ATOL, family
    if padded:
        # A left-padded row gives the same logits as the same prompt alone.
        pad = LEFT_PAD[family]
        alone = _logits(model, ids[:1, pad:])
        np.testing.assert_allclose(out[0, pad:], alone[0], atol=1e-5)


# tens of seconds of compiling on 2 cores: slow for the Llama families as before, fast for
# the sliding ones (where the window meets the cache)
@pytest.mark.parametrize("ckpt", families(slow=FAMILIES), indirect=True)
def test_greedy_generation_matches_transformers(ckpt):
    family, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=True)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            pad_token_id=0,
        )[:, T:].numpy()
    got, step_logits = _greedy(model, ids, mask, NEW)
    np.testing.assert_array_equal(got, ref, err_msg=family)
    assert len(np.unique(got)) > 3, "degenerate generation cannot test decoding"
    # The cached steps equal one full forward pass over prompt + generated tokens.
    full_ids = np.concatenate([ids, got[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones_like(got[:, :-1])], 1)
    full = _logits(model, full_ids, full_mask)
    np.testing.assert_allclose(step_logits, full[:, T - 1 :], atol=1e-5)


@pytest.mark.parametrize("ckpt", families(), indirect=True)
def test_export_reload_in_transformers(ckpt, tmp_path):
    family, path, hf, model, tok = ckpt
    out = export_hf_dir(model, None, tok, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == model.num_rows
    names = set(read_header(out / "model.safetensors")[0])
    assert ("lm_head.weight" in names) == (not model.config.tie_word_embeddings)
    original, exported = load_dir_tensors(path), load_dir_tensors(out)
    assert set(exported) == set(original)
    for name, arr in original.items():
        np.testing.assert_array_equal(exported[name], arr, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(reloaded) is type(hf)
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    # every one of these keys the source config has (Qwen2's lacks head_dim, Llama's
    # sliding_window); the sliding families have all three
    for key in ("sliding_window", "head_dim", "rope_parameters"):
        if family in SLIDING_FAMILIES or hasattr(hf.config, key):
            assert getattr(reloaded.config, key) == getattr(hf.config, key), key
    if family.startswith("gemma3"):
        for key in ("layer_types", "query_pre_attn_scalar", "final_logit_softcapping"):
            assert getattr(reloaded.config, key) == getattr(hf.config, key), key
    ids, mask = _batch(tok, family, padded=True)
    np.testing.assert_allclose(
        _hf_logits(reloaded.eval(), ids, mask), _hf_logits(hf, ids, mask), atol=1e-6
    )
    assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == len(tok)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf_dir(model, None, tok, out)
    export_hf_dir(model, None, None, out, overwrite=True, dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left"


@pytest.mark.parametrize("ckpt", families(), indirect=True)
def test_config_round_trips_through_transformers(ckpt, tmp_path):
    _, path, hf, model, _ = ckpt
    cfg = LlamaConfig.from_json_file(path / "config.json")
    assert cfg == model.config
    assert cfg.head_dim == hf.model.layers[0].self_attn.head_dim
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    again = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(again) is type(hf.config)
    assert LlamaConfig.from_hf_dict(again.to_dict()) == cfg
    assert hash(cfg) == hash(LlamaConfig.from_hf_dict(cfg.to_hf_dict()))


@pytest.mark.parametrize("ckpt", families(), indirect=True)
def test_load_pretrained_dir(ckpt):
    _, path, _, model, _ = ckpt
    loaded, tok = load_pretrained(path)
    assert loaded.config == model.config and len(tok) > 0


@pytest.mark.parametrize("ckpt", families(), indirect=True)
def test_sharded_load_round_trips_state(ckpt):
    """The sharded load puts every tensor (the Gemma-only norms too) through the sharding
    rules, and gives back the same tensors and logits."""
    family, path, _, model, tok = ckpt
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_hf_dir(path, mesh=mesh, with_tokenizer=False)
    assert len(sharded.layers[0].mlp.gate_proj.kernel[...].sharding.device_set) == 8
    original = load_dir_tensors(path)
    back = model_to_tensors(sharded)
    assert set(back) == set(original)
    for name, arr in original.items():
        np.testing.assert_array_equal(back[name], arr, err_msg=name)
    ids, mask = _batch(tok, family, padded=True)
    np.testing.assert_allclose(_logits(sharded, ids, mask), _logits(model, ids, mask), atol=1e-5)


# tens of seconds of compiling on 2 cores for the Llama families (slow as before)
@pytest.mark.parametrize("ckpt", families(slow=FAMILIES), indirect=True)
def test_resize_export_reload_parity(ckpt, tmp_path):
    """After extend + resize_vocab on the NNX model, export -> transformers reload: logits over
    the whole new vocabulary agree within 1e-4."""
    family, _, _, model, tok = ckpt
    grown, tok, n_old, hf2 = _resize_and_export(model, tok, tmp_path)
    ids, mask = _batch(tok, family, padded=False)
    ids[:, -2:] = [n_old + 1, n_old + 4]  # new tokens in the input too
    np.testing.assert_allclose(_logits(grown, ids, mask), _hf_logits(hf2, ids, mask), atol=ATOL)


# a greedy decode compile per family: slow everywhere
@pytest.mark.parametrize("ckpt", families(slow=ALL_FAMILIES), indirect=True)
def test_resize_export_reload_generates_the_same(ckpt, tmp_path):
    """After the same resize -> export -> reload, 16 greedy tokens (`decode.generate` against
    `generate`) from a prompt holding new tokens are identical."""
    from gti_jax.models.decode import generate

    family, _, _, model, tok = ckpt
    grown, tok, n_old, hf2 = _resize_and_export(model, tok, tmp_path)
    ids, _ = _batch(tok, family, padded=False)
    ids[:, -2:] = [n_old + 1, n_old + 4]
    prompt = ids[:1]
    ours = generate(grown, [list(prompt[0])], max_new_tokens=NEW, num_tokens=grown.num_rows)
    with torch.no_grad():
        ref = hf2.generate(
            torch.tensor(prompt, dtype=torch.long),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
        )
    assert list(ours.tokens[0]) == ref[0, prompt.shape[1] :].tolist()


# bf16 keeps 8 mantissa bits (relative error ~4e-3 a rounding); through 2-3 layers the logits
# move by a few hundredths on average. Gemma's weights are drawn twice as large (std 0.2) and
# its logits larger, so its bound on the largest error is looser.
BF16_MAX_ERR = {f: 0.3 if f in SLIDING_FAMILIES else 0.15 for f in ALL_FAMILIES}


@pytest.mark.parametrize("ckpt", families(), indirect=True)
def test_bf16_compute_close_to_f32(ckpt):
    family, path, _, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=True)
    ref = _logits(model, ids, mask)
    low, _ = load_hf_dir(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, with_tokenizer=False)
    assert low.embed.embedding[...].dtype == jnp.bfloat16
    out = _logits(low, ids, mask)
    assert out.dtype == np.float32
    real = mask.astype(bool)
    err = np.abs(out - ref)[real]
    assert err.max() < BF16_MAX_ERR[family], (family, err.max(), err.mean())
    if family in FAMILIES:
        assert err.mean() < 0.03, (family, err.max(), err.mean())
    assert err.max() > 0, "bf16 path did not compute in bf16"
    assert (out.argmax(-1) == ref.argmax(-1))[real].mean() > 0.8


# ---------------------------------------------------------------- Llama families


@pytest.mark.parametrize("ckpt", families(FAMILIES), indirect=True)
def test_cache_take_reorders_rows(ckpt):
    family, _, _, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=True)
    # Same shapes as the greedy test, so the jitted prefill/step are reused.
    cache = model.init_cache(B, T + NEW)
    logits, cache = _prefill(model, jnp.asarray(ids), jnp.asarray(mask), cache)
    rows = jnp.array([2, 2, 0])  # repeat one row, drop another, reorder
    nxt = jnp.argmax(logits[:, -1], -1)[rows][:, None]
    step, _ = _step(model, nxt, cache.take(rows))
    ref_ids, ref_mask = jnp.asarray(ids)[rows], jnp.asarray(mask)[rows]
    _, ref_cache = _prefill(model, ref_ids, ref_mask, model.init_cache(B, T + NEW))
    ref_step, _ = _step(model, nxt, ref_cache)
    np.testing.assert_allclose(np.asarray(step), np.asarray(ref_step), atol=1e-5)


@pytest.mark.parametrize("ckpt", families(FAMILIES), indirect=True)
def test_loader_reports_every_mismatch_at_once(ckpt):
    family, path, _, model, _ = ckpt
    tensors = dict(load_dir_tensors(path))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.layers.7.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        model_from_tensors(model.config, tensors)
    msg = str(err.value)
    assert "4 problems" in msg
    for part in (
        "missing tensor model.layers.1.self_attn.k_proj.weight",
        "unexpected tensor model.layers.0.mlp.extra.weight",
        "unexpected tensor model.layers.7.mlp.up_proj.weight",
        "wrong shape for model.layers.0.self_attn.q_proj.weight: [3, 3]",
    ):
        assert part in msg, (part, msg)


def test_tied_head_is_structural_and_checked(ckpt_dirs):
    path = ckpt_dirs["llama"]
    tensors = dict(load_dir_tensors(path))
    cfg = LlamaConfig.from_json_file(path / "config.json")
    assert cfg.tie_word_embeddings
    emb = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = np.array(emb)  # a tied checkpoint that stores the head
    model = model_from_tensors(cfg, tensors)
    assert not hasattr(model, "lm_head")
    tensors["lm_head.weight"] = np.array(emb) + 1
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings"):
        model_from_tensors(cfg, tensors)
    # Logits follow the embedding table: changing a row changes that token's logit.
    ids = np.array([[5, 6, 7]])
    before = _logits(model, ids)
    model.embed.embedding[...] = model.embed.embedding[...].at[11].set(0.0)
    after = _logits(model, ids)
    assert after[0, 0, 11] == 0.0 and abs(before[0, 0, 11]) > 0
    np.testing.assert_array_equal(after[..., :11], before[..., :11])


BASE = dict(
    model_type="llama",
    vocab_size=16,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model_type": "mixtral"}, "model_type"),
        ({"use_sliding_window": True, "model_type": "qwen2"}, "use_sliding_window"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}}, "rope_parameters"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unsupported_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_dict({**BASE, **changes})


def test_rope_theta_read_from_either_place():
    old = LlamaConfig.from_hf_dict({**BASE, "rope_theta": 500000.0})
    new = LlamaConfig.from_hf_dict({**BASE, "rope_parameters": {"rope_theta": 500000.0}})
    assert old.rope_theta == new.rope_theta == 500000.0
    legacy = LlamaConfig.from_hf_dict(
        {
            **BASE,
            "rope_theta": 5e5,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert legacy.rope_scaling["rope_type"] == "llama3"
    assert legacy.to_hf_dict()["rope_parameters"]["factor"] == 8.0
    assert jax.tree.leaves(legacy.rope_scaling)  # hashable despite the dict
    assert hash(legacy) == hash(LlamaConfig.from_hf_dict(legacy.to_hf_dict()))


# ---------------------------------------------------------------- sliding families


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_model_class_and_window(ckpt):
    family, _, hf, model, _ = ckpt
    assert isinstance(model, Gemma3ForCausalLM) == family.startswith("gemma3")
    assert model.config.sliding_window == WINDOW
    if family == "mistral":
        assert type(model.config) is LlamaConfig and model.config.model_type == "mistral"
        assert model.layer_window == (WINDOW, WINDOW)
    else:
        assert list(model.config.layer_types) == list(hf.config.layer_types)
        assert {None, WINDOW} == set(model.layer_window)  # a local and a global layer
        assert len(set(model.layer_inv_freq)) == 2  # different RoPE bases


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_window_changes_logits(ckpt):
    """Without the window the logits past it differ: the logits test really tests the window."""
    family, _, _, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=False)
    out = _logits(model, ids, mask)
    saved = model.layer_window
    try:
        model.layer_window = (None,) * len(saved)
        full = _logits(model, ids, mask)
    finally:
        model.layer_window = saved
    np.testing.assert_allclose(out[:, :WINDOW], full[:, :WINDOW], atol=1e-5)
    assert np.abs(out[:, WINDOW:] - full[:, WINDOW:]).max() > 1e-3


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_attention_softcap_when_set(ckpt):
    """`Attention.softcap` (not set by Gemma 3 configs, see the module helpers) caps the
    scores."""
    family, _, _, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=False)
    out = _logits(model, ids, mask)
    try:
        for layer in model.layers:
            layer.self_attn.softcap = 1e6
        np.testing.assert_allclose(_logits(model, ids, mask), out, atol=1e-5)
        for layer in model.layers:
            layer.self_attn.softcap = 0.05
        capped = _logits(model, ids, mask)
    finally:
        for layer in model.layers:
            layer.self_attn.softcap = None
    assert np.abs(capped[:, 1:] - out[:, 1:]).max() > 1e-3


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_decode_generate_matches_cache_loop(ckpt):
    """`gti_jax.models.decode.generate` (the library's loop) gives the same greedy tokens."""
    from gti_jax.models.decode import generate

    family, _, _, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=True)
    got, _ = _greedy(model, ids, mask, NEW)
    prompts = [list(row[m.astype(bool)]) for row, m in zip(ids, mask, strict=True)]
    ours = generate(model, prompts, max_new_tokens=NEW, num_tokens=model.num_rows)
    for i in range(B):
        assert list(ours.tokens[i]) == list(got[i]), i


# two beam searches and their transformers references per family (4-6 s on 2 cores): the fast
# lane keeps gemma3 (window and soft-cap), the full suite every sliding family
@pytest.mark.parametrize(
    "ckpt", families(SLIDING_FAMILIES, slow=("mistral", "gemma3_released")), indirect=True
)
def test_constrained_beam_search_matches_transformers(ckpt):
    """Constrained beam search (prompt cache shared by the beams, log-probs at the allowed
    tokens) ranks and scores as transformers' `prefix_allowed_tokens_fn` search does
    (`tests.helpers.beams.assert_like_transformers`): the sliding window cuts into the shared
    prompt, and Gemma 3's final soft-cap shapes every log-prob. 1e-4: float32 logits of the
    two frameworks agree to ~1e-5, and a score sums <= 4 log-probs."""
    from gti_jax.models.decode import TrieConstraint, beam_search

    family, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=True)
    prompts = [[int(t) for t in row[m.astype(bool)]] for row, m in zip(ids, mask, strict=True)]
    eos = tok.eos_token_id
    trie = TrieConstraint.from_sequences(CANDIDATES, eos_id=eos)
    for w in (3, len(CANDIDATES)):  # fewer beams than candidates, and as many (exhaustive)
        kw = dict(num_beams=w, max_new_tokens=trie.max_length)
        ours = beam_search(model, prompts, constraint=trie, pad_id=eos, **kw)
        seqs, scores = hf_constrained_beams(hf, prompts, trie, pad=eos, **kw)
        exhaustive = w == len(CANDIDATES)
        assert_like_transformers(ours, seqs, scores, atol=1e-4, exhaustive=exhaustive)


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_extend_checkpoint_keeps_old_logits(ckpt, tmp_path):
    """`extend_checkpoint` on the family's HF layout: transformers reloads the extended
    directory, and the logits of old tokens over the old vocabulary are unchanged."""
    from gti_jax.extend import extend_checkpoint

    family, path, hf, model, tok = ckpt
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(
        "".join(
            json.dumps({"token": f"<z_{i}>", "description": "a new thing"}) + "\n" for i in range(5)
        )
    )
    out = tmp_path / "extended"
    extend_checkpoint(str(path), tokens, out, init="mean", pad_to_multiple_of=8)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    n_old = len(tok)
    assert len(tok2) == n_old + 5 and hf2.config.vocab_size % 8 == 0
    ids, mask = _batch(tok, family, padded=True)
    before, after = _hf_logits(hf, ids, mask), _hf_logits(hf2, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(after[..., :n_old][real], before[..., :n_old][real], atol=1e-5)
    # gti_jax loads the extended directory too, and agrees with transformers on new ids.
    grown, _ = load_hf_dir(out)
    ids[:, -2:] = [n_old + 1, n_old + 4]
    np.testing.assert_allclose(
        _logits(grown, ids, mask)[real], _hf_logits(hf2, ids, mask)[real], atol=ATOL
    )


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_ground_logits_equal_model_logits(ckpt):
    """Grounding feeds raw table rows to `hidden_states` (Gemma 3 scales them there) and adds
    the new logit columns itself, soft-capped as the model's (`finish_logits`): with the new
    rows equal to the table's, logits agree, for the soft-capped tiny Gemma 3 too."""
    from gti_jax.train.ground import ground_logits, split_new_rows

    family, _, _, model, tok = ckpt
    new = range(model.num_rows - 4, model.num_rows)
    params = split_new_rows(nnx.state(model), new, tied=bool(model.config.tie_word_embeddings))
    ids, mask = _batch(tok, family, padded=True)
    ids[:, -3:] = [new[0], new[3], new[1]]
    real = mask.astype(bool)
    ref = _logits(model, ids, mask)
    out = np.asarray(ground_logits(model, params, new.start, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)


@pytest.mark.parametrize("ckpt", families(SLIDING_FAMILIES), indirect=True)
def test_lora_targets_keep_logits(ckpt):
    """LoRA wraps the same projections (a zero-initialized B keeps the logits)."""
    from gti_jax.train.lora import LORA_TARGETS, apply_lora

    family, _, _, model, tok = ckpt
    ids, mask = _batch(tok, family, padded=True)
    ref = _logits(model, ids, mask)
    lora = apply_lora(
        model, rank=2, alpha=4.0, dropout=0.0, targets=tuple(LORA_TARGETS), rngs=nnx.Rngs(0)
    )
    assert lora.layers[-1].mlp.down_proj.adapter is not None
    # B = 0 adds exact zeros, but the wrapped projections are other compiled programs: XLA
    # may fuse and contract (FMA) their float32 arithmetic differently (it does at LLVM's
    # level 2), so the logits agree to float32 rounding of the model's largest logits.
    tol = 16 * np.finfo(np.float32).eps * float(np.abs(ref).max())
    np.testing.assert_allclose(_logits(lora, ids, mask), ref, rtol=0, atol=tol)


GEMMA = dict(
    model_type="gemma3_text",
    vocab_size=16,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    head_dim=4,
)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_activation": "silu"}, "hidden_activation"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ({"layer_types": ["chunked_attention"] * 2}, "layer_types"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"sliding_window": None}, "sliding_window"),
        ({"model_type": "gemma3"}, "text_config"),
    ],
)
def test_unsupported_gemma3_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_dict({**GEMMA, **changes})


def test_config_classes_refuse_each_others_types():
    with pytest.raises(ConfigError, match="Gemma3Config"):
        LlamaConfig(**{**GEMMA, "sliding_window": 4})
    with pytest.raises(ConfigError, match="model_type"):
        Gemma3Config(**{**GEMMA, "model_type": "llama"})
    with pytest.raises(ConfigError, match="sliding_window"):
        LlamaConfig.from_hf_dict({**GEMMA, "model_type": "llama", "sliding_window": 0}).replace(
            sliding_window=4
        )
    assert (
        LlamaConfig.from_hf_dict(
            {**GEMMA, "model_type": "mistral", "sliding_window": None}
        ).to_hf_dict()["sliding_window"]
        is None
    )
