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
