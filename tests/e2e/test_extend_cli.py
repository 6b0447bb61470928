"""`python -m gti_jax.extend` end to end on tiny random transformers checkpoints.

Its bad-input cases (one error line, nothing written) are in test_bad_input.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from gti_jax import extend
from tests.helpers.hf_models import make_tiny_hf_model
from tests.helpers.tiny_task import train_env

NEW_TOKENS = [f"<{c}_{i}>" for c in "ab" for i in range(6)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_hf_model(root, f) for f in ("llama", "qwen2", "qwen3")}


def _tokens_file(path, tokens=NEW_TOKENS, descriptions=True):
    with open(path, "w") as f:
        for i, t in enumerate(tokens):
            row = {"token": t}
            if descriptions:
                row["description"] = f"item number {i} about movies and books"
            f.write(json.dumps(row) + "\n")
    return path


def _logits(model_dir, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy(), model


def _check_extended(src, out, init, pad):
    tok_old = transformers.AutoTokenizer.from_pretrained(str(src))
    tok_new = transformers.AutoTokenizer.from_pretrained(str(out))
    n_old = len(tok_old)
    assert len(tok_new) == n_old + len(NEW_TOKENS)
    for i, t in enumerate(NEW_TOKENS):
        assert tok_new.encode(t, add_special_tokens=False) == [n_old + i]
        assert tok_new.decode([n_old + i]) == t
    ids = [tok_old.encode("the cat sat on the mat and then it ran", add_special_tokens=False)[:12]]
    before, m_old = _logits(src, ids)
    after, m_new = _logits(out, ids)
    # the old vocabulary's logits are unchanged: old rows and the backbone are preserved
    assert np.abs(after[..., :n_old] - before[..., :n_old]).max() <= 1e-5
    cfg = json.loads((out / "config.json").read_text())
    rows = m_new.get_input_embeddings().weight.detach().numpy()
    assert cfg["vocab_size"] == rows.shape[0]
    old_rows = m_old.get_input_embeddings().weight.detach().numpy()
    assert rows.shape[0] >= old_rows.shape[0]
    if rows.shape[0] > old_rows.shape[0]:
        assert rows.shape[0] % pad == 0
    np.testing.assert_array_equal(rows[:n_old], old_rows[:n_old])
    new = rows[n_old : n_old + len(NEW_TOKENS)]
    heads = [(new, old_rows)]
    if not m_new.config.tie_word_embeddings:
        h_new = m_new.get_output_embeddings().weight.detach().numpy()
        h_old = m_old.get_output_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(h_new[:n_old], h_old[:n_old])
        heads.append((h_new[n_old : n_old + len(NEW_TOKENS)], h_old))
    else:
        assert (
            m_new.get_output_embeddings().weight.data_ptr()
            == m_new.get_input_embeddings().weight.data_ptr()
        )
    for got, old in heads:
        if init == "mean":
            want = old[:n_old].astype(np.float64).mean(0)
            np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-6)
        elif init == "description":
            for i in range(len(NEW_TOKENS)):
                d = tok_old.encode(
                    f"item number {i} about movies and books", add_special_tokens=False
                )
                np.testing.assert_allclose(
                    got[i], old[d].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6
                )
    return m_new


@pytest.mark.parametrize(
    "family, init, pad", [("llama", "mean", 64), ("qwen3", "description", 8), ("qwen2", "mean", 1)]
)
def test_extend_in_process(models, tmp_path, family, init, pad):
    out = tmp_path / "out"
    rc = extend.main(
        [
            "--model",
            str(models[family]),
            "--tokens",
            str(_tokens_file(tmp_path / "t.jsonl")),
            "--out",
            str(out),
            "--init",
            init,
            "--pad-to-multiple-of",
            str(pad),
        ]
    )
    assert rc == 0
    _check_extended(models[family], out, init, pad)


def test_qwen2_spare_rows_are_used_without_growth(models, tmp_path):
    out = tmp_path / "out"
    assert (
        extend.main(
            [
                "--model",
                str(models["qwen2"]),
                "--tokens",
                str(_tokens_file(tmp_path / "t.jsonl", NEW_TOKENS[:6])),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    old = json.loads((models["qwen2"] / "config.json").read_text())["vocab_size"]
    assert (
        json.loads((out / "config.json").read_text())["vocab_size"] == old
    )  # the tokens fit in the padding


@pytest.mark.slow  # a subprocess
def test_extend_cli_subprocess_mean_cov(models, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gti_jax.extend",
            "--model",
            str(models["qwen3"]),
            "--tokens",
            str(_tokens_file(tmp_path / "t.jsonl")),
            "--out",
            str(out),
            "--init",
            "mean_cov",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    m_new = _check_extended(models["qwen3"], out, "mean_cov", 1)
    rows = m_new.get_input_embeddings().weight.detach().numpy()
    n_old = len(transformers.AutoTokenizer.from_pretrained(str(models["qwen3"])))
    new = rows[n_old : n_old + len(NEW_TOKENS)]
    assert np.linalg.matrix_rank(new - new.mean(0)) == len(NEW_TOKENS) - 1  # spread, not collapsed
    summary = json.loads((out / "gti_extend.json").read_text())
    assert summary["new_ids"] == [n_old, n_old + len(NEW_TOKENS)]
    # num_tokens/num_rows describe the written checkpoint (as in new_tokens.json)
    assert summary["base_num_tokens"] == n_old
    assert summary["num_tokens"] == n_old + len(NEW_TOKENS)
    assert summary["num_rows"] == rows.shape[0]


@pytest.mark.slow  # a subprocess
def test_tokenizer_extended_without_transformers_equals_the_transformers_path(
    models, tmp_path, monkeypatch
):
    """A tokenizer directory that transformers loads as its tokenizer.json unchanged is
    extended with the `tokenizers` library alone (gti_jax.vocab.tokenizer_dir; transformers
    is not even imported): the checkpoint written is the one the transformers path writes."""
    tokens = _tokens_file(tmp_path / "t.jsonl")

    def args(out):
        return ["--model", str(models["llama"]), "--tokens", str(tokens), "--out", str(out)] + [
            "--init",
            "description",
        ]

    code = (
        "import sys; from gti_jax.extend import main; rc = main(sys.argv[1:]); "
        "sys.exit(rc or 10 * ('transformers' in sys.modules))"
    )
    light, ref = tmp_path / "light", tmp_path / "ref"
    r = subprocess.run(
        [sys.executable, "-c", code, *args(light)],
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr  # 10: transformers was imported
    monkeypatch.setattr(extend, "open_tokenizer_dir", lambda path: (None, "forced"))
    assert extend.main(args(ref)) == 0
    for name in ("model.safetensors", "config.json"):
        assert (light / name).read_bytes() == (ref / name).read_bytes(), name
    timing = ("resize_seconds", "total_seconds")
    summaries = [json.loads((d / "gti_extend.json").read_text()) for d in (light, ref)]
    assert [{k: v for k, v in s.items() if k not in timing} for s in summaries] == [
        {k: v for k, v in summaries[1].items() if k not in timing}
    ] * 2
    a, b = (transformers.AutoTokenizer.from_pretrained(str(d)) for d in (light, ref))
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    text = f"the cat {NEW_TOKENS[0]}{NEW_TOKENS[-1]} sat <|im_end|>"
    assert a.encode(text) == b.encode(text)
    _check_extended(models["llama"], light, "description", 1)
