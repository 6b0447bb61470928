"""The tiny task of the end-to-end tests, written once per session.

Every module runs its trainer runs on the same files (tests/helpers/tiny_task.py: a tiny
random model, six new tokens and their data files), so the model is built once and the
in-process jit caches serve every module. Tests read these files; none may change them
(copy what a case must damage).
"""

import pytest

from tests.helpers.tiny_task import make_tiny_task


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """The session's :class:`~tests.helpers.tiny_task.TinyTask` (read-only)."""
    return make_tiny_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="session")
def tiny_run(task, tmp_path_factory):
    """One uninterrupted run of the whole tiny task (``task.args``), in this process: the
    reference that the resume and damaged-checkpoint tests must reproduce bit for bit, and
    the run whose artifacts test_train.py checks. Read-only, like `task`."""
    from gti_jax.train.config import load_config
    from gti_jax.train.run import run

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    run(load_config(None, [*task.args, f"run_dir={run_dir}"]))
    return run_dir
