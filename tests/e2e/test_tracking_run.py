"""A whole run with log.tensorboard=true (the session's tiny run): its event files hold the
numbers of metrics.jsonl, results.json and diagnostics.json, read back from the files."""

import json

import numpy as np
import pytest

from gti_jax.train.tracking import TENSORBOARD_DIR, flat_scalars, tensorboard_tag
from tests.helpers.tracking_files import read_tensorboard_scalars


@pytest.mark.slow  # the session's whole tiny run
def test_event_files_hold_the_runs_numbers(tiny_run):
    tb = read_tensorboard_scalars(tiny_run / TENSORBOARD_DIR)
    got = {(tag, step): v for tag, points in tb.items() for step, v in points}
    expected = {}
    for line in (tiny_run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in flat_scalars(
            {k: v for k, v in row.items() if k not in ("stage", "step")}
        ).items():
            expected[(f"{row['stage']}/{k}", row["step"])] = v
    assert {s for (t, s) in expected if t == "ground/loss"} == set(range(1, 7))  # log_every=1
    assert {s for (t, s) in expected if t == "sft/loss"} == set(range(1, 7))
    results = json.loads((tiny_run / "results.json").read_text())
    final = 6 + 6  # evaluation at the run's global step: ground.steps + sft.steps
    for k, v in flat_scalars(results).items():
        expected[(tensorboard_tag(f"eval/{k}"), final)] = v
    assert ("eval/recall_3", final) in expected and ("eval/eval_loss", final) in expected
    diagnostics = json.loads((tiny_run / "diagnostics.json").read_text())
    assert set(diagnostics) == {"init", "ground", "sft"}
    for stage, step in (("init", 0), ("ground", 6), ("sft", 12)):
        top = {k: v for k, v in diagnostics[stage].items() if not isinstance(v, dict | list)}
        for k, v in flat_scalars(top).items():
            expected[(f"diagnostics/{k}", step)] = v
    assert got.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard stores float32: the same rounding
        assert got[key] == np.float32(value), key
    # the collapse and its cure, as a curve: mean init gives rank ~1, grounding spreads it
    rank = dict(tb["diagnostics/effective_rank"])
    assert rank[0] < 1.01 < rank[6]
