"""Parity of the NNX Llama family with transformers + torch on tiny random checkpoints.

For each family (Llama tied + Llama-3 RoPE, Qwen2 biases + spare rows, Qwen3 q/k norms with
head_dim != hidden / heads): logits with and without left padding, greedy decoding through the
KV cache against `generate`, export -> transformers reload, sharded load round trip, bf16.
"""

from __future__ import annotations

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
from gti_jax.models.sharding import make_mesh
from tests.helpers.hf_models import FAMILIES, make_tiny_hf_model

ATOL = 1e-4
B, T, NEW = 3, 9, 16


# Jitted entry points: one compile per shape instead of one per eager op.
_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
_prefill = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))
_step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))


def _logits(model, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_tiny_hf_model(root, family, seed=1) for family in FAMILIES}


# the fast lane checks qwen3 (q/k norms, head_dim != hidden / heads); llama and qwen2 are slow
@pytest.fixture(
    scope="module",
    params=[f if f == "qwen3" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def ckpt(request, ckpt_dirs):
    """(family, checkpoint dir, torch model, jax model, tokenizer) for one family."""
    family = request.param
    path = ckpt_dirs[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model, tok = load_hf_dir(path)
    return family, path, hf.eval(), model, tok


def _batch(tok, *, padded: bool):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tok), size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[0, :4] = 0
        mask[1, :1] = 0
        ids[mask == 0] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = hf(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(ckpt, padded):
    family, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, padded=padded)
    ref = _hf_logits(hf, ids, mask)
    out = _logits(model, ids, mask)
    assert out.dtype == np.float32 and out.shape == (B, T, model.num_rows)
    real = mask.astype(bool)
    assert np.abs(ref).std() > 0.1, "random weights too small to test anything"
    assert np.abs(out - ref)[real].max() <= ATOL, family
    if padded:
        # A left-padded row gives the same logits as the same prompt alone.
        alone = _logits(model, ids[:1, 4:])
        np.testing.assert_allclose(out[0, 4:], alone[0], atol=1e-5)


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


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_greedy_generation_matches_transformers(ckpt):
    family, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
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


def test_cache_take_reorders_rows(ckpt):
    _, _, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
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


def test_export_reload_in_transformers(ckpt, tmp_path):
    family, path, hf, model, tok = ckpt
    out = export_hf_dir(model, None, tok, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == model.num_rows
    names = set(read_header(out / "model.safetensors")[0])
    assert ("lm_head.weight" in names) == (not model.config.tie_word_embeddings)
    original = load_dir_tensors(path)
    exported = load_dir_tensors(out)
    assert set(exported) == set(original)
    for name, arr in original.items():
        np.testing.assert_array_equal(exported[name], arr, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(reloaded) is type(hf)
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids, mask = _batch(tok, padded=True)
    np.testing.assert_allclose(
        _hf_logits(reloaded.eval(), ids, mask), _hf_logits(hf, ids, mask), atol=1e-6
    )
    assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == len(tok)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf_dir(model, None, tok, out)
    export_hf_dir(model, None, None, out, overwrite=True, dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left"


def test_sharded_load_round_trips_state(ckpt):
    _, path, _, model, tok = ckpt
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_hf_dir(path, mesh=mesh, with_tokenizer=False)
    assert len(sharded.layers[0].mlp.gate_proj.kernel[...].sharding.device_set) == 8
    original = load_dir_tensors(path)
    back = model_to_tensors(sharded)
    assert set(back) == set(original)
    for name, arr in original.items():
        np.testing.assert_array_equal(back[name], arr, err_msg=name)
    ids, mask = _batch(tok, padded=True)
    np.testing.assert_allclose(_logits(sharded, ids, mask), _logits(model, ids, mask), atol=1e-5)


def test_bf16_compute_close_to_f32(ckpt):
    family, path, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
    ref = _logits(model, ids, mask)
    low, _ = load_hf_dir(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, with_tokenizer=False)
    assert low.embed.embedding[...].dtype == jnp.bfloat16
    out = _logits(low, ids, mask)
    assert out.dtype == np.float32
    err = np.abs(out - ref)[mask.astype(bool)]
    assert err.max() < 0.15 and err.mean() < 0.03, (family, err.max(), err.mean())
    assert err.max() > 0, "bf16 path did not compute in bf16"
    assert (out.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].mean() > 0.8


def test_load_pretrained_dir(ckpt):
    _, path, _, model, _ = ckpt
    loaded, tok = load_pretrained(path)
    assert loaded.config == model.config and len(tok) > 0


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


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_resize_export_reload_parity(ckpt, tmp_path):
    """After extend + resize_vocab on the NNX model, export -> transformers reload: logits over
    the whole new vocabulary agree within 1e-4 and 16 greedy tokens are identical."""
    import copy

    from gti_jax.models.decode import generate
    from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab
    from gti_jax.vocab.tokens import extend_tokenizer

    family, path, hf, model, tok = ckpt
    tok = copy.deepcopy(tok)
    n_old = len(tok)
    extend_tokenizer(tok, [f"<z_{i}>" for i in range(5)])
    graphdef, state = nnx.split(model)
    tied = bool(model.config.tie_word_embeddings)
    state = resize_vocab(
        state,
        EmbeddingSpec.nnx_llama(tied=tied),
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
    ids, mask = _batch(tok, padded=False)
    ids[:, -2:] = [n_old + 1, n_old + 4]  # new tokens in the input too
    np.testing.assert_allclose(_logits(grown, ids, mask), _hf_logits(hf2, ids, mask), atol=ATOL)
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
