"""A damaged newest checkpoint does not stop a resume.

A tiny run is stopped during fine-tuning (global step 10; checkpoints every 2 steps, all
kept). Then its three newest checkpoints are damaged, each in a different way: step 10 has a
truncated array file, step 8 a flipped bit in one, step 6 (the end of grounding) lost its
state metadata file. The re-run must say in one line per step which one it skipped and why,
resume from step 4 (grounding), and end with bitwise the same export, grounded rows,
results and loss curve as an uninterrupted run. When no checkpoint verifies, the run stops
with one line naming the checkpoint directory.
"""

import json
import shutil

import pytest

from gti_jax.train.__main__ import main
from gti_jax.train.checkpoint import load_rows
from tests.helpers.damage import drop_metadata, flip_bit, truncate_array
from tests.helpers.tiny_task import results_without_timing, sha256

# three trainer runs
pytestmark = pytest.mark.slow

# the tiny task's own settings (checkpoints every 2 steps), every checkpoint kept, and the
# loss logged at every step like the reference run (tiny_run)
EXTRA = ("checkpoint.keep=9", "log_every=1")


@pytest.fixture
def reference(tiny_run):
    """The session's uninterrupted run of the tiny task (tests/e2e/conftest.py): the
    checkpoints kept do not change what a run computes."""
    return tiny_run


def _loss_curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows]


def _skip_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if " skipped: " in x]


def test_damaged_checkpoints_are_skipped_and_resume_is_exact(
    task, reference, tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    args = task.with_args(*EXTRA, f"run_dir={run_dir}")
    monkeypatch.setenv("GTI_JAX_STOP_AT_STEP", "10")
    assert main(args) == 75
    monkeypatch.delenv("GTI_JAX_STOP_AT_STEP")
    assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 4, 6, 8, 10]
    # a copy for the none-verifies case below
    shutil.copytree(ckpt_dir, tmp_path / "copy")

    truncate_array(ckpt_dir / "10")
    flip_bit(ckpt_dir / "8")
    drop_metadata(ckpt_dir / "6")
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    skipped = _skip_lines(err)
    assert len(skipped) == 3, err[-3000:]
    assert skipped[0].startswith("[gti_jax.train] checkpoint step 10 skipped: state/")
    assert " bytes, " in skipped[0] and "were saved" in skipped[0]
    assert skipped[1].startswith("[gti_jax.train] checkpoint step 8 skipped: state/")
    assert skipped[1].endswith("does not match its saved SHA-256")
    assert skipped[2] == ("[gti_jax.train] checkpoint step 6 skipped: state/_METADATA is missing")
    assert "resumed grounding at step 4/6" in err

    assert results_without_timing(run_dir) == results_without_timing(reference)
    assert sha256(run_dir / "export/model.safetensors") == sha256(
        reference / "export/model.safetensors"
    )
    for name in ("grounded_rows.safetensors", "grounded_head_rows.safetensors"):
        got, want = load_rows(run_dir / name), load_rows(reference / name)
        assert got[1] == want[1] and got[0].tobytes() == want[0].tobytes(), name
    assert _loss_curve(run_dir) == _loss_curve(reference)
    # the damaged steps are kept aside, not deleted; the resumed run wrote its own
    names = {p.name for p in ckpt_dir.iterdir()}
    assert {"6.unverified", "8.unverified", "10.unverified"} <= names

    # none verifies: one line naming the directory, nothing trained or moved
    for step in (2, 4, 6, 8, 10):
        flip_bit(tmp_path / "copy" / str(step))
    shutil.rmtree(ckpt_dir)
    shutil.copytree(tmp_path / "copy", ckpt_dir)
    before = sorted(p.name for p in ckpt_dir.iterdir())
    assert main(args) == 2  # the one-line errors' exit code
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: no checkpoint in {ckpt_dir} verifies (step 10: state/"
    ), lines
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before
