"""``python -m gti_jax.plan [--config FILE] [key=value ...]``: a run's steps, planned.

Takes the training config (every key of ``python -m gti_jax.train``, plus ``plan.*``), builds
the grounding and fine-tuning steps exactly as the trainer does on an abstract model (no
weights), compiles them for the configured mesh on fake CPU devices and prints, per device,
parameter, optimizer-state, batch and temporary bytes, the peak, FLOPs per step, the
collectives, and an estimated step time on ``plan.accelerator``.

Exit codes: 0 the plan fits; 2 bad input, or a plan that does not fit (one line on stderr
names what to change: more fsdp, remat, a smaller batch, a chunked loss).

jax reads the number of fake devices (``--xla_force_host_platform_device_count``) once,
when its backend starts, so the command parses its config, then re-executes itself with
the flag for the mesh's device count before any device is touched.
"""

from __future__ import annotations

import os
import re
import sys

_ENV = "GTI_JAX_PLAN_DEVICES"
_FLAG = "--xla_force_host_platform_device_count"


def _reexec(devices: int) -> None:
    """Restarts the command with `devices` fake CPU devices (once)."""
    if os.environ.get(_ENV) == str(devices):
        return
    flags = re.sub(rf"{_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} {_FLAG}={devices}".strip(),
        JAX_PLATFORMS="cpu",
        **{_ENV: str(devices)},
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def main(argv=None) -> int:
    # Imported here: the command re-executes itself before jax starts its backend.
    from gti_jax.errors import BadInput
    from gti_jax.plan import build

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = build.parse_cli(args)
        if argv is None:
            _reexec(build.devices_needed(cfg))
        about, stages = build.plan_stages(cfg)
    except BadInput as e:  # ConfigError, PlanError, ModelSourceError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    print(build.format_plan(cfg, about, stages), flush=True)
    if cfg.plan.output:
        build.write_json(cfg.plan.output, build.plan_json(cfg, about, stages))
    try:
        build.check_fits(cfg, stages)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
