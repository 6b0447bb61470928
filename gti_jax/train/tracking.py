"""Experiment tracking: the run's scalars to TensorBoard (``log.tensorboard``) and W&B
(``log.wandb.project``), beside ``metrics.jsonl``.

:class:`Tracker` receives what :class:`gti_jax.train.runlog.RunLog` records, so the trackers
see exactly the numbers of ``metrics.jsonl`` (each training line's ``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``, ... under ``<stage>/<name>`` at the stage's step), plus the
final evaluation (``eval/<name>``, nested results joined with ``/``) and the diagnostics of
each recorded stage (``diagnostics/effective_rank``, ...), both at the run's global step
(grounding steps, then fine-tuning steps), and the learning curve's points
(``curve/<name>``, ``eval.curve_every``) at their fine-tuning step. TensorBoard's tags replace characters it does
not allow with ``_`` (``eval/recall_10``, :func:`tensorboard_tag`); W&B keeps the names
(``eval/recall@10``) and gets one x-axis per prefix
(``<prefix>/step``), since its own step may only grow and the stages restart theirs.

Both writers are optional packages (``pip install 'gti_jax[tracking]'``): a key that asks
for one that is not installed is bad input, found before the run directory is made
(:func:`check_tracking`). TensorBoard event files go to ``run_dir/tensorboard/`` (written by
tensorboardX, flushed after each call so a killed run keeps what it logged); W&B writes
under ``run_dir/wandb/`` (``WANDB_MODE=offline`` keeps it there, ``wandb sync`` uploads it
later), and a resumed run continues the same W&B run (its id is kept in
``run_dir/wandb_run_id``). Only process 0 tracks.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gti_jax.errors import BadInput
from gti_jax.io.atomic import atomic_write

__all__ = ["TENSORBOARD_DIR", "Tracker", "check_tracking", "flat_scalars", "tensorboard_tag"]

TENSORBOARD_DIR = "tensorboard"
_WANDB_ID_FILE = "wandb_run_id"
_INSTALL = "pip install 'gti_jax[tracking]'"


def check_tracking(log_cfg: Any) -> None:
    """Raises :class:`BadInput` (one line) when a tracker is asked for but not installed."""
    if log_cfg.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise BadInput(
            f"log.tensorboard=true needs the tensorboardX package; {_INSTALL}, or set "
            "log.tensorboard=false"
        )
    if log_cfg.wandb.project and importlib.util.find_spec("wandb") is None:
        raise BadInput(
            f"log.wandb.project={log_cfg.wandb.project} needs the wandb package; {_INSTALL}, "
            "or unset log.wandb.project"
        )


def flat_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) mapping, keys joined with ``/``; text, lists, bools,
    None and non-finite values are left out.

    Example:
      >>> flat_scalars({"loss": 1.5, "stage": "sft", "pop": {"recall@5": 0.25}, "n": None})
      {'loss': 1.5, 'pop/recall@5': 0.25}
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                out[name] = float(value)
    return out


def tensorboard_tag(name: str) -> str:
    """The tag TensorBoard shows for `name`: characters outside ``[-/\\w.]`` become ``_``
    (tensorboardX would do it with a warning), so ``eval/recall@10`` is ``eval/recall_10``.

    Example:
      >>> tensorboard_tag("eval/recall@10")
      'eval/recall_10'
    """
    return re.sub(r"[^-/\w.]", "_", name)


class Tracker:
    """The configured trackers of one run; every method is a no-op when none is configured.

    Args:
      log_cfg: the config's ``log`` section (:class:`gti_jax.train.config.LogConfig`).
      run_dir: the run directory (the trackers write under it).
      config: the resolved config as plain values (W&B records it with the run).
    """

    def __init__(self, log_cfg: Any, run_dir: str | os.PathLike, config: Mapping[str, Any]):
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._axes: set[str] = set()
        if log_cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir / TENSORBOARD_DIR))
        if log_cfg.wandb.project:
            self._wandb = self._start_wandb(log_cfg.wandb, dict(config))

    def _start_wandb(self, wb: Any, config: dict[str, Any]):
        import wandb

        id_file = self.run_dir / _WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:  # W&B's own form of run id: 8 lowercase letters and digits
            run_id = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in "12345678"
            )
            atomic_write(id_file, lambda f: f.write(run_id + "\n"))
        return wandb.init(
            project=wb.project,
            entity=wb.entity,
            name=wb.name or self.run_dir.name,
            tags=list(wb.tags) or None,
            dir=str(self.run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Logs the finite numbers of `values` as ``<prefix>/<name>`` at `step`."""
        if not self.active:
            return
        flat = {f"{prefix}/{k}": v for k, v in flat_scalars(values).items()}
        if not flat:
            return
        if self._tb is not None:
            for tag, value in flat.items():
                self._tb.add_scalar(tensorboard_tag(tag), value, int(step))
            self._tb.flush()
        if self._wandb is not None:
            axis = f"{prefix}/step"
            if prefix not in self._axes:
                self._wandb.define_metric(axis)
                self._wandb.define_metric(f"{prefix}/*", step_metric=axis)
                self._axes.add(prefix)
            self._wandb.log({**flat, axis: int(step)})

    def close(self) -> None:
        """Flushes and closes the writers (the W&B run is finished)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
