"""`python -m gti_jax.train` end to end on a tiny random model and a generic task."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from gti_jax.train.__main__ import main
from gti_jax.train.config import load_config
from gti_jax.train.run import run
from tests.helpers.tiny_task import (
    TOKENS,
    capture_export,
    results_without_timing,
    sha256,
)

_sha = sha256
_results = results_without_timing


def _assert_export_logits_match(jax_model, export_dir):
    """The exported directory, loaded by transformers, computes the trainer's own logits
    (new tokens included) on a few sequences."""
    info = json.loads((export_dir.parent / "new_tokens.json").read_text())
    lo, hi = info["new_ids"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hi, size=(3, 12)).astype(np.int32)
    ids[:, ::3] = rng.integers(lo, hi, size=(3, 4))  # new tokens at every third position
    want = np.asarray(jax_model(ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.from_numpy(ids).long()).logits.numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def full_run(tiny_run):
    """The session's uninterrupted run of the tiny task (tests/e2e/conftest.py)."""
    return tiny_run


@pytest.mark.slow  # the session's whole tiny run
def test_full_run_writes_every_artifact(full_run, task):
    r = json.loads((full_run / "results.json").read_text())
    for key in (
        "eval_loss",
        "perplexity",
        "exact_match",
        "valid_rate",
        "recall@1",
        "ndcg@1",
        "recall@3",
        "ndcg@3",
    ):
        assert key in r and np.isfinite(r[key])
    assert r["valid_rate"] == 1.0  # constrained decoding only returns candidates
    stages = json.loads((full_run / "stages.json").read_text())
    assert all(
        stages[s]["done"] for s in ("load", "extend", "ground", "sft", "evaluate", "export")
    ), stages
    diag = json.loads((full_run / "diagnostics.json").read_text())
    assert set(diag) >= {"init", "ground", "sft"}
    assert diag["init"]["effective_rank"] < 1.05  # mean init: one point
    assert diag["ground"]["effective_rank"] > 1.5  # grounding moved the rows apart
    for png in ("loss.png", "spectra.png", "cosine_init.png"):
        assert (full_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"ground", "sft"}
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(x) for x in lines)
    assert (full_run / "config.yaml").is_file() and (
        full_run / "grounded_rows.safetensors"
    ).is_file()
    # the export loads in transformers, with the new tokens as single ids
    tok = transformers.AutoTokenizer.from_pretrained(str(full_run / "export"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(full_run / "export"), dtype=torch.float32
    )
    ids = [tok.encode(t, add_special_tokens=False) for t in TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert (
        model.get_input_embeddings().weight.shape[0]
        == json.loads((full_run / "new_tokens.json").read_text())["num_rows"]
    )


@pytest.mark.slow  # the session's whole tiny run
def test_retrieval_metrics_equal_an_independent_ranking(full_run, task):
    """Recall@K, NDCG@K and the valid rate in results.json equal those of a ranking made
    here from the exported model's own scores (transformers, float64 log-softmax).

    Every candidate is one new token followed by the end of the turn, and eval.beams equals
    the number of candidates, so constrained beam search must rank all six by
    log p(token | prompt) + log p(end | prompt, token) (no length penalty; rows past the
    tokenizer's size excluded).
    """
    from gti_jax.train.data import encode_prompt, end_of_turn_id

    export = full_run / "export"
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    num_tokens = json.loads((full_run / "new_tokens.json").read_text())["num_tokens"]
    end = end_of_turn_id(tok)
    cands = (task.root / "cands.txt").read_text().split()
    cand_ids = [tok.convert_tokens_to_ids(c) for c in cands]
    examples = [json.loads(x) for x in (task.root / "eval.jsonl").read_text().splitlines()]
    ranks = []
    for ex in examples:
        prompt = [int(i) for i in encode_prompt(tok, ex["prompt"])]
        seqs = torch.tensor([[*prompt, c] for c in cand_ids])
        with torch.no_grad():
            logits = hf(seqs).logits[:, -2:, :num_tokens].double()
        lp = torch.log_softmax(logits, dim=-1).numpy()
        scores = np.array([lp[i, 0, c] + lp[i, 1, end] for i, c in enumerate(cand_ids)])
        target = scores[cands.index(ex["completion"])]
        others = np.delete(scores, cands.index(ex["completion"]))
        # no near-tie around the target, so float32 kernels cannot swap its rank
        assert np.abs(others - target).min() > 1e-4, scores
        ranks.append(int((others > target).sum()))
    r = json.loads((full_run / "results.json").read_text())
    assert r["num_eval"] == len(examples)
    for k in (1, 3):
        recall = np.mean([rank < k for rank in ranks])
        ndcg = np.mean([1 / np.log2(rank + 2) if rank < k else 0.0 for rank in ranks])
        assert r[f"recall@{k}"] == pytest.approx(recall, abs=1e-12), (k, ranks)
        assert r[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12), (k, ranks)
    assert r["valid_rate"] == 1.0  # all six hypotheses of each prompt are candidates


@pytest.mark.slow  # trainer runs
def test_grounding_changes_only_new_rows(full_run, task, monkeypatch):
    """Old rows of the exported embedding and head equal the base model's old rows, and the
    export reloaded in transformers gives the grounded model's logits."""
    from gti_jax.io.safetensors import load_dir_tensors

    seen = capture_export(monkeypatch)

    # a grounding-only run: nothing else may change
    base = load_dir_tensors(task.model)
    info = json.loads((full_run / "new_tokens.json").read_text())
    start = info["new_ids"][0]
    out_dir = full_run.parent / "ground_only"
    cfg = load_config(None, task.args + [f"run_dir={out_dir}", "sft.steps=0"])
    run(cfg)
    new = load_dir_tensors(out_dir / "export")
    for name, arr in base.items():
        got = new[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_array_equal(got[:start], arr[:start])
            assert not np.array_equal(
                got[start : start + 6], np.broadcast_to(arr[:start].mean(0), (6, arr.shape[1]))
            )
        else:
            np.testing.assert_array_equal(got, arr)
    _assert_export_logits_match(seen["model"], out_dir / "export")


@pytest.mark.slow  # trainer runs
def test_resume_equals_uninterrupted(full_run, task, tmp_path):
    """Stopping four times, each time re-running the same command: during grounding at a
    checkpoint step (2) and between checkpoints (3, one step after resuming), during
    fine-tuning at a checkpoint step (global 8) and between checkpoints (9); the run still
    ends with bitwise the same export and the same results as an uninterrupted one.
    (One run directory for the cases [3], [9] and [2, 8] that used to run separately.)"""
    run_dir = tmp_path / "run"
    cfg = load_config(None, task.args + [f"run_dir={run_dir}"])
    from gti_jax.train.run import Preempted

    for stop in (2, 3, 8, 9):
        os.environ["GTI_JAX_STOP_AT_STEP"] = str(stop)
        try:
            with pytest.raises(Preempted):
                run(cfg)
        finally:
            del os.environ["GTI_JAX_STOP_AT_STEP"]
    run(cfg)
    assert _sha(run_dir / "export" / "model.safetensors") == _sha(
        full_run / "export" / "model.safetensors"
    )
    assert _results(run_dir) == _results(full_run)


def test_help_lists_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in (
        "ground.steps",
        "sft.lora_rank",
        "sft.aux_pairs_ratio",
        "eval.beams",
        "mesh.shape",
        "data.candidates",
        "rec.levels",
    ):
        assert key in out


@pytest.mark.slow  # the session's whole tiny run
def test_lora_run_exports_merged_model(task, full_run, tiny_run_model):
    """The tiny run fine-tunes with LoRA (the default, rank 8): its export holds the base
    model's tensor names only, with the adapters merged into the kernels, and computes the
    trainer's final logits."""
    run_dir = full_run
    from gti_jax.io.safetensors import load_dir_tensors

    names = set(load_dir_tensors(run_dir / "export"))
    assert not any("lora" in n for n in names)
    base = load_dir_tensors(task.model)
    assert names == set(base)
    new = load_dir_tensors(run_dir / "export")
    changed = [n for n in base if "q_proj.weight" in n and not np.array_equal(new[n], base[n])]
    assert changed  # LoRA updates were merged into the kernels
    _assert_export_logits_match(tiny_run_model, run_dir / "export")
