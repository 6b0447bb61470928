"""Validation during fine-tuning (eval.every), the best checkpoint (checkpoint.best,
eval.use_best), early stopping (sft.early_stop_patience), their exact resume, and progress
lines with an ETA.

One run of the tiny task (no grounding, LoRA fine-tuning at a learning rate so high that the
validation loss rises after step 2) is shared by the module: it validates every step, stops
after two validations without improvement, and evaluates and exports the state of its best
step. The resume test stops a second run after step 3 and resumes it: it must end as
the first did, bit for bit. The tests of these runs are slow (a trainer run, ~25 s on 2
cores); the fast lane keeps the progress and configuration checks.
"""

import contextlib
import io
import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gti_jax.errors import ConfigError
from gti_jax.progress import progress
from gti_jax.train.config import load_config
from gti_jax.train.loop import Preempted
from gti_jax.train.run import run
from tests.helpers.tiny_task import REPO, capture_export, results_without_timing

PATIENCE = 2


def _valid_file(run_dir):
    path = run_dir.parent / "valid.jsonl"  # beside the run: the task's files stay as they are
    if not path.exists():  # the same kind of rows as eval.jsonl: which token follows which
        rows = [
            {"prompt": f"after <i_{i}> comes", "completion": f"<i_{(i + 1) % 6}>"}
            for i in (5, 0, 2, 3)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(task, run_dir):
    return [
        *task.stage_args(sft=10),
        f"data.valid={_valid_file(run_dir)}",
        f"data.candidates={task.candidates}",
        "sft.lr=0.5",  # diverges after step 2: the last step is worse than an earlier one
        "eval.every=1",
        "checkpoint.best=true",
        "eval.use_best=true",
        f"sft.early_stop_patience={PATIENCE}",
        "log_every=1",
        f"run_dir={run_dir}",
    ]


def _run(task, run_dir):
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        exported = capture_export(mp)
        results = run(load_config(None, _args(task, run_dir)))
    return results, exported["model"], err.getvalue()


@pytest.fixture(scope="module")
def validated(task, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("valid") / "run"
    results, model, stderr = _run(task, run_dir)
    return run_dir, results, model, stderr


def _rows(run_dir, stage):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage]


def _embedding(state) -> np.ndarray:
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    keys = [(jax.tree_util.keystr(k), v) for k, v in flat]
    (leaf,) = [v for k, v in keys if k.startswith("['trainable']") and "'embed'" in k]
    return np.asarray(leaf)


def _saved_embedding(path) -> np.ndarray:
    with ocp.StandardCheckpointer() as c:
        return _embedding(c.restore(path / "state"))


@pytest.mark.slow  # the module's trainer run
def test_validation_rows_and_early_stop(validated):
    run_dir, results, _, _ = validated
    valid = _rows(run_dir, "valid")
    last = valid[-1]["step"]
    assert [r["step"] for r in valid] == list(range(1, last + 1))  # eval.every=1
    assert all(r["num_valid"] == 4 and {"loss", "recall@1", "ndcg@3"} <= set(r) for r in valid)
    losses = [r["loss"] for r in valid]
    best = int(np.argmin(losses)) + 1
    # stopped after PATIENCE validations without a lower loss, before sft.steps
    assert last == best + PATIENCE < 10
    assert all(x >= losses[best - 1] for x in losses[best:])
    assert [r["step"] for r in _rows(run_dir, "sft")] == list(range(1, last + 1))
    assert results["best"] == {
        "metric": "loss",
        "step": best,
        "value": losses[best - 1],
        "used": True,
        "stopped_early": True,
    }
    assert all(r["best_step"] == min(r["step"], best) for r in valid)


@pytest.mark.slow  # the module's trainer run
def test_best_checkpoint_is_kept_and_exported(validated):
    run_dir, results, model, _ = validated
    best, last = results["best"]["step"], _rows(run_dir, "valid")[-1]["step"]
    ckpts = run_dir / "checkpoints"
    # the best directory holds the best step alone; checkpoint.keep never touched it
    assert sorted(p.name for p in (ckpts / "best").iterdir() if p.name.isdigit()) == [str(best)]
    kept = _saved_embedding(ckpts / "best" / str(best))
    exported = np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(exported, kept)  # bitwise: the best state, not the last
    assert not np.array_equal(exported, _saved_embedding(ckpts / str(last)))


@pytest.mark.slow  # the module's trainer run
def test_progress_lines(validated):
    *_, stderr = validated
    assert re.search(r"\[gti_jax\] beam search: \d+/\d+ batches, elapsed \d+s, ETA 0s", stderr)
    assert re.search(r"\[gti_jax\] eval loss: \d+/\d+ batches", stderr)
    assert "early stop at step" in stderr and "eval.use_best: the model of step" in stderr


def test_progress_off_a_terminal_prints_periodic_lines():
    out = io.StringIO()
    assert list(progress(range(5), total=5, desc="x", every_s=0.0, file=out)) == list(range(5))
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("[gti_jax] x: 5/5 batches")
    quiet = io.StringIO()
    list(progress(range(5), total=5, desc="x", every_s=3600, file=quiet))
    assert len(quiet.getvalue().splitlines()) == 1  # only the last line within the period


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["checkpoint.best=true"], "checkpoint.best needs validation: set eval.every"),
        (["eval.every=2", "checkpoint.best_metric=recall@7"], "must be valid_loss, recall@K"),
        (["eval.every=2", "eval.use_best=true"], "eval.use_best needs checkpoint.best=true"),
        (["eval.every=2", "data.tokens=t.jsonl", "data.sft=s.jsonl"], "needs data.valid"),
        (["eval.every=2", "sft.steps=0"], "validates during fine-tuning"),
    ],
)
def test_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, keys)


@pytest.mark.slow
def test_resume_restores_best_and_patience(task, validated, tmp_path, monkeypatch):
    run_dir, results, model, _ = validated
    again = tmp_path / "run"
    best = results["best"]["step"]
    monkeypatch.setenv("GTI_JAX_STOP_AT_STEP", str(best + 1))  # after one worse validation
    with pytest.raises(Preempted):
        _run(task, again)
    monkeypatch.delenv("GTI_JAX_STOP_AT_STEP")
    _, resumed_model, _ = _run(task, again)
    assert results_without_timing(again) == results_without_timing(run_dir)
    timing = ("eval_seconds", "tokens_per_s")

    def rows(d):
        return [{k: v for k, v in r.items() if k not in timing} for r in _rows(d, "valid")]

    assert rows(again) == rows(run_dir)
    np.testing.assert_array_equal(
        np.asarray(resumed_model.embed.embedding[...]), np.asarray(model.embed.embedding[...])
    )


def test_pipeline_gives_the_prepared_valid_split(tmp_path):
    """A whole run's data producer hands the trainer the front end's valid.jsonl."""
    from gti_jax.pipeline import load_config as load_run_config
    from gti_jax.pipeline import prepared_data
    from gti_jax.rec import data as rd

    fixtures = REPO / "tests" / "fixtures" / "rec"
    ds = rd.filter_dataset(
        rd.load_csv(fixtures / "interactions.csv", fixtures / "items.jsonl"),
        min_user_interactions=1,
        min_item_interactions=1,
    )
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(ds.num_items, 4)).astype(np.float32))
    cfg = load_run_config(
        None,
        [
            "rec.dataset=csv",
            f"rec.paths.interactions={fixtures / 'interactions.csv'}",
            f"rec.paths.items={fixtures / 'items.jsonl'}",
            "rec.min_interactions=1",
            "rec.levels=2",
            "rec.codebook_size=2",
            f"rec.embeddings={emb}",
            "eval.every=5",
        ],
    )
    files = prepared_data(cfg)(tmp_path / "data", None, None)
    assert files.valid == tmp_path / "data" / "valid.jsonl" and files.valid.stat().st_size > 0
