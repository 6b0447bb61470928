"""The tiny task of the end-to-end tests, written once per session, and its reference run.

Every module runs its trainer runs on the same files (tests/helpers/tiny_task.py: a tiny
random model, six new tokens and their data files), so the model is built once and the
in-process jit caches serve every module. `tiny_run` is the one uninterrupted run of the
whole task that several modules check or compare against. Tests read these files and that
run; none may change them (copy what a case must damage).
"""

import pytest

from tests.helpers.tiny_task import capture_export, make_tiny_task


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """The session's :class:`~tests.helpers.tiny_task.TinyTask` (read-only)."""
    return make_tiny_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="session")
def _tiny_run(task, tmp_path_factory):
    from gti_jax.train.config import load_config
    from gti_jax.train.run import run

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        exported = capture_export(mp)
        # a loss line for every step: a resumed run's curve can be compared line by line;
        # TensorBoard too (it changes nothing else; test_tracking_run.py reads it back)
        args = [*task.args, "log_every=1", "log.tensorboard=true", "log.plots=true"]
        args.append(f"run_dir={run_dir}")
        run(load_config(None, args))
    return run_dir, exported["model"]


@pytest.fixture
def tiny_run(_tiny_run):
    """The run directory of one uninterrupted run of the whole tiny task (``task.args``,
    ``log_every=1``, ``log.tensorboard=true`` and ``log.plots=true``: grounding, LoRA
    fine-tuning, evaluation, export), made once per session in this process: the reference
    the resume and damaged-checkpoint tests must reproduce bit for bit, and the run whose
    artifacts test_train.py and test_tracking_run.py check. Read-only, like `task`."""
    return _tiny_run[0]


@pytest.fixture
def tiny_run_model(_tiny_run):
    """The model `tiny_run` handed to its export (its final in-memory model)."""
    return _tiny_run[1]
