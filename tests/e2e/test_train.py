"""`python -m gti_jax.train` end to end on a tiny random model and a generic task."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

from gti_jax.train.__main__ import main
from gti_jax.train.config import load_config
from gti_jax.train.run import run
from tests.helpers.tiny_task import (
    REPO,
    TOKENS,
    make_tiny_task,
    results_without_timing,
    sha256,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    t = make_tiny_task(tmp_path_factory.mktemp("task"))
    return {"root": t.root, "model": t.model, "args": t.args}


_sha = sha256
_results = results_without_timing


@pytest.fixture(scope="module")
def full_run(task, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    cfg = load_config(None, task["args"] + [f"run_dir={run_dir}"])
    run(cfg)
    return run_dir


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
    assert [
        s for s in ("load", "extend", "ground", "sft", "evaluate", "export") if stages[s]["done"]
    ]
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


def test_grounding_changes_only_new_rows(full_run, task):
    """Old rows of the exported embedding and head equal the base model's old rows."""
    from gti_jax.io.safetensors import load_dir_tensors

    # a grounding-only run: nothing else may change
    base = load_dir_tensors(task["model"])
    info = json.loads((full_run / "new_tokens.json").read_text())
    start = info["new_ids"][0]
    out_dir = full_run.parent / "ground_only"
    cfg = load_config(None, task["args"] + [f"run_dir={out_dir}", "sft.steps=0"])
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


@pytest.mark.parametrize("stops", [[3], [9], [2, 8]])
def test_resume_equals_uninterrupted(full_run, task, tmp_path, stops):
    """Stopping during grounding (step 3) or fine-tuning (global step 9) and re-running the
    same command ends with bitwise the same export and the same results."""
    run_dir = tmp_path / "run"
    cfg = load_config(None, task["args"] + [f"run_dir={run_dir}"])
    from gti_jax.train.run import Preempted

    for stop in stops:
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


def test_sigterm_saves_checkpoint_and_resumes(task, full_run, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "gti_jax.train",
        *task["args"],
        f"run_dir={run_dir}",
        "ground.steps=400",
        "checkpoint.every=1000",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 75, err[-2000:]
    assert "re-run the same command to resume" in err
    steps = [int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit()]
    assert steps and max(steps) < 400


def test_bad_config_one_line(capsys, tmp_path):
    assert main(["sft.stpes=3", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'sft.steps'" in err[0]
    assert not (tmp_path / "r").exists()


def test_missing_data_file_one_line(task, capsys, tmp_path):
    args = [a for a in task["args"] if not a.startswith("data.sft=")] + [
        f"data.sft={tmp_path / 'nope.jsonl'}",
        f"run_dir={tmp_path / 'r'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0]
    assert not (tmp_path / "r").exists()


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


def test_lora_run_exports_merged_model(task, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(
        None,
        task["args"]
        + [f"run_dir={run_dir}", "sft.lora_rank=4", "ground.steps=2", "sft.steps=3", "sft.lr=0.01"],
    )
    run(cfg)
    from gti_jax.io.safetensors import load_dir_tensors

    names = set(load_dir_tensors(run_dir / "export"))
    assert not any("lora" in n for n in names)
    base = load_dir_tensors(task["model"])
    assert names == set(base)
    new = load_dir_tensors(run_dir / "export")
    changed = [n for n in base if "q_proj.weight" in n and not np.array_equal(new[n], base[n])]
    assert changed  # LoRA updates were merged into the kernels
