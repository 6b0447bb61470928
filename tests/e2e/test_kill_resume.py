"""A killed training job resumes exactly, nothing half-written is taken as good, and a
non-finite step stops the run cleanly (or is skipped, with a limit).

One run directory is interrupted six times by real signals to ``python -m gti_jax.train``
(SIGKILL during grounding, during an orbax checkpoint write, during fine-tuning, during
evaluation, during the export; SIGTERM during fine-tuning, which must exit 75 after a
checkpoint) and restarted with the same command each time (``checkpoint.async_save``
alternates, a key that may change on resume). After every interruption each checkpoint on
disk that looks complete must restore, and the next start must resume from the newest one.
The end result must equal an uninterrupted run bit for bit: results.json, the exported
model.safetensors, the grounded-rows files and the logged loss curve.

The kill points are found by watching the run directory (metrics lines, stages.json, orbax's
``*.orbax-checkpoint-tmp*`` directories, the export's ``.export.tmp-*`` directory). A kill
that misses a short window (the process finished the write first) is retried on the next
start; a miss can only cost time, never a false pass.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gti_jax.train.checkpoint import load_rows
from tests.helpers.tiny_task import (
    results_without_timing,
    sha256,
    train_command,
    train_env,
)

# trainer subprocesses started and killed over and over; the slowest tests of the suite
pytestmark = pytest.mark.slow

G, S = 12, 12
EXTRA = (f"ground.steps={G}", f"sft.steps={S}", "log_every=1", "checkpoint.every=3")
# A step is resumable once orbax finalized it (its commit is an atomic rename that leaves
# _CHECKPOINT_METADATA) or gti_jax sealed it with its checksum manifest; a save killed between
# orbax's commit and the seal is complete, is resumed from and sealed then.
RESUMABLE = ("gti_checksums.json", "_CHECKPOINT_METADATA")


def _args(task, run_dir, *more):
    return task.with_args(*EXTRA, f"run_dir={run_dir}", *more)


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    """One uninterrupted run of the same command line, through the command's own ``main``
    in this process: the same configuration, XLA flags and programs as the subprocesses
    (they inherit this environment), without a second interpreter's start-up and imports."""
    from gti_jax.train.__main__ import main

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(task, run_dir)) == 0
    return run_dir


# --------------------------------------------------------------------------------------------
# Watching a run directory.
# --------------------------------------------------------------------------------------------


def _done(run_dir: Path, stage: str) -> bool:
    try:
        return bool(json.loads((run_dir / "stages.json").read_text()).get(stage, {}).get("done"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _complete_steps(ckpt_dir: Path) -> list[int]:
    """The checkpoints a resuming run may take (finalized by orbax or sealed by gti_jax)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in ckpt_dir.iterdir()
        if p.name.isdigit() and any((p / f).is_file() for f in RESUMABLE)
    )


def _ckpt_temps(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return [p.name for p in ckpt_dir.iterdir() if "orbax-checkpoint-tmp" in p.name]


def _restore_every_complete(ckpt_dir: Path) -> tuple[int | None, dict | None]:
    """Restores every complete checkpoint (read-only); returns the newest step and its meta."""
    meta = None
    steps = _complete_steps(ckpt_dir)
    for step in steps:
        with ocp.StandardCheckpointer() as c:
            state = c.restore(ckpt_dir / str(step) / "state")
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
        meta = json.loads((ckpt_dir / str(step) / "meta" / "metadata").read_text())
        assert meta["step"] == (step if meta["stage"] == "ground" else step - G)
    return (steps[-1] if steps else None), meta


class _Run:
    """One start of the trainer, with stderr in a file."""

    def __init__(self, task, run_dir: Path, log: Path, async_save: bool):
        self.log = log
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            train_command(
                *_args(task, run_dir, f"checkpoint.async_save={str(async_save).lower()}")
            ),
            env=train_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w"),  # noqa: SIM115 (closed by the child's exit)
        )

    def stderr(self) -> str:
        return self.log.read_text()

    def steps(self, stage: str) -> list[int]:
        """The steps of `stage` this start has run (its progress lines, one per step)."""
        return [int(k) for k in re.findall(rf"^\[{stage}\] step (\d+)/", self.stderr(), re.M)]

    def wrote(self, path: Path) -> bool:
        """Whether this start has written `path` (it exists and is newer than the start)."""
        try:
            return path.stat().st_mtime >= self.t0
        except FileNotFoundError:
            return False

    def wait_for(self, cond, *, what: str, timeout: float = 300, busy: bool = False) -> None:
        """Polls `cond(self)` until true; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while not cond(self):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {self.proc.returncode}) before {what}:\n"
                    + self.stderr()[-3000:]
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0 if busy else 0.002)

    def signal(self, sig) -> int:
        assert self.proc.poll() is None, "the run ended before the signal"
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=300)


def _resumed_from(err: str) -> str | None:
    m = re.search(r"resumed (grounding|fine-tuning) at step (\d+)/", err)
    return None if m is None else f"{m.group(1)} {m.group(2)}"


def _expected_resume(step: int | None, meta: dict | None) -> str | None:
    if step is None:
        return None
    return f"{'grounding' if meta['stage'] == 'ground' else 'fine-tuning'} {meta['step']}"


def test_killed_run_resumes_bitwise(task, reference, tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    logs = tmp_path / "logs"
    logs.mkdir()
    latest, meta = None, None
    hit: dict[str, bool] = {}
    starts = 0

    def start(async_save: bool) -> _Run:
        nonlocal starts
        starts += 1
        return _Run(task, run_dir, logs / f"{starts}.err", async_save)

    def after_kill(run: _Run) -> None:
        nonlocal latest, meta
        # the start resumed from the newest complete checkpoint the previous kill left
        assert _resumed_from(run.stderr()) == _expected_resume(latest, meta), run.stderr()[-2000:]
        latest, meta = _restore_every_complete(ckpt_dir)

    # 1. SIGKILL in the middle of grounding (async checkpoints in flight)
    run = start(True)
    run.wait_for(lambda r: 8 in r.steps("ground"), what="grounding step 8")
    assert run.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not _done(run_dir, "ground")
    after_kill(run)

    # 2. SIGKILL while orbax writes a checkpoint (its temporary directory exists)
    for _ in range(4):
        run = start(True)
        # once a step ran, the stale temporaries of the last kill are gone (orbax cleans them)
        run.wait_for(lambda r: r.steps("ground") or r.steps("sft"), what="a training step")
        run.wait_for(lambda r: _ckpt_temps(ckpt_dir), what="a checkpoint write", busy=True)
        assert run.signal(signal.SIGKILL) == -signal.SIGKILL
        hit["checkpoint write"] = bool(_ckpt_temps(ckpt_dir))  # still half-written on disk
        after_kill(run)
        if hit["checkpoint write"]:
            break
    assert hit["checkpoint write"], "never killed during a checkpoint write in 4 tries"

    # 3. SIGTERM during fine-tuning: exit 75 once a checkpoint is written
    run = start(False)
    run.wait_for(lambda r: len(r.steps("sft")) >= 2, what="two fine-tuning steps")
    assert run.signal(signal.SIGTERM) == 75, run.stderr()[-3000:]
    err = run.stderr()
    m = re.search(r"stopped during fine-tuning after step (\d+)/", err)
    assert m and "re-run the same command to resume" in err, err[-2000:]
    after_kill(run)
    assert latest == G + int(m.group(1)) and meta["stage"] == "sft"

    # 4. SIGKILL in the middle of fine-tuning (synchronous checkpoints)
    run = start(False)
    run.wait_for(lambda r: len(r.steps("sft")) >= 4, what="four fine-tuning steps")
    assert run.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not _done(run_dir, "sft")
    after_kill(run)

    # 5. SIGKILL during evaluation (after fine-tuning finished, before results.json)
    run = start(True)
    run.wait_for(lambda r: "] evaluating " in r.stderr(), what="the start of evaluation")
    assert run.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    after_kill(run)
    assert latest == G + S

    # 6. SIGKILL while the export is being written (its temporary directory exists)
    def export_temps(_=None):
        return [n for n in os.listdir(run_dir) if n.startswith(".export.tmp-")]

    for attempt in range(4):
        run = start(attempt % 2 == 0)
        run.wait_for(lambda r: r.wrote(run_dir / "results.json"), what="results.json")
        run.wait_for(export_temps, what="the export", busy=True)
        rc = run.signal(signal.SIGKILL)
        hit["export"] = bool(export_temps())  # killed before the rename into place
        if (run_dir / "export").exists():  # only ever a complete export (an earlier miss)
            assert sha256(run_dir / "export/model.safetensors") == sha256(
                reference / "export/model.safetensors"
            )
        after_kill(run)
        if hit["export"]:
            assert rc == -signal.SIGKILL
            break
    assert hit["export"], "never killed during the export in 4 tries"

    # 7. the same command finishes the run
    run = start(True)
    assert run.proc.wait(timeout=600) == 0, run.stderr()[-3000:]
    assert _resumed_from(run.stderr()) == _expected_resume(latest, meta)

    # nothing half-written is left, and the outputs equal the uninterrupted run's, bit for bit
    assert not _ckpt_temps(ckpt_dir)
    assert not [n for n in os.listdir(run_dir) if n.startswith((".export.", ".rows-"))]
    assert results_without_timing(run_dir) == results_without_timing(reference)
    assert sha256(run_dir / "export/model.safetensors") == sha256(
        reference / "export/model.safetensors"
    )
    for name in ("grounded_rows.safetensors", "grounded_head_rows.safetensors"):
        # safetensors writes its metadata in hash-map order, so the same rows and metadata
        # may not give the same bytes even without a kill: compare the contents, bitwise
        got, want = load_rows(run_dir / name), load_rows(reference / name)
        assert got[1] == want[1] and got[0].dtype == want[0].dtype
        assert got[0].tobytes() == want[0].tobytes(), name
    assert _loss_curve(run_dir) == _loss_curve(reference)


def _loss_curve(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows]


# --------------------------------------------------------------------------------------------
# Non-finite steps (the GTI_JAX_FAULT_AT_STEP hook gives a batch a NaN loss mask).
# --------------------------------------------------------------------------------------------


def _state_leaves(ckpt_dir: Path, step: int) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as c:
        state = c.restore(ckpt_dir / str(step) / "state")
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def test_nonfinite_step_stops_then_resumes_with_skip(task, tmp_path, capsys, monkeypatch):
    from gti_jax.train.__main__ import main

    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    # fine-tuning step 3 = global step 9 (after 6 grounding steps); checkpoints every 2 steps
    args = task.with_args(f"run_dir={run_dir}", "eval.max_examples=0")
    monkeypatch.setenv("GTI_JAX_FAULT_AT_STEP", "9")

    assert main(args) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert err == [
        "error: non-finite loss at sft step 3 (global step 9); the last good checkpoint "
        "(global step 8) is kept; lower sft.lr, check the data, or re-run with "
        "nan_policy=skip to skip such steps"
    ]
    assert _complete_steps(ckpt_dir)[-1] == 8 and not _ckpt_temps(ckpt_dir)
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "export").exists()

    # the same run, resumed with nan_policy=skip (and a checkpoint after every step): the
    # faulty step changes neither the parameters nor the optimizer state
    more = ["nan_policy=skip", "max_skipped_steps=1", "checkpoint.every=1", "checkpoint.keep=9"]
    assert main(args + more) == 0, capsys.readouterr().err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["skipped_steps"] == {"ground": 0, "sft": 1}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # no line for the skipped step; the lines after it count it
    sft = [(r["step"], r.get("skipped_steps")) for r in rows if r["stage"] == "sft"]
    assert sft == [(1, None), (2, None), (4, 1), (6, 1)]
    assert json.loads((run_dir / "stages.json").read_text())["sft"]["skipped_at"] == [3]
    before, after, later = (_state_leaves(ckpt_dir, s) for s in (8, 9, 10))
    counters = ("notfinite_count", "last_finite", "total_notfinite")
    same = [k for k in before if not any(c in k for c in counters)]
    assert same and all(before[k].tobytes() == after[k].tobytes() for k in same)
    assert any(before[k].tobytes() != later[k].tobytes() for k in same)  # step 10 trained
    assert [int(after[k]) for k in after if "total_notfinite" in k] == [1]
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_too_many_skipped_steps_stop(task, tmp_path, capsys, monkeypatch):
    from gti_jax.train.__main__ import main

    run_dir = tmp_path / "run"
    monkeypatch.setenv("GTI_JAX_FAULT_AT_STEP", "2,5")
    args = task.with_args(
        f"run_dir={run_dir}", "eval.max_examples=0", "nan_policy=skip", "max_skipped_steps=1"
    )
    assert main(args) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(
        "error: non-finite loss at ground step 5 (global step 5): 2 ground steps skipped, "
        "more than max_skipped_steps=1; the last good checkpoint (global step 4) is kept"
    ), err
    assert _complete_steps(run_dir / "checkpoints")[-1] == 4
