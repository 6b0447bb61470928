"""Validation during fine-tuning (``eval.every``), the best checkpoint, early stopping.

Every ``eval.every`` fine-tuning steps and at the last one, the model is evaluated on a
fixed sample of ``data.valid`` (the Evaluator built by :func:`gti_jax.train.inputs.read_inputs`):
teacher-forced loss, and Recall@K / NDCG@K by constrained beam search when there are
candidates. Each validation is a ``metrics.jsonl`` row ``{"stage": "valid", "step",
"loss", "recall@K", ...}``, so it reaches the loss plot and whatever reads the metrics.

With ``checkpoint.best``, a validation that improves ``checkpoint.best_metric`` saves the
fine-tuned state (the trainable parameters, without optimizer state) in
``<checkpoint dir>/best``, a directory of its own that ``checkpoint.keep`` never touches;
``eval.use_best`` restores it at the end of the stage, so the final evaluation, the
diagnostics and the export see the best model. ``sft.early_stop_patience`` ends the stage
after that many validations in a row without improvement (the stage's last checkpoint is
written at that step).

The state (best step and value, validations without improvement, whether the stage stopped
early) is kept in every checkpoint's meta, so a resumed run decides exactly as an
uninterrupted one. A best checkpoint is deleted only when no kept checkpoint of the run
names it and it is not the current best, so resuming from any kept checkpoint finds the
best that checkpoint recorded.
"""

from __future__ import annotations

import math
import time
from typing import Any

from gti_jax.train.checkpoint import Checkpointer
from gti_jax.train.config import best_metric_mode
from gti_jax.train.loop import StageContext, log_line

__all__ = ["Validation"]

_BEST_DIR = "best"
_KEEP_ALL = 2**30  # the best directory's retention is decided here, not by orbax


class Validation:
    """``eval.every`` for one fine-tuning stage (see the module docstring).

    Args:
      ctx: the stage context (``ctx.validator`` is the validation Evaluator, or None).
      step_fn: the stage's compiled step (``merge(state)`` gives the model).
      meta: the meta of the checkpoint the stage resumes from (None: a fresh stage).
    """

    def __init__(self, ctx: StageContext, step_fn, meta: dict | None):
        cfg = ctx.cfg
        self.ctx, self.step_fn = ctx, step_fn
        self.every = cfg.eval.every if ctx.validator is not None else 0
        self.metric, self.mode = best_metric_mode(cfg.checkpoint.best_metric, cfg.eval.k)
        self.patience = cfg.sft.early_stop_patience
        state = dict((meta or {}).get("valid", {}))
        self.best_step: int | None = state.get("best_step")
        self.best_value: float | None = state.get("best_value")
        self.bad = int(state.get("bad_evals", 0))
        self.stopped_early = bool(state.get("stopped_early", False))
        self.offset = cfg.ground.steps  # checkpoint steps are global
        self.best_ckpt = None
        self.named: dict[int, int | None] = {}  # kept checkpoint step -> the best it names
        self.last_saved: int | None = None  # the newest checkpoint (maybe still being written)
        if self.every and cfg.checkpoint.best:
            directory = f"{ctx.ckpt.directory}/{_BEST_DIR}"
            self.best_ckpt = Checkpointer(
                directory, keep=_KEEP_ALL, async_save=cfg.checkpoint.async_save
            )
            for step in ctx.ckpt.all_steps():
                m = ctx.ckpt.read_meta(step) or {}
                if m.get("stage") == "sft":
                    self.named[step] = m.get("valid", {}).get("best_step")
            self._prune()

    def meta(self, global_step: int) -> dict[str, Any]:
        """What a checkpoint at `global_step` records (the state a resume continues from)."""
        if not self.every:
            return {}
        self._prune()  # what the keep policy deleted since the last save names no best now
        self.named[global_step] = self.best_step
        self.last_saved = global_step
        state = {"best_step": self.best_step, "best_value": self.best_value}
        state.update(bad_evals=self.bad, stopped_early=self.stopped_early)
        return {"valid": state}

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if self.mode == "min" else value > self.best_value

    def _measure(self, model) -> dict[str, float]:
        """Every process validates the sharded model (its collectives need them all) and gets
        the same numbers, as the final evaluation does."""
        ev, names = self.ctx.validator, ["loss"]
        names += [f"{kind}@{k}" for kind in ("recall", "ndcg") for k in ev.ks]
        found = {"loss": ev.loss(model)["eval_loss"]}
        if ev.trie is not None:
            found.update(ev.retrieval(model)[0])
        return {n: float(found[n]) for n in names if n in found}

    def after_step(self, st, step, batcher, train_seconds, cpu_seconds) -> bool:
        """Validates at the steps ``eval.every`` names; True ends the stage (early stop)."""
        total = self.ctx.cfg.sft.steps
        if not self.every or (step % self.every and step != total):
            return False
        t0 = time.perf_counter()
        found = self._measure(self.step_fn.merge(st))  # every process
        if self.metric not in found:
            raise ValueError(
                f"checkpoint.best_metric={self.metric} needs candidates to rank: give "
                "data.candidates, or use checkpoint.best_metric=valid_loss"
            )
        value = found[self.metric]
        improved = self._improves(value)
        if improved:
            self.best_step, self.best_value, self.bad = step, value, 0
            if self.best_ckpt is not None:
                self.best_ckpt.save(
                    self.offset + step,
                    {"trainable": st.trainable},
                    {"stage": "sft", "step": step, "metric": self.metric, "value": value},
                    force=True,
                )
                self._prune()
        else:
            self.bad += 1
        seconds = round(time.perf_counter() - t0, 2)
        n = len(self.ctx.validator.examples)
        row = {"stage": "valid", "step": step, **found, "num_valid": n, "eval_seconds": seconds}
        self.ctx.log.metrics({**row, "best_step": self.best_step, "best": self.best_value})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in found.items())
        best = f"{self.metric} {self.best_value:.4f} at step {self.best_step}"
        if self.best_value is None:  # no finite value yet
            best = f"{self.metric}: none yet"
        log_line(
            f"validation at step {step}/{total} ({n} examples, {seconds:.1f}s): {shown}; best {best}"
        )
        if self.patience and self.bad >= self.patience and step < total:
            self.stopped_early = True
            log_line(
                f"early stop at step {step}: {self.bad} validations in a row without a better "
                f"{self.metric} (best {best})"
            )
        return self.stopped_early

    def _prune(self) -> None:
        """Deletes the best checkpoints no kept checkpoint names and that are not the best."""
        if self.best_ckpt is None:
            return
        kept = set(self.ctx.ckpt.all_steps()) | {self.last_saved}
        self.named = {s: b for s, b in self.named.items() if s in kept}
        names = {self.offset + b for b in self.named.values() if b is not None}
        if self.best_step is not None:
            names.add(self.offset + self.best_step)
        for step in self.best_ckpt.all_steps():
            if step not in names:
                self.best_ckpt.delete(step)

    def restore_best(self, st):
        """With ``eval.use_best``: the stage state with the best trainable parameters."""
        cfg = self.ctx.cfg
        if not (cfg.eval.use_best and self.best_ckpt is not None and self.best_step is not None):
            return st
        restored, meta = self.best_ckpt.restore(
            self.offset + self.best_step, target={"trainable": st.trainable}
        )
        log_line(
            f"eval.use_best: the model of step {meta['step']} ({self.metric} "
            f"{meta['value']:.4f}) is evaluated and exported"
        )
        return st._replace(trainable=restored["trainable"])

    def record(self) -> dict[str, Any]:
        """What ``stages.json`` and ``results.json`` say about validation."""
        if not self.every:
            return {}
        out = {"metric": self.metric, "step": self.best_step, "value": self.best_value}
        out["used"] = bool(self.ctx.cfg.eval.use_best and self.best_ckpt is not None)
        if self.stopped_early:
            out["stopped_early"] = True
        return {"best": out}

    def close(self) -> None:
        if self.best_ckpt is not None:
            self.ctx.ckpt.wait()  # the keep policy has run: prune by what stays
            self._prune()
            self.best_ckpt.close()
