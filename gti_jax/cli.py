"""Console scripts that re-execute themselves before importing their command.

The command-line entry points restart once with glibc's huge-page malloc
(`gti_jax._env.reexec_with_hugepage_malloc`), which must happen before jax is imported. A
console script's target module is imported before the target runs, so a target inside the
command's own module would import jax (about 1.3 s on 2 cores) in both processes: for
`gti-extend`, which takes a few seconds end to end, a fifth of its time. These targets import
the command only after the restart.
"""

from __future__ import annotations

import sys

from gti_jax._env import reexec_with_hugepage_malloc


def extend() -> None:
    """The ``gti-extend`` console script (``python -m gti_jax.extend``)."""
    reexec_with_hugepage_malloc()
    from gti_jax.extend import main

    sys.exit(main())
