"""Process set-up shared by the command-line entry points."""

from __future__ import annotations

import os
import platform
import sys

_TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_hugepage_malloc() -> None:
    """Restarts this command with glibc's transparent-huge-page malloc, once.

    On CPU hosts XLA allocates a fresh buffer for every output; with 4 KiB pages the first
    touch of a 700 MB embedding table costs ~180k page faults, which made growing a
    Qwen3-sized table 4x slower than a numpy copy (numpy madvises huge pages itself). glibc
    (>= 2.35) reads ``GLIBC_TUNABLES`` only at start-up, so the CLIs re-execute themselves
    with ``glibc.malloc.hugetlb=1`` before importing jax. Set ``GTI_JAX_NO_REEXEC=1`` to
    opt out. Library users can export the variable themselves.
    """
    if sys.platform != "linux" or os.environ.get("GTI_JAX_NO_REEXEC"):
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return
    lib, version = platform.libc_ver()
    try:
        ok = lib == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        ok = False
    if not ok:
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{_TUNABLE}" if tunables else _TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
