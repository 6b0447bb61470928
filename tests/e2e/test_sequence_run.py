"""A whole run on sequence rows: training, the learning curve, results beside popularity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gti_jax.train.config import load_config
from gti_jax.train.run import run
from gti_jax.train.tracking import TENSORBOARD_DIR, flat_scalars, tensorboard_tag
from tests.helpers.tiny_task import TOKENS
from tests.helpers.tracking_files import read_tensorboard_scalars

pytestmark = pytest.mark.slow  # a trainer run


def _segments(ids, first_target):
    return {
        "segments": [{"text": "seen:", "loss": False}]
        + [{"text": t, "loss": j >= first_target} for j, t in enumerate(ids)]
    }


@pytest.fixture(scope="module")
def seq_run(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    # users walk the tokens in order, from different starts; the next token is the target
    sft = root / "seq_sft.jsonl"
    with open(sft, "w") as f:
        for start in range(6):
            ids = [TOKENS[(start + j) % 6] for j in range(5)]
            f.write(json.dumps(_segments(ids, 1)) + "\n")
    ev = root / "seq_eval.jsonl"
    with open(ev, "w") as f:
        for start in range(6):
            ids = [TOKENS[(start + j) % 6] for j in range(3)]
            f.write(json.dumps(_segments(ids, 2)) + "\n")
    run_dir = root / "run"
    cfg = load_config(
        None,
        task.with_args(
            f"data.sft={sft}",
            f"data.eval={ev}",
            "ground.steps=0",
            "sft.steps=4",
            "sft.lr=0.01",
            "eval.curve_every=2",
            "log.tensorboard=true",
            f"run_dir={run_dir}",
        ),
    )
    results = run(cfg)
    return run_dir, results


def test_sequence_run_reports_popularity_on_the_same_users(seq_run):
    run_dir, results = seq_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["recall@3"] == results["recall@3"]
    pop = on_disk["popularity_baseline"]
    assert pop["num_eval"] == on_disk["num_eval"] == 6
    # training targets: every token is a target 4 times -> ties, broken by name: <i_0>,
    # <i_1>, <i_2> on top; the eval targets are <i_2> .. <i_5>, <i_0>, <i_1>
    assert pop["recall@1"] == pytest.approx(1 / 6) and pop["recall@3"] == pytest.approx(3 / 6)
    assert on_disk["valid_rate"] == 1.0
    ranks = json.loads((run_dir / "eval_ranks.json").read_text())
    assert len(ranks["ranks"]) == 6
    hits = sum(r is not None and r <= 3 for r in ranks["ranks"])
    assert on_disk["recall@3"] == pytest.approx(hits / 6)  # the ranks are the metrics' own


def test_learning_curve_rows(seq_run):
    run_dir, results = seq_run
    rows = [json.loads(x) for x in (run_dir / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    # batch 4 of rows with 4 targets each: 16 targets a step
    assert [r["targets_seen"] for r in rows] == [32, 64]
    assert rows[0]["train_seconds"] <= rows[1]["train_seconds"]
    assert "popularity_baseline" in rows[0]
    # the last point ranks the final model; the final evaluation reuses it and says so
    assert results["retrieval_from"].startswith("curve.jsonl step 4")
    assert rows[-1]["recall@3"] == pytest.approx(results["recall@3"], abs=1e-5)


def test_learning_curve_goes_to_tensorboard(seq_run):
    run_dir, _ = seq_run
    rows = [json.loads(x) for x in (run_dir / "curve.jsonl").read_text().splitlines()]
    tb = read_tensorboard_scalars(run_dir / TENSORBOARD_DIR)
    for row in rows:  # every number of every curve.jsonl row, at its fine-tuning step
        for k, v in flat_scalars({k: v for k, v in row.items() if k != "step"}).items():
            assert (row["step"], np.float32(v)) in tb[tensorboard_tag(f"curve/{k}")], k
    assert [s for s, _ in tb["curve/recall_3"]] == [2, 4]
