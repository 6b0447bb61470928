"""The whole run: the recommendation front end (when no ``data.*`` files are given), then the
trainer. ``python -m gti_jax.train`` runs :func:`run` on :func:`parse_cli`'s config.

The front end (:mod:`gti_jax.rec.prepare`) is a producer of files; the trainer
(:mod:`gti_jax.train.run`) reads files and knows nothing of recommendation. This module is
where the two meet:

* :class:`RunConfig`: the trainer's :class:`~gti_jax.train.config.TrainConfig` plus the
  front end's ``rec`` section (:class:`~gti_jax.rec.config.RecConfig`): every key of
  ``python -m gti_jax.train --help``, the keys of ``run_dir/config.yaml``;
* :func:`run`: with ``data.tokens`` unset, the trainer checks everything (config, run
  directory, model) before it makes the run directory, then calls the front end with the
  loaded model to write ``run_dir/data`` (stage ``data``) and trains on those files.

Example:
  >>> cfg = load_config(None, ["rec.levels=2", "sft.steps=10"])
  >>> cfg.rec.levels, cfg.sft.steps
  (2, 10)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from gti_jax import config as engine
from gti_jax.errors import ConfigError
from gti_jax.rec.config import RecConfig, check_rec
from gti_jax.rec.prepare import prepare
from gti_jax.rec.semantic_ids import load_semantic_ids
from gti_jax.train import run as trainer
from gti_jax.train.config import HELP_HEADER, TrainConfig, check_train
from gti_jax.train.inputs import DataFiles

__all__ = [
    "ConfigError",
    "RunConfig",
    "check_run",
    "config_help",
    "config_to_dict",
    "load_config",
    "parse_cli",
    "prepared_data",
    "run",
    "save_config",
]


@dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A whole run: prepare data -> extend -> initialize -> ground -> fine-tune -> evaluate
    -> export."""

    rec: RecConfig = field(default_factory=RecConfig)
    """The recommendation data preparation (used when data.tokens is unset)."""


def check_run(cfg: RunConfig) -> None:
    """The trainer's checks, then the front end's (one ConfigError line each)."""
    check_train(cfg)
    check_rec(cfg.rec)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-ready values of a config (see :func:`gti_jax.config.to_dict`)."""
    return engine.to_dict(cfg)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Builds a checked :class:`RunConfig` from defaults, a YAML file and dotted overrides.

    Raises:
      ConfigError: one line naming the bad key or value and the fix.

    Example:
      >>> load_config(None, []) == RunConfig()
      True
    """
    return engine.load(RunConfig, path, overrides, validate=check_run)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes `cfg` as YAML, atomically."""
    engine.save(cfg, path)


def config_help() -> str:
    """Every key of a whole run with its type, default and documentation.

    Example:
      >>> "rec.levels (int, default 3)" in config_help()
      True
    """
    return engine.help_text(RunConfig, HELP_HEADER)


def parse_cli(argv: Sequence[str]) -> RunConfig:
    """Parses ``[--config FILE|NAME] [--help] [--print-config] [key=value | --key value
    ...]`` into a :class:`RunConfig` (:func:`gti_jax.config.parse_cli`).

    Raises:
      SystemExit: with code 0 after printing :func:`config_help` for ``-h``/``--help``, or
        the resolved config as YAML for ``--print-config``.
      ConfigError: a bad option, key or value (one line).
    """
    return engine.parse_cli(RunConfig, argv, help=config_help, validate=check_run)


def prepared_data(cfg: RunConfig):
    """The trainer's ``make_data`` for `cfg`: :func:`gti_jax.rec.prepare.prepare` into the
    run's ``data`` directory with the loaded model (a resumed run reuses what it wrote)."""

    def make_data(out_dir: Path, model: Any, tokenizer: Any) -> DataFiles:
        if jax.process_index() == 0:
            print(
                f"[gti_jax.train] no data.* files given: preparing {cfg.rec.dataset} with "
                f"semantic IDs into {out_dir}",
                file=sys.stderr,
                flush=True,
            )
        paths = prepare(cfg, out_dir, model=model, tokenizer=tokenizer)
        sids = paths.get("semantic_ids")
        return DataFiles(
            tokens=Path(paths["tokens"]),
            pairs=Path(paths["pairs"]),
            sft=Path(paths["sft"]),
            eval=Path(paths["test"]),
            valid=Path(paths["valid"]),
            candidates=Path(paths["candidates"]),
            aux=Path(paths["aux"]) if paths.get("aux") else None,
            semantic_ids=Path(sids) if sids else None,
            codebooks=load_semantic_ids(sids) if sids else None,
        )

    return make_data


def run(cfg: RunConfig) -> dict[str, Any]:
    """Runs the whole of `cfg`: the front end when ``data.tokens`` is unset, then training.

    Returns, raises and resumes as :func:`gti_jax.train.run.run` (whose errors it passes on).
    """
    if cfg.data.tokens is not None:
        return trainer.run(cfg)
    return trainer.run(cfg, make_data=prepared_data(cfg))
