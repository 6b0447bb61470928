"""``python -m gti_jax.train [--config FILE] [key=value ...]`` (``gti-train``): the GTI run.

The whole run (:mod:`gti_jax.pipeline`). With no arguments it runs the built-in quickstart
(SmolLM2-135M on MovieLens-100k, with GTI). ``--help`` lists every config key with its
default and meaning. Re-running the same command on the same ``run_dir`` resumes from the
last checkpoint.

Exit codes, chosen by the error's type (``gti_jax.errors``), never by its message: 0 done;
2 bad input (``BadInput``: one line on stderr says what and how to fix it; nothing was
written); 75 stopped by SIGTERM after writing a checkpoint (re-run to resume); 1 the run
started and failed (``RunFailed``: a non-finite loss, a full disk, a bug): one line names
the stage and ``run_dir/error.log`` with the traceback, everything written is kept, and
re-running resumes.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    # Imported here, not at the top: `python -m gti_jax.train` re-executes itself (below)
    # before anything imports jax.
    from gti_jax import pipeline
    from gti_jax.errors import BadInput, RunFailed
    from gti_jax.train.run import PREEMPTED_EXIT_CODE, Preempted

    try:
        cfg = pipeline.parse_cli(sys.argv[1:] if argv is None else argv)
    except BadInput as e:  # ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    try:
        pipeline.run(cfg)  # the recommendation front end (data.* unset), then training
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except BadInput as e:  # found before the run directory was made
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # NonFiniteError, StageFailed: the run directory is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The ``gti-train`` console script: ``python -m gti_jax.train``'s start-up, then main."""
    from gti_jax._env import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()
    sys.exit(main())


if __name__ == "__main__":
    cli()
