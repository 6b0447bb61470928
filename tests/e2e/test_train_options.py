"""Trainer options that no other test runs, together in one tiny run.

``ground.compute_dtype`` and ``sft.compute_dtype`` = bfloat16 (on CPU), a sharded Hugging
Face checkpoint (``model.safetensors.index.json`` naming several files), full fine-tuning
(``sft.lora_rank=0``), a given ``data.pairs`` file and ``sft.aux_pairs_ratio > 0`` (the
auxiliary pairs mixed into fine-tuning) and ``export.dtype=bfloat16``; and a GGUF model
through extension and training. The run must finish every stage, and its export must show
that the whole checkpoint was read (every tensor within a few optimizer steps of the base
model's), that full fine-tuning trained every weight, and that the bfloat16 export is what
transformers loads as bfloat16 with the run's logits.
"""

import json
import math
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from gti_jax.io.safetensors import load_dir_tensors, read_header
from gti_jax.train.__main__ import main
from gti_jax.train.checkpoint import load_rows
from tests.helpers.gguf_models import llama_cpp_order, write_tiny_gguf
from tests.helpers.tiny_task import NAMES, TOKENS, capture_export

# two whole trainer runs
pytestmark = pytest.mark.slow


def _sharded_copy(model_dir, out):
    """The same checkpoint saved in at least three safetensors files with an index."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(str(out), max_shard_size=max(total // 4, 1))
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith(("model", "config.json")):
            shutil.copy(f, out / f.name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not (out / "model.safetensors").exists()
    return out


def _assert_bf16_export_matches(jax_model, export_dir):
    """transformers loads the bfloat16 export as bfloat16 (``dtype="auto"`` follows
    config.json) and computes the run's logits, new tokens included, within bf16 tolerance."""
    header, _ = read_header(export_dir / "model.safetensors")
    assert {info.dtype for info in header.values()} == {"BF16"}
    assert json.loads((export_dir / "config.json").read_text())["dtype"] == "bfloat16"
    info = json.loads((export_dir.parent / "new_tokens.json").read_text())
    lo, hi = info["new_ids"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hi, size=(3, 12)).astype(np.int32)
    ids[:, ::3] = rng.integers(lo, hi, size=(3, 4))  # new tokens at every third position
    want = np.asarray(jax_model(ids), np.float32)  # the run's model: float32 parameters
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = hf(torch.from_numpy(ids).long()).logits.float().numpy()
    assert got.shape == want.shape
    # bfloat16 keeps 8 significant bits (unit roundoff 2^-9): weights rounded once, then
    # every matmul, norm and residual of the 2 layers rounded again in bf16 compute, so the
    # logits carry a few dozen roundings of relative size 2^-9 of their scale (measured:
    # 0.044 on a scale of 3.1, i.e. 7 roundings' worth)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=32 * 2**-9 * scale)


def test_bf16_full_finetune_on_sharded_checkpoint_with_pairs_and_aux(
    task, tmp_path, capsys, monkeypatch
):
    model = _sharded_copy(task.model, tmp_path / "sharded")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"The token for {n} is", "completion": t}) + "\n"
            for t, n in zip(TOKENS, NAMES, strict=True)
        )
    )
    run_dir = tmp_path / "run"
    args = task.with_args(
        f"model={model}",
        f"data.pairs={pairs}",
        "ground.compute_dtype=bfloat16",
        "sft.compute_dtype=bfloat16",
        "sft.lora_rank=0",
        "sft.aux_pairs_ratio=0.5",
        "ground.steps=4",
        "sft.steps=4",
        "sft.lr=0.001",
        "eval.max_examples=2",
        "export.dtype=bfloat16",
        f"run_dir={run_dir}",
    )
    exported = capture_export(monkeypatch)
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("load", "extend", "ground", "sft", "evaluate", "export"))
    assert stages["export"]["dtype"] == "bfloat16"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"ground", "sft"}
    assert all(math.isfinite(r["loss"]) for r in rows)
    results = json.loads((run_dir / "results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and results["valid_rate"] == 1.0

    base = load_dir_tensors(task.model)
    new = load_dir_tensors(run_dir / "export")
    assert set(new) == set(base)  # no adapter weights: full fine-tuning has none
    for name, want in base.items():
        # the old rows of vocabulary-sized tensors, widened back from the bfloat16 export
        got = new[name][: want.shape[0]].astype(np.float32)
        # full fine-tuning trains every weight, norms included (LoRA never touches a norm)
        assert not np.array_equal(got, want), f"{name} was not trained"
        # ... by at most a few AdamW steps of sft.lr from the checkpoint's values (plus the
        # bf16 rounding, <= 2^-8 of values below 2), so every tensor of every shard was read
        # (a missing or misplaced one would be far off)
        assert np.abs(got - want).max() < 5 * 4 * 1e-3, name
    assert all(new[n].dtype == ml_dtypes.bfloat16 for n in new)
    _assert_bf16_export_matches(exported["model"], run_dir / "export")


def test_gguf_model_through_extend_and_train(task, tmp_path, capsys):
    """A GGUF model (tiny, written here) is extended, grounded, fine-tuned with LoRA and
    exported like a Hugging Face one; the export carries the GGUF's weights in Hugging Face
    order (Q/K rows un-permuted from llama.cpp's order)."""
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    run_dir = tmp_path / "run"
    args = task.with_args(
        f"model={path}",
        "ground.steps=3",
        "sft.steps=3",
        "eval.max_examples=2",
        f"run_dir={run_dir}",
    )
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("load", "extend", "ground", "sft", "evaluate", "export"))
    info = json.loads((run_dir / "new_tokens.json").read_text())
    assert (
        info["tokens"] == TOKENS and info["num_tokens"] == len(hf["model.embed_tokens.weight"]) + 6
    )
    rows, _ = load_rows(run_dir / "grounded_rows.safetensors")
    assert rows.shape == (6, 16) and np.isfinite(rows).all()

    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "export"))
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in TOKENS)
    new = load_dir_tensors(run_dir / "export")
    for name, want in hf.items():
        if "norm" in name:  # LoRA fine-tuning never changes a norm
            np.testing.assert_array_equal(new[name], want, err_msg=name)
        elif "proj" in name:  # LoRA moved the kernels only a little from the GGUF's
            assert np.abs(new[name] - want).max() < 0.05, name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(new[q] - hf[q]).max() < 0.05 < np.abs(new[q] - llama_cpp_order(hf[q], 2)).max()
