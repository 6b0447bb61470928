"""`python -m gti_jax.rec.prepare` end to end on the real MovieLens-100k (shipped by recbole)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gti_jax.rec import data as rd

pytestmark = pytest.mark.slow  # subprocesses on the real MovieLens-100k

REPO = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "gti_jax.rec.prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_on_movielens_100k(tmp_path):
    ds = rd.filter_dataset(rd.load_movielens_100k(), min_user_interactions=5)
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(ds.num_items, 24)).astype(np.float32))
    out = tmp_path / "ml"
    args = [
        f"rec.embeddings={emb}",
        "rec.semantic_ids=rq_kmeans",
        "rec.levels=2",
        "rec.codebook_size=16",
        "rec.max_train_examples=500",
        "rec.max_eval_users=100",
        "--out",
        str(out),
    ]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    assert "943 users" in proc.stdout
    assert "popularity baseline on test (100 users): Recall@5" in proc.stdout

    stats = json.loads((out / "prepare_stats.json").read_text())
    assert stats["dataset"]["raw"]["users"] == 943
    assert stats["dataset"]["raw"]["interactions"] == 100_000
    assert stats["dataset"]["filtered"]["users"] == 943
    assert stats["dataset"]["filtered"]["items"] == ds.num_items
    assert stats["split"]["test_examples"] == 943
    assert stats["examples"]["sft"] == 500
    assert stats["examples"]["valid"] == stats["examples"]["test"] == 100
    sem = stats["semantic_ids"]
    assert sem["unique_ids"] == ds.num_items and 0 <= sem["collision_rate"] <= 1
    assert len(sem["codebook_usage"]) == sem["levels"] >= 2
    pop = stats["popularity_baseline"]
    for k in (5, 10, 20, 50):
        assert 0 < pop["test"][f"recall@{k}"] <= 1 and 0 < pop["test"][f"ndcg@{k}"] <= 1
    assert pop["test"]["recall@5"] <= pop["test"]["recall@50"]

    for name in ("tokens.jsonl", "pairs.jsonl", "sft.jsonl", "valid.jsonl", "test.jsonl"):
        assert (out / name).stat().st_size > 0
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    cands = (out / "candidates.txt").read_text().splitlines()
    assert len(items) == len(cands) == len(set(cands)) == ds.num_items
    for name in ("sft.jsonl", "valid.jsonl", "test.jsonl"):
        completions = {json.loads(line)["completion"] for line in open(out / name)}
        assert completions <= set(cands), name
    tokens = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert len(tokens) == stats["new_tokens"] == sum(sem["codebook_sizes"])

    again = _run(*args)  # same settings: reused, same summary
    assert again.returncode == 0 and "reusing" in again.stderr
    assert again.stdout == proc.stdout


def test_cli_bad_input_is_one_line(tmp_path):
    emb = tmp_path / "bad.npy"
    np.save(emb, np.zeros((10, 4), np.float32))
    proc = _run(f"rec.embeddings={emb}", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "10 rows but there are" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()

    proc = _run("rec.levles=2", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'rec.levles'; did you mean 'rec.levels'?"
    ]
    proc = _run("rec.embeddings=backbone")
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr


def test_cli_with_rq_vae_semantic_ids(tmp_path):
    """rec.semantic_ids=rq_vae inside prepare (the other tests use rq_kmeans): every item
    still gets a distinct id, and the stats say which method made them."""
    ds = rd.filter_dataset(rd.load_movielens_100k(), min_user_interactions=5)
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(1).normal(size=(ds.num_items, 16)).astype(np.float32))
    out = tmp_path / "ml"
    proc = _run(
        f"rec.embeddings={emb}",
        "rec.semantic_ids=rq_vae",
        "rec.rqvae_steps=30",
        "rec.levels=2",
        "rec.codebook_size=16",
        "rec.max_train_examples=50",
        "rec.max_eval_users=20",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sem = json.loads((out / "prepare_stats.json").read_text())["semantic_ids"]
    assert sem["method"] == "rq_vae"
    assert sem["unique_ids"] == ds.num_items and len(sem["codebook_usage"]) >= 2
    assert any((out / "semantic_ids").iterdir())  # the semantic-id directory was written
