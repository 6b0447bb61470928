"""The trackers get exactly the numbers RunLog records: TensorBoard event files (tensorboardX)
and a W&B run in offline mode, both read back from their files."""

import json
import math

import numpy as np
import pytest

from gti_jax.errors import BadInput
from gti_jax.train import tracking
from gti_jax.train.config import load_config, parse_cli
from gti_jax.train.runlog import RunLog
from gti_jax.train.tracking import Tracker, check_tracking
from tests.helpers.tracking_files import read_tensorboard_scalars, read_wandb_history

ROWS = [  # two stages, each counting its steps from 1, as the training loop logs them
    *(
        {
            "stage": "ground",
            "step": s,
            "loss": 3.0 / s,
            "lr": 1e-2 * s,
            "grad_norm": 0.1 + s,
            "tokens_per_s": 1234.5 * s,
        }
        for s in (1, 2, 3)
    ),
    *(
        {
            "stage": "sft",
            "step": s,
            "loss": 2.0 / s + 1e-9,
            "lr": 1e-3,
            "grad_norm": math.nan,
            "tokens_per_s": 99.25,
        }
        for s in (1, 2)
    ),
]
RESULTS = {
    "loss": 1.25,
    "recall@5": 0.5,
    "num_eval": 6,
    "popularity_baseline": {"recall@5": 0.125},
    "k": [5],
    "model": "x",
}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def _log(run_dir, cfg):
    log = RunLog(run_dir, tracker=Tracker(cfg.log, run_dir, {"seed": cfg.seed}))
    for row in ROWS:
        log.metrics(row)
    log.scalars("eval", RESULTS, 5)
    log.scalars("diagnostics", {"effective_rank": 1.0, "stable_rank": 1.5}, 0)
    log.close()
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected(lines):
    """(prefix/name, step) -> value for every number of metrics.jsonl and the extra calls."""
    out = {}
    for row in lines:
        for k, v in row.items():
            if k not in ("stage", "step") and v is not None:
                out[(f"{row['stage']}/{k}", row["step"])] = v
    out |= {("eval/loss", 5): 1.25, ("eval/recall@5", 5): 0.5, ("eval/num_eval", 5): 6.0}
    out |= {("eval/popularity_baseline/recall@5", 5): 0.125}
    out |= {("diagnostics/effective_rank", 0): 1.0, ("diagnostics/stable_rank", 0): 1.5}
    return out


def test_tensorboard_gets_the_numbers_of_metrics_jsonl(tmp_path):
    lines = _log(tmp_path, parse_cli(["--log.tensorboard"]))
    assert [r["stage"] for r in lines] == [r["stage"] for r in ROWS]
    assert lines[3]["grad_norm"] is None  # NaN is null in metrics.jsonl and absent below
    expected = {(tracking.tensorboard_tag(k), s): v for (k, s), v in _expected(lines).items()}
    assert ("eval/recall_5", 5) in expected

    tb = read_tensorboard_scalars(tmp_path / tracking.TENSORBOARD_DIR)
    got = {(tag, step): v for tag, points in tb.items() for step, v in points}
    assert set(got) == set(expected)
    for key, value in expected.items():  # TensorBoard stores float32: the same rounding
        assert got[key] == np.float32(value), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


@pytest.mark.slow  # starts wandb's service process (~10 s idle, a minute on a loaded machine)
def test_wandb_offline_gets_the_numbers_of_metrics_jsonl(tmp_path, offline):
    lines = _log(tmp_path, parse_cli(["--log.wandb.project", "gti-test"]))
    wb = {}
    for row in read_wandb_history(tmp_path):
        (axis,) = [k for k in row if k.endswith("/step")]  # one x-axis per prefix
        prefix = axis.removesuffix("/step")
        for k, v in row.items():
            if k.startswith(prefix + "/") and k != axis:
                wb[(k, row[axis])] = v
    assert wb == _expected(lines)  # W&B keeps float64 (JSON): exactly the same numbers
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert run.name.endswith(run_id)


def test_no_tracker_configured_writes_nothing_else(tmp_path):
    lines = _log(tmp_path, load_config(None, []))
    assert len(lines) == len(ROWS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_missing_package_is_one_line_of_bad_input(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util,
        "find_spec",
        lambda n: None if n in ("tensorboardX", "wandb") else real(n),
    )
    with pytest.raises(
        BadInput,
        match=r"^log.tensorboard=true needs the tensorboardX package; pip install 'gti_jax\[tracking\]'",
    ):
        check_tracking(load_config(None, ["log.tensorboard=true"]).log)
    with pytest.raises(BadInput, match=r"^log.wandb.project=p needs the wandb package"):
        check_tracking(load_config(None, ["log.wandb.project=p"]).log)
    check_tracking(load_config(None, []).log)  # nothing asked, nothing needed


def test_log_section_beside_the_top_level_log_every():
    cfg = parse_cli(["log_every=3", "log.wandb.tags=[a, b]", "--log.tensorboard"])
    assert (cfg.log_every, cfg.log.wandb.tags, cfg.log.tensorboard) == (3, ("a", "b"), True)


def test_flat_scalars_leaves_out_what_is_not_a_finite_number():
    got = tracking.flat_scalars({"a": 1, "b": True, "c": math.inf, "d": {"e": 2.5, "f": "x"}})
    assert got == {"a": 1.0, "d/e": 2.5}
