"""A tiny end-to-end task for the trainer: a random model, task files and config overrides.

Six new tokens ``<i_0>`` .. ``<i_5>``, each with a short description; a fine-tuning file
that asks which token follows which (24 lines), an eval file (6 lines) and a candidates
file. :func:`make_tiny_task` writes them with a tiny random Hugging Face model and returns
the dotted ``key=value`` overrides of ``python -m gti_jax.train`` (``run_dir`` left to the
caller), so a whole run (ground 6 + SFT 6 steps, evaluation, export) takes seconds on CPU.

Example:
    >>> task = make_tiny_task(tmp_path)  # doctest: +SKIP
    >>> cfg = load_config(None, task.args + [f"run_dir={tmp_path / 'run'}"])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.hf_models import make_tiny_hf_model

__all__ = [
    "NAMES",
    "REPO",
    "SETTINGS",
    "TOKENS",
    "TinyTask",
    "capture_export",
    "make_tiny_task",
    "results_without_timing",
    "sha256",
    "train_command",
    "train_env",
]

REPO = Path(__file__).resolve().parents[2]
TOKENS = [f"<i_{i}>" for i in range(6)]
NAMES = ["red apple", "green pear", "blue berry", "yellow banana", "orange fruit", "purple grape"]
# every run of the tiny task: small batches, a short beam search, frequent checkpoints
SETTINGS = (
    "ground.lr=0.01",
    "ground.batch_size=4",
    "sft.batch_size=4",
    "eval.beams=6",
    "eval.k=[1,3]",
    "eval.max_new_tokens=4",
    "checkpoint.every=2",
    "log_every=2",
    "pad_to_multiple_of=8",
    # matplotlib is seconds per stage; the tests that look at the figures turn it back on
    "log.plots=false",
)


@dataclass(frozen=True)
class TinyTask:
    """The files of a tiny task and the overrides that run it.

    Attributes:
        root: the directory holding every file.
        model: the tiny Hugging Face checkpoint directory.
        tokens, sft, eval, candidates: the data files.
        args: ``key=value`` overrides for the trainer (everything but ``run_dir``).
    """

    root: Path
    model: Path
    tokens: Path
    sft: Path
    eval: Path
    candidates: Path
    args: list[str]

    def with_args(self, *extra: str) -> list[str]:
        """`args` with `extra` overrides appended (later ones win)."""
        return [*self.args, *extra]

    def stage_args(
        self, *, ground: int = 0, sft: int = 0, eval_: bool = False, candidates: bool = False
    ) -> list[str]:
        """Overrides that run only the stages asked for: `ground` and `sft` steps (0: the
        stage is skipped, and without sft no fine-tuning file is given), evaluation on the
        eval file (`eval_`) with constrained decoding (`candidates`); extension and export
        always run. The same settings as `args` otherwise."""
        args = [f"model={self.model}", f"data.tokens={self.tokens}"]
        args += [f"ground.steps={ground}", f"sft.steps={sft}", *SETTINGS]
        if sft:
            args.append(f"data.sft={self.sft}")
        if eval_:
            args.append(f"data.eval={self.eval}")
        if candidates:
            args.append(f"data.candidates={self.candidates}")
        return args


def _write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def make_tiny_task(root: str | os.PathLike, *, family: str = "qwen3") -> TinyTask:
    """Writes the tiny model and task files under `root`.

    Args:
        root: an existing directory.
        family: the tiny model family (see `tests.helpers.hf_models`).

    Returns:
        The :class:`TinyTask`.
    """
    root = Path(root)
    model = make_tiny_hf_model(root, family)
    tokens = _write_jsonl(
        root / "tokens.jsonl",
        ({"token": t, "description": n} for t, n in zip(TOKENS, NAMES, strict=True)),
    )
    sft = _write_jsonl(
        root / "sft.jsonl",
        (
            {"prompt": f"after {TOKENS[i % 6]} comes", "completion": TOKENS[(i + 1) % 6]}
            for i in range(24)
        ),
    )
    eval_ = _write_jsonl(
        root / "eval.jsonl",
        (
            {"prompt": f"after {TOKENS[i]} comes", "completion": TOKENS[(i + 1) % 6]}
            for i in range(6)
        ),
    )
    candidates = root / "cands.txt"
    candidates.write_text("\n".join(TOKENS) + "\n")
    args = [
        f"model={model}",
        f"data.tokens={tokens}",
        f"data.sft={sft}",
        f"data.eval={eval_}",
        f"data.candidates={candidates}",
        "ground.steps=6",
        "sft.steps=6",
        *SETTINGS,
    ]
    return TinyTask(root, model, tokens, sft, eval_, candidates, args)


def train_command(*args: str) -> list[str]:
    """The command line of ``python -m gti_jax.train`` with `args`."""
    return [sys.executable, "-m", "gti_jax.train", *args]


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a trainer subprocess: this one's, the repo on the path, `extra`."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def results_without_timing(run_dir: str | os.PathLike) -> dict:
    """``run_dir/results.json`` without its wall-clock entry (the part a rerun reproduces)."""
    r = json.loads((Path(run_dir) / "results.json").read_text())
    r.pop("wall_seconds", None)
    return r


def capture_export(monkeypatch) -> dict:
    """Records the model the trainer hands to the export (its final in-memory model) under
    the key "model" of the returned dict."""
    import gti_jax.models as models

    seen = {}
    real = models.export_hf_dir

    def export(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(models, "export_hf_dir", export)
    return seen
