"""``python -m gti_jax.train [--config FILE] [key=value ...]``: the GTI training run.

With no arguments it runs the built-in quickstart (SmolLM2-135M on MovieLens-100k, with
GTI). ``--help`` lists every config key with its default and meaning. Re-running the same
command on the same ``run_dir`` resumes from the last checkpoint.

Exit codes: 0 done; 2 bad input (one line on stderr says what and how to fix it);
75 stopped by SIGTERM after writing a checkpoint (re-run to resume); 1 non-finite loss or
another failure (the last good checkpoint is kept).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from gti_jax.train.config import ConfigError, parse_cli

    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from gti_jax.train.run import PREEMPTED_EXIT_CODE, Preempted, TrainError, run

    try:
        run(cfg)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if "non-finite" in str(e) else 2
    except (ValueError, FileNotFoundError) as e:  # loaders' one-line errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from gti_jax._env import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()
    sys.exit(main())
