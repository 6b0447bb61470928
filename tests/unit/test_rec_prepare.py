"""gti_jax.rec.prepare and gti_jax.rec.embed on the CSV fixture with a tiny random model."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from gti_jax.pipeline import load_config
from gti_jax.rec import data as rd
from gti_jax.rec.config import RecConfig
from gti_jax.rec.embed import item_embeddings
from gti_jax.rec.prepare import OUTPUT_FILES, PrepareError, prepare
from gti_jax.rec.prompts import code_token
from gti_jax.rec.semantic_ids import load_semantic_ids
from tests.helpers.hf_models import tiny_llama
from tests.helpers.tokenizers import tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rec"
CSV_KEYS = [
    "rec.dataset=csv",
    f"rec.paths.interactions={FIXTURES / 'interactions.csv'}",
    f"rec.paths.items={FIXTURES / 'items.jsonl'}",
    "rec.min_interactions=1",
    "rec.levels=2",
    "rec.codebook_size=2",
    "rec.embed_batch_size=4",
    "rec.embed_max_len=16",
]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok), layers=2), tok


def _fixture_dataset():
    ds = rd.load_csv(FIXTURES / "interactions.csv", FIXTURES / "items.jsonl")
    return rd.filter_dataset(ds, min_user_interactions=1, min_item_interactions=1)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _read_all(root):
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    model, tok = tiny
    out = tmp_path_factory.mktemp("prep") / "out"
    cfg = load_config(None, CSV_KEYS)
    return cfg, prepare(cfg, out, model=model, tokenizer=tok, verbose=False)


def test_prepare_writes_every_file(prepared):
    _, paths = prepared
    assert set(paths) == set(OUTPUT_FILES)
    for key, path in paths.items():
        assert path.exists(), key
        if key not in ("semantic_ids", "sft"):  # the fixture's users are too short for sft
            assert path.stat().st_size > 0, key
    out = paths["stats"].parent
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_ids_unique_tokens_and_candidates(prepared):
    _, paths = prepared
    ds = _fixture_dataset()
    items = _jsonl(paths["items"])
    assert [r["item_id"] for r in items] == [it.item_id for it in ds.items]
    sids = [r["semantic_id"] for r in items]
    assert len(set(sids)) == len(sids) == ds.num_items
    cands = Path(paths["candidates"]).read_text().splitlines()
    assert set(cands) == set(sids) and len(cands) == len(sids)

    saved = load_semantic_ids(paths["semantic_ids"])
    assert saved.codes.shape[0] == ds.num_items
    assert len(saved.codebooks) == 2
    tokens = _jsonl(paths["tokens"])
    names = [t["token"] for t in tokens]
    assert len(names) == len(set(names)) == sum(saved.codebook_sizes)
    used = {code_token(lvl, int(c)) for row in saved.codes for lvl, c in enumerate(row)}
    assert used <= set(names)
    assert all(t["description"].strip() for t in tokens)
    stats = json.loads(paths["stats"].read_text())
    assert stats["new_tokens"] == len(tokens)
    assert stats["semantic_ids"]["unique_ids"] == ds.num_items
    assert stats["semantic_ids"]["levels"] == saved.codes.shape[1]


def test_completions_are_candidates(prepared):
    _, paths = prepared
    cands = set(Path(paths["candidates"]).read_text().splitlines())
    stats = json.loads(paths["stats"].read_text())
    for key in ("sft", "valid", "test"):
        rows = _jsonl(paths[key])
        assert len(rows) == stats["examples"][key]
        assert all(r["completion"] in cands for r in rows), key
    # fixture: only alice and bob have 3 interactions (valid + test, no train example)
    assert stats["examples"]["test"] == 2 and stats["examples"]["sft"] == 0
    assert stats["dataset"]["filtered"]["users"] == 6
    pop = stats["popularity_baseline"]
    assert set(pop["test"]) >= {"recall@5", "ndcg@5", "recall@20", "ndcg@20"}
    assert 0.0 <= pop["test"]["recall@5"] <= 1.0


def test_deterministic_and_reused(prepared, tiny, tmp_path, capsys):
    cfg, paths = prepared
    model, tok = tiny
    first = _read_all(paths["stats"].parent)
    again = prepare(cfg, tmp_path / "again", model=model, tokenizer=tok, verbose=False)
    assert _read_all(again["stats"].parent) == first

    before = {p: p.stat().st_mtime_ns for p in again.values()}
    reused = prepare(cfg, tmp_path / "again", model=model, tokenizer=tok)
    assert reused == again
    assert {p: p.stat().st_mtime_ns for p in reused.values()} == before
    assert "reusing" in capsys.readouterr().err


def test_mismatch_is_refused(prepared, tiny):
    cfg, paths = prepared
    model, tok = tiny
    other = load_config(None, [*CSV_KEYS, "seed=1"])
    with pytest.raises(PrepareError, match=r"other settings \(differing: rec\.seed\)"):
        prepare(other, paths["stats"].parent, model=model, tokenizer=tok, verbose=False)


def test_non_empty_foreign_directory_is_refused(tmp_path, tiny):
    (tmp_path / "x.txt").write_text("mine")
    cfg = load_config(None, CSV_KEYS)
    with pytest.raises(PrepareError, match="not empty"):
        prepare(cfg, tmp_path, model=tiny[0], tokenizer=tiny[1], verbose=False)
    assert (tmp_path / "x.txt").read_text() == "mine"


def test_npy_embeddings_and_shape_validation(tmp_path):
    n = _fixture_dataset().num_items
    good = tmp_path / "emb.npy"
    np.save(good, np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32))
    rec = RecConfig(
        dataset="csv",
        paths={
            "interactions": str(FIXTURES / "interactions.csv"),
            "items": str(FIXTURES / "items.jsonl"),
        },
        min_interactions=1,
        levels=2,
        codebook_size=3,
        embeddings=str(good),
    )
    paths = prepare(rec, tmp_path / "ok", seed=3, verbose=False)
    stats = json.loads(paths["stats"].read_text())
    assert stats["embeddings"]["dim"] == 6 and stats["config"]["rec"]["seed"] == 3

    wrong_rows = tmp_path / "rows.npy"
    np.save(wrong_rows, np.zeros((n + 1, 6), np.float32))
    with pytest.raises(PrepareError, match=rf"{n + 1} rows but there are {n} items"):
        prepare(dataclasses.replace(rec, embeddings=str(wrong_rows)), tmp_path / "a")
    one_d = tmp_path / "flat.npy"
    np.save(one_d, np.zeros((n,), np.float32))
    with pytest.raises(PrepareError, match=r"shape \(\d+,\); expected float \[num_items, D\]"):
        prepare(dataclasses.replace(rec, embeddings=str(one_d)), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no such .npy file"):
        prepare(dataclasses.replace(rec, embeddings=str(tmp_path / "no.npy")), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "flat.npy", "ok", "rows.npy"]


def test_bad_inputs_fail_before_work(tmp_path):
    with pytest.raises(rd.RecFileNotFoundError, match="rec.paths.items=.*no such file"):
        prepare(
            load_config(None, [*CSV_KEYS, f"rec.paths.items={tmp_path / 'none.jsonl'}"]),
            tmp_path / "o",
            verbose=False,
        )
    rec = RecConfig(
        dataset="csv",
        paths={
            "interactions": str(FIXTURES / "interactions.csv"),
            "items": str(FIXTURES / "items.jsonl"),
        },
    )
    with pytest.raises(PrepareError, match="needs a model"):
        prepare(rec, tmp_path / "o")
    big = load_config(
        None, [*CSV_KEYS, "rec.embeddings=" + str(tmp_path / "e.npy"), "rec.codebook_size=50"]
    )
    np.save(tmp_path / "e.npy", np.zeros((8, 4), np.float32))
    with pytest.raises(PrepareError, match="rec.codebook_size=50 exceeds the 8 items"):
        prepare(big, tmp_path / "o", verbose=False)
    assert not (tmp_path / "o").exists()


def test_item_embeddings_mask_padding(tiny):
    model, tok = tiny
    short = "the quick fox"
    long = "a language model reads text one token at a time and predicts the next token " * 2
    alone = item_embeddings(model, tok, [short], batch_size=4, max_len=64, verbose=False)
    mixed = item_embeddings(
        model, tok, [long, short, "hello world"], batch_size=4, max_len=64, verbose=False
    )
    assert alone.shape == (1, 16) and mixed.shape == (3, 16) and alone.dtype == np.float32
    np.testing.assert_allclose(mixed[1], alone[0], atol=1e-5)
    assert np.abs(mixed[0] - mixed[1]).max() > 1e-3  # different texts, different vectors
    again = item_embeddings(
        model, tok, [long, short, "hello world"], batch_size=4, max_len=64, verbose=False
    )
    np.testing.assert_array_equal(again, mixed)


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_item_embeddings_are_mean_of_hidden_states(tiny):
    model, tok = tiny
    text = "hello world"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    h, _ = model.hidden_states(model.embed(np.asarray([ids], np.int32)))
    want = np.asarray(h[0]).mean(axis=0)
    got = item_embeddings(model, tok, [text, "the lazy dog jumps"], batch_size=2, verbose=False)
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    with pytest.raises(ValueError, match="no texts"):
        item_embeddings(model, tok, [], verbose=False)
