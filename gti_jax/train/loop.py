"""The training loop every stage runs, and what it needs: the NaN guard, the stop flag.

* :func:`train_loop`: steps ``start+1 .. total`` of a stage (batches as a pure function of
  the seed and the step, the NaN guard, progress, ``metrics.jsonl``, checkpoints, stops);
* :class:`NanGuard` and :func:`guard_optimizer`: a step whose loss or gradient is not finite
  is never applied; ``nan_policy`` stops the run or skips the step. The test hook
  ``GTI_JAX_FAULT_AT_STEP`` (comma-separated global steps) gives those batches a NaN loss
  mask;
* :class:`StopFlag`: set by SIGTERM (or the test hook ``GTI_JAX_STOP_AT_STEP``); the loop
  saves a checkpoint and raises :class:`Preempted`;
* :class:`StageContext`: what the stages share (config, run directory, checkpointer, mesh);
* multi-process helpers: :func:`barrier`, :func:`host`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from gti_jax.errors import GtiError, RunFailed
from gti_jax.models.sharding import host_array
from gti_jax.train.config import TrainConfig
from gti_jax.train.data import Batcher
from gti_jax.train.runlog import Progress, RunLog
from gti_jax.train.steps import current_lr

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "NanGuard",
    "NonFiniteError",
    "Preempted",
    "StageContext",
    "StopFlag",
    "barrier",
    "compute_dtype",
    "guard_optimizer",
    "host",
    "log_line",
    "train_loop",
]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, re-run the same command to resume
_STOP_ENV = "GTI_JAX_STOP_AT_STEP"  # test hook: behave as if SIGTERM arrived after that step
# Test hook: global steps (comma-separated) whose batch gets a NaN loss mask.
_FAULT_ENV = "GTI_JAX_FAULT_AT_STEP"


class NonFiniteError(RunFailed):
    """A non-finite loss or gradient stopped the run (nan_policy=stop, or too many skips)."""


class Preempted(GtiError):
    """Raised after a requested stop (SIGTERM) once a checkpoint is safely written."""


def log_line(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[gti_jax.train] {msg}", file=sys.stderr, flush=True)


class StopFlag:
    """Set by SIGTERM (or the test hook); the loops check it after every step."""

    def __init__(self):
        self.requested = False
        env = os.environ.get(_STOP_ENV)
        self.at_step = int(env) if env else None

    def install(self):
        def handler(signum, frame):
            self.requested = True
            log_line("SIGTERM received: saving a checkpoint and stopping after this step")

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. called from a notebook worker)
            pass
        return self

    def should_stop(self, global_step: int) -> bool:
        """Whether to stop after this step; on several processes, whether any process asks
        (a collective: every process calls it once per step, so they stop together)."""
        local = self.requested or (self.at_step is not None and global_step >= self.at_step)
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


def barrier(name: str) -> None:
    """Waits for every process (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host(x) -> np.ndarray:
    """A numpy copy of an array, gathered from every process when it spans several.

    On a multi-process run every process must call it for the same arrays (a collective).
    """
    return host_array(x)


def compute_dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _fault_steps() -> frozenset[int]:
    env = os.environ.get(_FAULT_ENV, "")
    return frozenset(int(x) for x in env.split(",") if x.strip())


def guard_optimizer(tx):
    """`tx` that leaves parameters and its state unchanged on a step with non-finite gradients.

    The update of such a step is zero and the inner optimizer state is kept (optax's
    ``apply_if_finite``), inside the compiled step: no copy of the parameters or the optimizer
    state is needed even though the steps donate them. The state records whether the last
    step was applied (``last_finite``) and how many were skipped (``total_notfinite``), and is
    checkpointed with the rest, so the count survives a resume.
    """
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


class NanGuard:
    """Checks every step for a non-finite loss or gradient and applies ``nan_policy``."""

    def __init__(self, cfg: TrainConfig, stage: str, offset: int, meta: dict | None):
        self.stage, self.offset = stage, offset  # global step = offset + stage step
        self.policy, self.limit = cfg.nan_policy, cfg.max_skipped_steps
        self.faults = _fault_steps()
        # the stage steps skipped so far (kept in each checkpoint's meta across resumes)
        self.skipped_at: list[int] = list((meta or {}).get("skipped_at", []))
        self.skipped = len(self.skipped_at)

    def row(self) -> dict:
        """What a metrics line records about skipped steps (nothing under nan_policy=stop)."""
        return {"skipped_steps": self.skipped} if self.policy == "skip" else {}

    def meta(self) -> dict:
        return {"skipped_at": list(self.skipped_at)} if self.skipped_at else {}

    def batch(self, step: int, batch):
        if self.offset + step in self.faults:
            return batch._replace(loss_mask=batch.loss_mask * np.float32(np.nan))
        return batch

    def check(self, step: int, metrics, opt_state, last_saved: int | None):
        """Returns ``(loss, grad_norm, skipped)``; raises NonFiniteError to stop the run."""
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        self.skipped = int(opt_state.total_notfinite)
        if math.isfinite(loss) and math.isfinite(gnorm):
            return loss, gnorm, False
        rejected = not bool(opt_state.last_finite)  # the update was not applied
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        where = f"{self.stage} step {step} (global step {self.offset + step})"
        if self.policy == "skip" and rejected and self.skipped <= self.limit:
            self.skipped_at.append(step)
            log_line(
                f"non-finite {what} at {where}: update skipped "
                f"({self.skipped} of at most {self.limit} in {self.stage})"
            )
            return loss, gnorm, True
        kept = (
            f"the last good checkpoint (global step {last_saved}) is kept"
            if last_saved
            else "no checkpoint was written yet"
        )
        if self.policy == "skip" and rejected:
            raise NonFiniteError(
                f"non-finite {what} at {where}: {self.skipped} {self.stage} steps skipped, more "
                f"than max_skipped_steps={self.limit}; {kept}; lower {self.stage}.lr, check the "
                "data, or raise max_skipped_steps"
            )
        raise NonFiniteError(
            f"non-finite {what} at {where}; {kept}; lower {self.stage}.lr, check the data, or "
            "re-run with nan_policy=skip to skip such steps"
        )


@dataclasses.dataclass
class StageContext:
    """What the training stages share."""

    cfg: TrainConfig
    run_dir: Path
    ckpt: Any
    log: RunLog
    stop: StopFlag
    mesh: Any
    rules: dict
    latest: int | None  # newest verified checkpoint step
    latest_meta: dict | None  # and its meta (stage, step)
    evaluator: Any = None  # the run's Evaluator (for eval.curve_every)
    validator: Any = None  # the Evaluator of data.valid's sample (for eval.every), or None

    @property
    def writer(self) -> bool:
        return jax.process_index() == 0


STAGE_WORDS = {"ground": "grounding", "sft": "fine-tuning"}


def train_loop(
    ctx: StageContext,
    stage,
    state,
    step_once,
    *,
    tree,
    opt_state_of,
    total,
    offset,
    start,
    examples,
    batch_size,
    data_seed,
    guard,
    last_saved,
    after_step=None,
    extra_meta=None,
    train_seconds=0.0,
    cpu_seconds=0.0,
):
    """Steps ``start+1 .. total`` of a stage: NaN guard, progress, metrics, checkpoints, stops.

    ``after_step(state, step, batcher, train_seconds, cpu_seconds)``, if given, runs after
    each step (the learning curve, validation); its time is not counted in ``train_seconds``
    and ``cpu_seconds``, the stage's training wall time and this process's CPU time so far
    (in: what a resumed checkpoint recorded), which checkpoints keep in their meta. When it
    returns True the stage ends after that step (early stopping): its checkpoint is written
    as the stage's last. ``extra_meta(global_step)``, if given, adds to each checkpoint's meta.

    ``step_once(state, batch, step) -> (state, metrics)`` is the stage's compiled step;
    ``tree(state)`` is what a checkpoint holds. Checkpoint steps are global: ``offset + step``.
    Batch ``step`` is ``Batcher(examples, seed=data_seed).batch_at(step - 1)``: a pure function
    of the seed and the step, so a resumed stage sees the batches it would have seen.
    """
    cfg, ckpt, log, stop, writer = ctx.cfg, ctx.ckpt, ctx.log, ctx.stop, ctx.writer
    batcher = Batcher(
        examples,
        batch_size=batch_size,
        seed=data_seed,
        max_len=cfg.data.max_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    progress = Progress(stage, total, start=start, every=cfg.log_every, enabled=writer)
    t_last = time.perf_counter()
    for step in range(start + 1, total + 1):
        t_step, c_step = time.perf_counter(), time.process_time()
        batch = guard.batch(step, batcher.batch_at(step - 1))
        tokens = int(np.asarray(batch.attention_mask).sum()) * jax.process_count()
        state, metrics = step_once(state, batch, step)
        loss, gnorm, skipped = guard.check(step, metrics, opt_state_of(state), last_saved)
        now = time.perf_counter()
        tps = tokens / max(now - t_last, 1e-9)  # input tokens (prompt + completion) per second
        t_last = now
        progress.update(step, loss, tps)
        # a skipped step has no loss to log; the lines after it count it
        if not skipped and (step % cfg.log_every == 0 or step == total or step == start + 1):
            row = {
                "stage": stage,
                "step": step,
                "loss": loss,
                "lr": float(current_lr(opt_state_of(state))),
            }
            log.metrics({**row, "grad_norm": gnorm, "tokens_per_s": tps, **guard.row()})
        train_seconds += time.perf_counter() - t_step
        cpu_seconds += time.process_time() - c_step
        ended = False
        if after_step is not None:
            ended = bool(after_step(state, step, batcher, train_seconds, cpu_seconds))
            t_last = time.perf_counter()  # tokens/s counts training only
        final = step == total or ended
        stopping = stop.should_stop(offset + step)  # once: a SIGTERM may land between two reads
        if final or stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            meta = {
                "stage": stage,
                "step": step,
                "of": total,
                "train_seconds": round(train_seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
                **guard.meta(),
                **(extra_meta(offset + step) if extra_meta is not None else {}),
            }
            ckpt.save(offset + step, tree(state), meta, force=True)
            last_saved = offset + step
        ckpt.seal_finished()  # an async save that finished since is sealed (resumable)
        if stopping and not final:
            ckpt.wait()
            raise Preempted(
                f"stopped during {STAGE_WORDS[stage]} after step {step}/{total}; checkpoint saved; re-run the same command to resume"
            )
        if ended:
            break
    return state
