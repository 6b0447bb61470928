"""Applying grounded rows to another copy of a model: ``python -m gti_jax.extend --rows`` and
the trainer's ``init_rows``. The rows land bitwise on their tokens' ids, every other row is
unchanged, and a file whose tokens would land on other ids is refused in one line."""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from gti_jax import extend
from gti_jax.train.checkpoint import HEAD_ROWS_FILE, ROWS_FILE, save_rows
from gti_jax.train.config import load_config
from gti_jax.train.run import TrainError, run
from tests.helpers.hf_models import make_tiny_hf_model
from tests.helpers.tiny_task import TOKENS, capture_export
from tests.helpers.tokenizers import tiny_tokenizer

NEW = [f"<r_{i}>" for i in range(4)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_hf_model(root, f) for f in ("llama", "qwen3")}  # tied, untied


def _tokens(path, tokens=NEW):
    path.write_text("".join(json.dumps({"token": t}) + "\n" for t in tokens))
    return path


def _rows_files(d, tokens, first_id, dim, *, head=False, seed=0):
    """Rows files as the trainer writes them (meta: tokens and the ids they had)."""
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = {"model": "m", "new_ids": [first_id, first_id + len(tokens)], "tokens": tokens}
    rows = rng.normal(size=(len(tokens), dim)).astype(np.float32)
    save_rows(d / ROWS_FILE, rows, {**meta, "part": "embed"})
    head_rows = None
    if head:
        head_rows = rng.normal(size=(len(tokens), dim)).astype(np.float32)
        save_rows(d / HEAD_ROWS_FILE, head_rows, {**meta, "part": "head"})
    return d / ROWS_FILE, rows, head_rows


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_extend_rows_bitwise(models, tmp_path, family):
    src = models[family]
    base = load_file(str(src / "model.safetensors"))
    emb = base["model.embed_tokens.weight"]
    n = len(tiny_tokenizer())
    path, rows, head_rows = _rows_files(
        tmp_path / "rows", NEW, n, emb.shape[1], head=family == "qwen3"
    )
    out = tmp_path / "out"
    code = extend.main(
        [
            "--model",
            str(src),
            "--tokens",
            str(_tokens(tmp_path / "t.jsonl")),
            "--out",
            str(out),
            "--rows",
            str(path),
        ]
    )
    assert code == 0
    got = load_file(str(out / "model.safetensors"))
    table = got["model.embed_tokens.weight"]
    np.testing.assert_array_equal(table[n : n + len(NEW)], rows)  # the file's rows, bitwise
    np.testing.assert_array_equal(table[:n], emb[:n])  # old rows unchanged
    if head_rows is not None:
        head = got["lm_head.weight"]
        np.testing.assert_array_equal(head[n : n + len(NEW)], head_rows)
        np.testing.assert_array_equal(head[:n], base["lm_head.weight"][:n])
    summary = json.loads((out / "gti_extend.json").read_text())
    assert summary["rows"]["model.embed_tokens.weight"] == str(path)


def test_extend_rows_mismatch_is_one_line(models, tmp_path, capsys):
    src = models["llama"]
    n = len(tiny_tokenizer())
    dim = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"].shape[1]
    tokens = _tokens(tmp_path / "t.jsonl")
    cases = [
        (_rows_files(tmp_path / "a", NEW, n + 1, dim)[0], "token '<r_0>' has id"),
        (_rows_files(tmp_path / "b", ["<zz>"], n, dim)[0], "token '<zz>' is not in the tokenizer"),
        (_rows_files(tmp_path / "c", NEW, n, dim + 1)[0], f"expected \\[4, {dim}\\]"),
    ]
    for path, message in cases:
        out = tmp_path / "out"
        argv = [
            "--model",
            str(src),
            "--tokens",
            str(tokens),
            "--out",
            str(out),
            "--rows",
            str(path),
        ]
        assert extend.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --rows: ") and "\n" not in err
        assert re.search(message, err), err
        assert not out.exists()


def test_trainer_init_rows(task, tmp_path):
    """``init_rows`` with no training: the exported model has the file's rows bitwise."""
    base = load_file(str(task.model / "model.safetensors"))
    emb = base["model.embed_tokens.weight"]
    n = len(tiny_tokenizer())
    path, rows, head_rows = _rows_files(tmp_path / "rows", TOKENS, n, emb.shape[1], head=True)
    args = [*task.stage_args(), f"init_rows={path}", f"run_dir={tmp_path / 'run'}"]
    with pytest.MonkeyPatch.context() as mp:
        exported = capture_export(mp)
        run(load_config(None, args))
    model = exported["model"]
    table = np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(table[n : n + len(TOKENS)], rows)
    np.testing.assert_array_equal(table[:n], emb[:n])
    kernel = np.asarray(model.lm_head.kernel[...])  # [D, V]
    np.testing.assert_array_equal(kernel[:, n : n + len(TOKENS)], head_rows.T)
    np.testing.assert_array_equal(kernel[:, :n], base["lm_head.weight"][:n].T)
    bad, _, _ = _rows_files(tmp_path / "bad", TOKENS[::-1], n, emb.shape[1])
    with pytest.raises(TrainError, match=r"init_rows=.*token '<i_5>' has id \d+ here but id"):
        run(
            load_config(
                None, [*task.stage_args(), f"init_rows={bad}", f"run_dir={tmp_path / 'r2'}"]
            )
        )
    assert not (tmp_path / "r2").exists()  # bad input: found before the run directory
