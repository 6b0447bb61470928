"""What a run writes as it goes: stage records, metrics lines, progress, atomic JSON.

``run_dir/stages.json`` says which stages finished and how long they took;
``run_dir/metrics.jsonl`` holds one line per logged step
(``{"stage", "step", "loss", "lr", "grad_norm", "tokens_per_s"}``); the same numbers go to
the trackers (:mod:`gti_jax.train.tracking`: TensorBoard, W&B) when the config asks for
them. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from gti_jax.io.atomic import atomic_write

__all__ = ["atomic_write_json", "atomic_write_text", "RunLog", "Progress"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to ``path`` through a temporary file and a rename (never half-written)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunLog:
    """Stage records and metrics of one run directory.

    Args:
      run_dir: the run directory.
      writer: whether this process writes (process 0 on multi-host).
    """

    def __init__(self, run_dir: str | os.PathLike, *, writer: bool = True, tracker: Any = None):
        self.dir = Path(run_dir)
        self.writer = writer
        self.tracker = tracker  # a gti_jax.train.tracking.Tracker (process 0), or None
        self._stages_path = self.dir / "stages.json"
        self._metrics_path = self.dir / "metrics.jsonl"
        self.stages: dict[str, Any] = {}
        if self._stages_path.is_file():
            self.stages = json.loads(self._stages_path.read_text())

    def done(self, stage: str) -> bool:
        return bool(self.stages.get(stage, {}).get("done"))

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.stages[stage] = {"done": True, "seconds": round(seconds, 3), **info}
        if self.writer:
            atomic_write_json(self._stages_path, self.stages)
        print(f"[gti_jax.train] stage {stage} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    def truncate_metrics(self, stage: str, after_step: int) -> None:
        """Drops metric lines of ``stage`` past ``after_step`` (resuming re-logs them)."""
        if not (self.writer and self._metrics_path.is_file()):
            return
        keep = []
        for line in self._metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("stage") == stage and row.get("step", 0) > after_step:
                continue
            keep.append(json.dumps(row))
        text = "".join(k + "\n" for k in keep)
        atomic_write(self._metrics_path, lambda f: f.write(text))

    def metrics(self, row: dict[str, Any]) -> None:
        """Appends a training line (``stage``, ``step``, numbers) to ``metrics.jsonl`` and
        sends the same numbers to the trackers as ``<stage>/<name>`` at ``step``."""
        if not self.writer:
            return
        clean = {k: _clean(v) for k, v in row.items()}
        with open(self._metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        rest = {k: v for k, v in clean.items() if k not in ("stage", "step")}
        self.scalars(str(row["stage"]), rest, int(row["step"]))

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Sends the numbers of `values` (nested mappings flattened) to the trackers as
        ``<prefix>/<name>`` at `step`: evaluation results, diagnostics, validation."""
        if self.writer and self.tracker is not None:
            self.tracker.scalars(prefix, values, step)

    def close(self) -> None:
        """Flushes and closes the trackers."""
        if self.tracker is not None:
            self.tracker.close()


class Progress:
    """A one-line progress display: step, loss, tokens/s and ETA, on stderr.

    Redraws in place on a terminal and prints every ``every`` steps otherwise (CI logs).
    """

    def __init__(
        self, stage: str, total: int, *, start: int = 0, every: int = 10, enabled: bool = True
    ):
        self.stage, self.total, self.every, self.enabled = stage, total, max(every, 1), enabled
        self.start_step = start
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (
            f"[{self.stage}] step {step}/{self.total}  loss {loss:.4f}  "
            f"{tokens_per_s:,.0f} tok/s  elapsed {elapsed:.0f}s  ETA {eta:.0f}s"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
            if step == self.total:
                print(file=sys.stderr)
        elif step % self.every == 0 or step == self.total or done == 1:
            print(line, file=sys.stderr, flush=True)
