"""The Hugging Face export: its dtype (``export.dtype``, default the source's), the kept
``generation_config.json``, and the streaming writer (one tensor in host memory at a time)."""

import json
import weakref

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gti_jax.io.safetensors import read_header, save_tensors
from gti_jax.models import LlamaConfig, LlamaForCausalLM
from gti_jax.models import hf as hf_module
from gti_jax.models.hf import (
    ExportTensor,
    export_hf_dir,
    model_to_tensors,
    update_generation_config,
)
from gti_jax.models.source import resolve_source, source_dtype, source_generation_config
from gti_jax.train.config import ConfigError, load_config
from gti_jax.train.inputs import TrainError
from gti_jax.train.run import _export_plan

CFG = LlamaConfig(
    vocab_size=24,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


def _hf_dir(path, config: dict, tensors: dict | None = None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_tensors(path / "model.safetensors", tensors)
    return path


def test_export_dtype_key_defaults_to_auto_and_takes_three_dtypes():
    assert load_config(None, []).export.dtype == "auto"
    for name in ("float32", "bfloat16", "float16"):
        assert load_config(None, [f"export.dtype={name}"]).export.dtype == name
    with pytest.raises(ConfigError, match="export.dtype"):
        load_config(None, ["export.dtype=int8"])


def test_source_dtype_reads_config_then_safetensors(tmp_path):
    emb = {"model.embed_tokens.weight": np.zeros((4, 2), ml_dtypes.bfloat16)}
    cases = {
        "dtype": ({"dtype": "float16"}, None, "float16"),  # transformers 5
        "torch_dtype": ({"torch_dtype": "bfloat16"}, None, "bfloat16"),  # before 5
        "stored": ({}, emb, "bfloat16"),  # no dtype in config.json: what is stored
        "float64": ({"torch_dtype": "float64"}, None, "float32"),  # not an export dtype
        "nothing": ({}, None, "float32"),
    }
    for name, (config, tensors, want) in cases.items():
        src = resolve_source(_hf_dir(tmp_path / name, config, tensors))
        assert source_dtype(src) == want, name
    assert source_dtype(resolve_source("smollm2-135m")) == "float32"  # GGUF: dequantized


def test_update_generation_config_keeps_the_rest_and_every_stop_id():
    source = {"eos_token_id": [2, 9], "do_sample": True, "temperature": 0.7, "pad_token_id": 5}
    got = update_generation_config(source, {"bos_token_id": 1, "eos_token_id": 2})
    # the source's sampling settings and its extra stop id stay; its pad id (the config
    # names none) stays; bos comes from the config
    assert got == {**source, "bos_token_id": 1}
    got = update_generation_config({"eos_token_id": 7}, {"eos_token_id": [2, 7]})
    assert got == {"eos_token_id": [7, 2]}
    assert update_generation_config({}, {"bos_token_id": None, "eos_token_id": 2}) == {
        "eos_token_id": 2
    }


def test_export_writes_the_dtype_and_keeps_the_generation_config(model, tmp_path):
    source = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 3], "transformers_version": "x"}
    out = export_hf_dir(
        model, None, None, tmp_path / "bf16", dtype=jnp.bfloat16, generation_config=source
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    header, _ = read_header(out / "model.safetensors")
    assert {info.dtype for info in header.values()} == {"BF16"}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {**source, "bos_token_id": 1}
    # the values: each float32 parameter rounded to bfloat16 (round to nearest even), exactly
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in model_to_tensors(model).items()}
    from gti_jax.io.safetensors import load_dir_tensors

    got = load_dir_tensors(out)
    assert set(got) == set(want)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    # without a source generation config: the token ids alone, as before
    out = export_hf_dir(model, None, None, tmp_path / "plain")
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_export_holds_one_tensor_at_a_time(model, tmp_path, monkeypatch):
    """Each tensor is fetched only when its bytes are written, and dropped before the next
    is fetched: at every fetch no earlier fetched array is alive."""
    real = ExportTensor.__array__
    alive: list[weakref.ref] = []
    fetched = []

    def fetch(self, dtype=None, copy=None):  # reference counting frees a dropped array
        assert all(r() is None for r in alive), "an earlier tensor is still held"
        arr = real(self, dtype, copy)
        alive.append(weakref.ref(arr))
        fetched.append(self.shape)
        return arr

    monkeypatch.setattr(ExportTensor, "__array__", fetch)
    export_hf_dir(model, None, None, tmp_path / "out", max_shard_bytes=1500)
    names = hf_module.export_tensors(model)
    assert fetched == [t.shape for t in names.values()]  # each once, in checkpoint order
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1  # across shards too
    # a process that does not write takes part in every gather, in the same order, and
    # writes nothing
    fetched.clear()
    export_hf_dir(model, None, None, tmp_path / "quiet", writer=False)
    assert fetched == [t.shape for t in names.values()]
    assert not (tmp_path / "quiet").exists()


def test_trainer_export_plan(tmp_path):
    """``export.dtype=auto`` is the source's dtype, an explicit one wins, and the source's
    generation config is read before the run (a malformed one is bad input)."""
    src = _hf_dir(tmp_path / "m", {"dtype": "bfloat16"})
    (src / "generation_config.json").write_text(json.dumps({"temperature": 0.5}))
    plan = _export_plan(load_config(None, [f"model={src}"]))
    assert plan == ("bfloat16", {"temperature": 0.5})
    plan = _export_plan(load_config(None, [f"model={src}", "export.dtype=float32"]))
    assert plan.dtype == "float32"
    assert source_generation_config(resolve_source("smollm2-135m")) is None
    assert _export_plan(load_config(None, ["model=smollm2-135m"])) == ("float32", True)
    (src / "generation_config.json").write_text("{not json")
    with pytest.raises(TrainError, match="generation_config.json: not valid JSON"):
        _export_plan(load_config(None, [f"model={src}"]))
