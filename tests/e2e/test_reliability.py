"""A run that started never loses what it wrote, whatever fails; every stage combination runs.

Each case runs ``python -m gti_jax.train`` in-process through ``main(argv)`` on the tiny task
(a random model, six new tokens), with only the stages it needs, so each takes seconds.
Faults are injected at the write layer: a full disk (``ENOSPC``) while writing
``results.json``, the export or a checkpoint, and a run directory that turns read-only.
After each fault: one ``error:`` line naming the stage, exit 1, nothing half-written under a
final name, and the same command run again completes.
"""

import builtins
import errno
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import gti_jax.io.safetensors as st_io
from gti_jax.errors import BadInput, GtiError, RunFailed
from gti_jax.train.__main__ import main
from tests.helpers.tiny_task import train_command, train_env


def _args(task, run_dir, *extra, ground=0, sft=0, eval_=False, candidates=False):
    """Overrides running only the stages asked for (later `extra` ones win), drawing the
    figures (whether loss.png is drawn is part of what these tests check)."""
    stages = task.stage_args(ground=ground, sft=sft, eval_=eval_, candidates=candidates)
    return [*stages, f"run_dir={run_dir}", "log.plots=true", *extra]


def _one_error_line(err: str) -> str:
    """The run's single ``error:`` line (the last line), with no traceback on stderr."""
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    return errors[0]


def _temporaries(run_dir: Path) -> list[str]:
    """Hidden temporaries an interrupted write could leave (outside the checkpoints)."""
    return sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob(".*")
        if "checkpoints" not in p.parts and p.name != ".gitignore"
    )


def _stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "stages.json").read_text())


def _main(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Item 1: bad input and a failed run are told apart by type; a failed run keeps everything.
# --------------------------------------------------------------------------------------------


def test_error_classes_share_one_base_with_two_branches():
    from gti_jax.models.hf import CheckpointMismatchError
    from gti_jax.rec.data import RecDataError
    from gti_jax.rec.prepare import PrepareError
    from gti_jax.train.config import ConfigError
    from gti_jax.train.data import DataError, DataFileNotFoundError
    from gti_jax.train.run import NonFiniteError, Preempted, StageFailed, TrainError
    from gti_jax.vocab.tokens import TokenError

    for bad in (
        TrainError,
        DataError,
        DataFileNotFoundError,
        TokenError,
        ConfigError,
        PrepareError,
        RecDataError,
        CheckpointMismatchError,
    ):
        assert issubclass(bad, BadInput) and issubclass(bad, ValueError), bad
        assert not issubclass(bad, RunFailed), bad
    assert issubclass(DataFileNotFoundError, FileNotFoundError)
    for failed in (NonFiniteError, StageFailed):
        assert issubclass(failed, RunFailed) and not issubclass(failed, BadInput), failed
    assert issubclass(Preempted, GtiError)
    assert issubclass(BadInput, GtiError) and issubclass(RunFailed, GtiError)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        # bad input that happens to say "non-finite" is still bad input
        ("TrainError", 2),
        # a non-finite stop is a failed run whatever its message says
        ("NonFiniteError", 1),
        ("StageFailed", 1),
    ],
)
def test_exit_code_follows_the_type_not_the_message(monkeypatch, capsys, tmp_path, error, code):
    import gti_jax.pipeline as pipeline
    import gti_jax.train.run as run_mod

    def fail(cfg):
        cls = getattr(run_mod, error)
        msg = "data.tokens=x.jsonl:3: description 'non-finite' is reserved"
        if error == "StageFailed":
            raise cls(msg, stage="evaluate", log_path=None)
        raise cls(msg)

    monkeypatch.setattr(pipeline, "run", fail)
    rc, err = _main([f"run_dir={tmp_path / 'run'}"], capsys)
    assert rc == code, err
    assert _one_error_line(err).endswith("is reserved")


def test_failure_after_start_keeps_results_and_rerun_resumes(task, tmp_path, capsys, monkeypatch):
    """A FileNotFoundError in the export used to be taken for bad input: the run directory,
    results included, was removed. Now: one line naming the stage and error.log, exit 1,
    everything kept, and the same command finishes the run."""
    import gti_jax.models

    run_dir = tmp_path / "run"
    argv = _args(task, run_dir)

    def missing(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "/gone/tokenizer.json")

    monkeypatch.setattr(gti_jax.models, "export_hf_dir", missing)
    rc, err = _main(argv, capsys)
    assert rc == 1, err[-3000:]
    line = _one_error_line(err)
    assert "stage export failed: FileNotFoundError" in line, line
    assert f"traceback in {run_dir / 'error.log'}" in line and "re-run" in line, line
    log = (run_dir / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "/gone/tokenizer.json" in log
    for kept in ("config.yaml", "stages.json", "new_tokens.json", "results.json"):
        assert (run_dir / kept).is_file(), kept
    assert _stages(run_dir)["evaluate"]["done"]

    monkeypatch.undo()
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    assert _stages(run_dir)["export"]["done"]
    assert (run_dir / "export" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# Item 2 (and item 5's permissions): every stage combination runs.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow  # a trainer subprocess
def test_baseline_without_training_writes_and_keeps_results(task, tmp_path, umask_022):
    """``python -m gti_jax.train`` with ground.steps=0 sft.steps=0 and token, eval and
    candidate files: initialize, don't train, evaluate. It used to fail drawing loss.png and
    then delete the run directory, results included."""
    run_dir = tmp_path / "run"
    r = subprocess.run(
        train_command(*_args(task, run_dir, eval_=True, candidates=True)),
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_eval"] == 6 and results["valid_rate"] == 1.0
    assert np.isfinite(results["eval_loss"]) and "recall@3" in results
    assert not (run_dir / "loss.png").exists()  # nothing trained: no loss curve
    assert not (run_dir / "metrics.jsonl").exists()
    assert {"load", "extend", "evaluate", "export"} <= set(_stages(run_dir))
    # outputs are readable like any file the user writes (0666 minus the umask)
    for name in ("config.yaml", "stages.json", "new_tokens.json", "diagnostics.json"):
        assert _mode(run_dir / name) == 0o644, (name, oct(_mode(run_dir / name)))
    assert _mode(run_dir / "results.json") == 0o644


@pytest.mark.slow  # trains or evaluates
@pytest.mark.parametrize("init", ["mean_noise", "mean_cov", "normal", "description"])
def test_evaluate_only_with_any_init(task, tmp_path, capsys, init):
    run_dir = tmp_path / "run"
    argv = _args(task, run_dir, f"init={init}", "eval.max_examples=2", "export.hf=false")
    rc, err = _main([*argv, f"data.eval={task.eval}"], capsys)
    assert rc == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_eval"] == 2 and np.isfinite(results["eval_loss"])
    assert not (run_dir / "loss.png").exists()


@pytest.mark.slow  # trains or evaluates
def test_ground_only(task, tmp_path, capsys, umask_022):
    run_dir = tmp_path / "run"
    rc, err = _main(_args(task, run_dir, "export.hf=false", ground=4), capsys)
    assert rc == 0, err[-3000:]
    stages = _stages(run_dir)
    assert stages["ground"]["done"] and "sft" not in stages
    assert (run_dir / "loss.png").is_file()
    rows = run_dir / "grounded_rows.safetensors"
    assert _mode(rows) == 0o644, oct(_mode(rows))
    assert not _temporaries(run_dir)


@pytest.mark.slow  # trains or evaluates
def test_sft_only(task, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, err = _main(_args(task, run_dir, "export.hf=false", sft=4), capsys)
    assert rc == 0, err[-3000:]
    stages = _stages(run_dir)
    assert stages["sft"]["done"] and "ground" not in stages
    assert (run_dir / "loss.png").is_file()
    assert not (run_dir / "grounded_rows.safetensors").exists()


@pytest.mark.slow  # trains
def test_without_plots_the_numbers_are_kept_and_redraw_draws_them(task, tmp_path, capsys):
    """log.plots=false draws nothing but keeps what every figure is drawn from, and
    ``python -m gti_jax.diagnose RUN_DIR`` draws them all afterwards."""
    from gti_jax.diagnose import main as diagnose_main

    run_dir = tmp_path / "run"
    argv = _args(task, run_dir, "export.hf=false", "log.plots=false", ground=2, sft=2)
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    assert not list(run_dir.rglob("*.png"))
    assert set(json.loads((run_dir / "diagnostics.json").read_text())) == {"init", "ground", "sft"}
    assert diagnose_main([str(run_dir)]) == 0
    for png in ("loss.png", "spectra.png", "cosine_init.png", "new_cosine_sft.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_nothing_but_export(task, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, err = _main(_args(task, run_dir), capsys)
    assert rc == 0, err[-3000:]
    assert _stages(run_dir)["export"]["done"]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert set(json.loads((run_dir / "results.json").read_text())) == {"wall_seconds"}
    assert not (run_dir / "loss.png").exists()


# --------------------------------------------------------------------------------------------
# Item 4: a full disk or a read-only run directory loses nothing.
# --------------------------------------------------------------------------------------------

_REAL_FSYNC = os.fsync


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _no_space(name: str):
    """An ``os.fsync`` that fails with ENOSPC on a file whose path contains `name` (the data
    is already written, unflushed: the temporary is half-written when the error comes)."""

    def fsync(fd):
        if name in os.path.basename(_fd_path(fd)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _REAL_FSYNC(fd)

    return fsync


def test_disk_full_writing_results(task, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    argv = _args(task, run_dir, "export.hf=false")
    monkeypatch.setattr(os, "fsync", _no_space("results.json"))
    rc, err = _main(argv, capsys)
    assert rc == 1, err[-3000:]
    line = _one_error_line(err)
    assert "stage evaluate failed: OSError" in line and "No space left on device" in line, line
    assert not (run_dir / "results.json").exists()
    assert not _temporaries(run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "error.log").is_file()

    monkeypatch.undo()
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    assert set(json.loads((run_dir / "results.json").read_text())) == {"wall_seconds"}


def test_disk_full_writing_the_export(task, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    argv = _args(task, run_dir)
    real_write = st_io._write

    def half_then_full(f, tensors, metadata):  # f: the open temporary file
        real_write(f, tensors, metadata)
        f.flush()
        f.truncate(f.tell() // 2)  # the disk filled up half-way through the file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f.name))

    monkeypatch.setattr(st_io, "_write", half_then_full)
    rc, err = _main(argv, capsys)
    assert rc == 1, err[-3000:]
    line = _one_error_line(err)
    assert "stage export failed: OSError" in line and "No space left on device" in line, line
    assert not (run_dir / "export").exists()
    assert not _temporaries(run_dir)
    assert (run_dir / "results.json").is_file()

    monkeypatch.undo()
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    tensors = st_io.load_dir_tensors(run_dir / "export")
    assert tensors["model.embed_tokens.weight"].shape[0] % 8 == 0


@pytest.mark.slow  # trains or evaluates
def test_disk_full_writing_a_checkpoint(task, tmp_path, capsys, monkeypatch):
    """The checkpoint of step 4 fails half-way (its meta file cannot be written): step 2
    stays the newest complete checkpoint, and the re-run resumes from it."""
    import orbax.checkpoint as ocp

    from gti_jax.train.checkpoint import Checkpointer

    run_dir = tmp_path / "run"
    argv = _args(task, run_dir, "export.hf=false", "checkpoint.async_save=false", ground=6)
    handler = ocp.JsonCheckpointHandler
    real_save = handler._save_fn

    async def save_fn(self, x, directory):
        if isinstance(x, dict) and x.get("step") == 4:
            (directory / "metadata").write_text(json.dumps(x)[:5])  # cut off by the full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        return await real_save(self, x, directory)

    monkeypatch.setattr(handler, "_save_fn", save_fn)
    rc, err = _main(argv, capsys)
    assert rc == 1, err[-3000:]
    line = _one_error_line(err)
    assert "stage ground failed" in line and "No space left on device" in line, line
    with Checkpointer(run_dir / "checkpoints", async_save=False) as ckpt:
        assert ckpt.all_steps() == [2]  # the cut-off step 4 is not taken for a checkpoint
    assert not (run_dir / "grounded_rows.safetensors").exists()

    monkeypatch.undo()
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    assert "resumed grounding at step 2/6" in err
    assert _stages(run_dir)["ground"]["done"]
    with Checkpointer(run_dir / "checkpoints", async_save=False) as ckpt:
        assert ckpt.latest_step() == 6


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory anyway")
def test_read_only_run_dir_is_refused_up_front(task, tmp_path, capsys):
    """Not root: chmod 0555 makes run_dir read-only; the run refuses it before writing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    argv = _args(task, run_dir, "export.hf=false")
    try:
        rc, err = _main(argv, capsys)
    finally:
        run_dir.chmod(0o755)
    assert rc == 2, err[-3000:]
    assert "not writable" in _one_error_line(err)
    assert list(run_dir.iterdir()) == []
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]


def test_run_dir_turning_read_only_mid_run(task, tmp_path, capsys, monkeypatch):
    """The run directory becomes read-only (EROFS, which binds root too) when evaluation
    starts: every write under it fails, error.log included. One line still says what
    failed and that no traceback could be written; the re-run completes."""

    run_dir = tmp_path / "run"
    argv = _args(task, run_dir, "export.hf=false")
    read_only = {"on": False}

    def refuse(path):
        if read_only["on"] and Path(os.path.abspath(path)).is_relative_to(run_dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_mkstemp, real_open = tempfile.mkstemp, builtins.open

    def mkstemp(*a, dir=None, **k):
        refuse(os.path.join(dir or ".", "x"))
        return real_mkstemp(*a, dir=dir, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    from gti_jax.train.evaluate import Evaluator

    real_evaluate = Evaluator.__call__

    def evaluate(*a, **k):  # the run directory turns read-only as evaluation starts
        read_only["on"] = True
        return real_evaluate(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(Evaluator, "__call__", evaluate)
    rc, err = _main(argv, capsys)
    monkeypatch.undo()
    assert rc == 1, err[-3000:]
    line = _one_error_line(err)
    assert "stage evaluate failed: OSError" in line and "Read-only file system" in line, line
    assert "could not write the traceback" in line, line
    assert not (run_dir / "results.json").exists()
    assert not _temporaries(run_dir)

    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    assert (run_dir / "results.json").is_file()
