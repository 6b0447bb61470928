"""Parity of the Mistral and Gemma 3 families with transformers + torch on tiny random models.

Families (float32, with the tiny test tokenizer):

- "mistral": `MistralForCausalLM` through the Llama code, untied, GQA, `sliding_window=5` so
  the window cuts into the 9-token prompts and the 16 generated tokens.
- "gemma3": `Gemma3ForCausalLM`, tied, 3 layers (local, global, local) with
  `sliding_window=5`, `head_dim=16` != hidden / heads, `query_pre_attn_scalar=24` !=
  head_dim, linear RoPE scaling on the global layer, both soft-caps set (transformers'
  Gemma 3 ignores `attn_logit_softcapping`, and so do we; the final cap applies).
- "gemma3_released": as released Gemma 3 configs: no soft-caps, untied here (so the untied
  head path runs), old-style `sliding_window_pattern=2` instead of `layer_types`.

For each: logits with and without left padding, greedy decoding through the KV cache against
`generate`, export -> transformers reload, config round trip, `extend_checkpoint` on the HF
layout (old tokens' logits unchanged after extension), resize -> export -> reload.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gti_jax.io.safetensors import load_dir_tensors
from gti_jax.models import ConfigError, LlamaConfig, export_hf_dir, load_hf_dir
from gti_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from tests.helpers.beams import CANDIDATES, assert_like_transformers, hf_constrained_beams
from tests.helpers.tokenizers import save_tiny_tokenizer

FAMILIES = ("mistral", "gemma3", "gemma3_released")
ATOL = 1e-4
B, T, NEW = 3, 9, 16
WINDOW = 5

_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
_prefill = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))
_step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))


def _hf_config(family: str, vocab_size: int) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        sliding_window=WINDOW,
    )
    if family == "mistral":
        return transformers.MistralConfig(
            hidden_size=32,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            hidden_size=32,
            head_dim=16,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            tie_word_embeddings=True,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=20.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            **common,
        )
    if family == "gemma3_released":
        return transformers.Gemma3TextConfig(
            hidden_size=32,
            head_dim=8,
            num_hidden_layers=2,
            sliding_window_pattern=2,
            query_pre_attn_scalar=8,
            tie_word_embeddings=False,
            **common,
        )
    raise ValueError(family)


def make_tiny_model(root: Path, family: str, seed: int = 1) -> Path:
    out = root / f"{family}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    tok = save_tiny_tokenizer(out)
    config = _hf_config(family, len(tok))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma = family.startswith("gemma3")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma scales by (1 + w), Mistral by w
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.1 if not gemma else 0.2) * torch.randn_like(p))
    model.eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_new")
    return {family: make_tiny_model(root, family) for family in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, ckpt_dirs):
    family = request.param
    path = ckpt_dirs[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model, tok = load_hf_dir(path)
    return family, path, hf.eval(), model, tok


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


def _batch(tok, *, padded: bool):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tok), size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[0, :3] = 0
        mask[1, :1] = 0
        ids[mask == 0] = 0
    return ids, mask


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


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(ckpt, padded):
    family, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, padded=padded)
    assert T > WINDOW  # the window masks keys the full causal mask would keep
    ref = _hf_logits(hf, ids, mask)
    out = _logits(model, ids, mask)
    assert out.dtype == np.float32 and out.shape == (B, T, model.num_rows)
    real = mask.astype(bool)
    assert np.abs(ref).std() > 0.1, "random weights too small to test anything"
    assert np.abs(out - ref)[real].max() <= ATOL, family
    if padded:
        alone = _logits(model, ids[:1, 3:])
        np.testing.assert_allclose(out[0, 3:], alone[0], atol=1e-5)


def test_window_changes_logits(ckpt):
    """Without the window the logits past it differ: the test above really tests the window."""
    _, _, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=False)
    out = _logits(model, ids, mask)
    saved = model.layer_window
    try:
        model.layer_window = (None,) * len(saved)
        full = _logits(model, ids, mask)
    finally:
        model.layer_window = saved
    np.testing.assert_allclose(out[:, :WINDOW], full[:, :WINDOW], atol=1e-5)
    assert np.abs(out[:, WINDOW:] - full[:, WINDOW:]).max() > 1e-3


def test_attention_softcap_when_set(ckpt):
    """`Attention.softcap` (not set by Gemma 3 configs, see above) caps the scores."""
    _, _, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=False)
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


def _greedy(model, ids, mask, steps):
    cache = model.init_cache(ids.shape[0], ids.shape[1] + steps)
    logits, cache = _prefill(model, jnp.asarray(ids), jnp.asarray(mask), cache)
    step_logits = [logits[:, -1]]
    tokens = [jnp.argmax(logits[:, -1], axis=-1)]
    for _ in range(steps - 1):
        logits, cache = _step(model, tokens[-1][:, None], cache)
        step_logits.append(logits[:, 0])
        tokens.append(jnp.argmax(logits[:, 0], axis=-1))
    return np.stack([np.asarray(t) for t in tokens], 1), np.stack(step_logits, 1)


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
    full_ids = np.concatenate([ids, got[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones_like(got[:, :-1])], 1)
    full = _logits(model, full_ids, full_mask)
    np.testing.assert_allclose(step_logits, full[:, T - 1 :], atol=1e-5)


def test_decode_generate_matches_cache_loop(ckpt):
    """`gti_jax.models.decode.generate` (the library's loop) gives the same greedy tokens."""
    from gti_jax.models.decode import generate

    _, _, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
    got, _ = _greedy(model, ids, mask, NEW)
    prompts = [list(row[m.astype(bool)]) for row, m in zip(ids, mask, strict=True)]
    ours = generate(model, prompts, max_new_tokens=NEW, num_tokens=model.num_rows)
    for i in range(B):
        assert list(ours.tokens[i]) == list(got[i]), i


def test_constrained_beam_search_matches_transformers(ckpt):
    """Constrained beam search (prompt cache shared by the beams, log-probs at the allowed
    tokens) ranks and scores as transformers' `prefix_allowed_tokens_fn` search does
    (`tests.helpers.beams.assert_like_transformers`): the sliding window cuts into the shared
    prompt, and Gemma 3's final soft-cap shapes every log-prob. 1e-4: float32 logits of the
    two frameworks agree to ~1e-5, and a score sums <= 4 log-probs."""
    from gti_jax.models.decode import TrieConstraint, beam_search

    _, _, hf, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
    prompts = [[int(t) for t in row[m.astype(bool)]] for row, m in zip(ids, mask, strict=True)]
    eos = tok.eos_token_id
    trie = TrieConstraint.from_sequences(CANDIDATES, eos_id=eos)
    for w in (3, len(CANDIDATES)):  # fewer beams than candidates, and as many (exhaustive)
        kw = dict(num_beams=w, max_new_tokens=trie.max_length)
        ours = beam_search(model, prompts, constraint=trie, pad_id=eos, **kw)
        seqs, scores = hf_constrained_beams(hf, prompts, trie, pad=eos, **kw)
        exhaustive = w == len(CANDIDATES)
        assert_like_transformers(ours, seqs, scores, atol=1e-4, exhaustive=exhaustive)


def test_export_reload_in_transformers(ckpt, tmp_path):
    family, path, hf, model, tok = ckpt
    out = export_hf_dir(model, None, tok, tmp_path / "export")
    original, exported = load_dir_tensors(path), load_dir_tensors(out)
    assert set(exported) == set(original)
    for name, arr in original.items():
        np.testing.assert_array_equal(exported[name], arr, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(reloaded) is type(hf)
    for key in ("sliding_window", "tie_word_embeddings", "head_dim", "rope_parameters"):
        assert getattr(reloaded.config, key) == getattr(hf.config, key), key
    if family.startswith("gemma3"):
        for key in ("layer_types", "query_pre_attn_scalar", "final_logit_softcapping"):
            assert getattr(reloaded.config, key) == getattr(hf.config, key), key
    ids, mask = _batch(tok, padded=True)
    np.testing.assert_allclose(
        _hf_logits(reloaded.eval(), ids, mask), _hf_logits(hf, ids, mask), atol=1e-6
    )


def test_config_round_trips_through_transformers(ckpt, tmp_path):
    _, path, hf, model, _ = ckpt
    cfg = LlamaConfig.from_json_file(path / "config.json")
    assert cfg == model.config
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    again = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(again) is type(hf.config)
    assert LlamaConfig.from_hf_dict(again.to_dict()) == cfg
    assert hash(cfg) == hash(LlamaConfig.from_hf_dict(cfg.to_hf_dict()))


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
    ids, mask = _batch(tok, padded=True)
    before, after = _hf_logits(hf, ids, mask), _hf_logits(hf2, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(after[..., :n_old][real], before[..., :n_old][real], atol=1e-5)
    # gti_jax loads the extended directory too, and agrees with transformers on new ids.
    grown, _ = load_hf_dir(out)
    ids[:, -2:] = [n_old + 1, n_old + 4]
    np.testing.assert_allclose(
        _logits(grown, ids, mask)[real], _hf_logits(hf2, ids, mask)[real], atol=ATOL
    )


def test_resize_export_reload_parity(ckpt, tmp_path):
    import copy

    from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab
    from gti_jax.vocab.tokens import extend_tokenizer

    _, _, _, model, tok = ckpt
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
    ids, mask = _batch(tok, padded=False)
    ids[:, -2:] = [n_old + 1, n_old + 4]
    np.testing.assert_allclose(_logits(grown, ids, mask), _hf_logits(hf2, ids, mask), atol=ATOL)


def test_ground_logits_equal_model_logits(ckpt):
    """Grounding feeds raw table rows to `hidden_states` (Gemma 3 scales them there) and adds
    the new logit columns itself, soft-capped as the model's (`finish_logits`): with the new
    rows equal to the table's, logits agree, for the soft-capped tiny Gemma 3 too."""
    from gti_jax.train.ground import ground_logits, split_new_rows

    family, _, _, model, tok = ckpt
    new = range(model.num_rows - 4, model.num_rows)
    params = split_new_rows(nnx.state(model), new, tied=bool(model.config.tie_word_embeddings))
    ids, mask = _batch(tok, padded=True)
    ids[:, -3:] = [new[0], new[3], new[1]]
    real = mask.astype(bool)
    ref = _logits(model, ids, mask)
    out = np.asarray(ground_logits(model, params, new.start, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)


def test_bf16_compute_close_to_f32(ckpt):
    family, path, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
    ref = _logits(model, ids, mask)
    low, _ = load_hf_dir(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, with_tokenizer=False)
    out = _logits(low, ids, mask)
    real = mask.astype(bool)
    err = np.abs(out - ref)[real]
    assert out.dtype == np.float32 and 0 < err.max() < 0.3, (family, err.max())
    assert (out.argmax(-1) == ref.argmax(-1))[real].mean() > 0.8


def test_lora_targets_and_sharded_load(ckpt):
    """LoRA wraps the same projections (a zero-initialized B keeps the logits), and the
    sharded load puts the Gemma-only norms through the sharding rules."""
    from gti_jax.models.sharding import make_mesh
    from gti_jax.train.lora import LORA_TARGETS, apply_lora

    _, path, _, model, tok = ckpt
    ids, mask = _batch(tok, padded=True)
    ref = _logits(model, ids, mask)
    lora = apply_lora(
        model, rank=2, alpha=4.0, dropout=0.0, targets=tuple(LORA_TARGETS), rngs=nnx.Rngs(0)
    )
    assert lora.layers[-1].mlp.down_proj.adapter is not None
    np.testing.assert_allclose(_logits(lora, ids, mask), ref, atol=1e-6)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_hf_dir(path, mesh=mesh, with_tokenizer=False)
    assert len(sharded.layers[0].mlp.gate_proj.kernel[...].sharding.device_set) == 8
    np.testing.assert_allclose(_logits(sharded, ids, mask), ref, atol=1e-5)


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
