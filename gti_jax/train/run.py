"""The training run: load -> extend -> initialize -> ground (GTI) -> fine-tune -> evaluate -> export.

Each stage is recorded in the run directory (``stages.json``). Loading, extending and
initializing are deterministic given the config, so a resumed run recomputes them and
restores only what training changed from the last checkpoint: the grounded rows and their
optimizer state, or the fine-tuned parameters and theirs. Batches are a pure function of
``(seed, step)`` and so are dropout keys, so a resumed run ends with the same parameters
and results as an uninterrupted one.

Every output is written to a temporary name and renamed into place (checkpoints, JSON files,
the grounded rows, the export), so a killed run never leaves a half-written file that a
resumed run or a reader would take as complete. A step whose loss or gradient is not finite
is never applied: ``nan_policy=stop`` ends the run (exit 1), ``nan_policy=skip`` goes on
(at most ``max_skipped_steps`` times per stage) and counts the skipped steps.

Run directory::

    config.yaml        the resolved config
    stages.json        finished stages and their timings
    metrics.jsonl      {"stage", "step", "loss", "lr", "grad_norm", "tokens_per_s"} per log step
    checkpoints/       orbax checkpoints (grounding and fine-tuning steps)
    checkpoints/best/  with checkpoint.best: the best validated fine-tuning state
    data/              files made by the recommendation front end (when data.* are unset)
    new_tokens.json    the new tokens, their ids, the semantic-ID codebooks
    grounded_rows.safetensors   the grounded rows alone, to apply to another copy of the model
    diagnostics.json, diagnostics/, *.png    effective rank, spectra, cosine structure per stage
    loss.png           loss curves
    results.json       evaluation
    export/            a Hugging Face checkpoint directory
    error.log          the traceback of each stage that failed (re-running resumes)

Bad input (a :class:`~gti_jax.errors.BadInput`) is found before the run directory is made,
so it leaves nothing behind. Once the directory exists nothing in it is removed on failure.

This module checks the set-up and composes the stages; the data files are read and checked
by :mod:`gti_jax.train.inputs`, and the stages themselves are
:func:`gti_jax.train.ground.ground_stage` and :func:`gti_jax.train.sft.sft_stage`, which run
:func:`gti_jax.train.loop.train_loop`. The trainer reads data files only: with ``data.*``
unset, ``make_data`` (given by :mod:`gti_jax.pipeline`: the recommendation front end) writes
them first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
import typing
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import yaml
from flax import nnx

from gti_jax import diagnose, models
from gti_jax.config import walk_keys
from gti_jax.errors import BadInput, GtiError, RunFailed
from gti_jax.models.hf import CheckpointMismatchError
from gti_jax.models.sharding import logical_to_spec, make_mesh
from gti_jax.models.source import (
    ModelSourceError,
    resolve_source,
    source_dtype,
    source_generation_config,
)
from gti_jax.train.checkpoint import Checkpointer, NoVerifiedCheckpointError
from gti_jax.train.config import TrainConfig, config_to_dict, save_config
from gti_jax.train.ground import ground_stage
from gti_jax.train.inputs import (
    DataFiles,
    Inputs,
    MakeData,
    TrainError,
    apply_init_rows,
    codebook_vectors,
    given_files,
    read_inputs,
)
from gti_jax.train.loop import (
    PREEMPTED_EXIT_CODE,
    NonFiniteError,
    Preempted,
    StageContext,
    StopFlag,
    barrier,
    host,
    log_line,
)
from gti_jax.train.runlog import RunLog, atomic_write_json
from gti_jax.train.sft import sft_stage
from gti_jax.train.tracking import Tracker, check_tracking
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab

__all__ = [
    "DataFiles",
    "MakeData",
    "run",
    "TrainError",
    "NonFiniteError",
    "StageFailed",
    "Preempted",
    "PREEMPTED_EXIT_CODE",
]


class StageFailed(RunFailed):
    """A stage of a started run raised; the traceback is in ``run_dir/error.log``.

    Attributes:
      stage: the stage that failed (``start``, ``load``, ``data``, ``extend``, ``ground``,
        ``sft``, ``evaluate``, ``export``).
      log_path: the file holding the traceback, or None when it could not be written.
    """

    def __init__(self, message: str, *, stage: str, log_path: Path | None):
        super().__init__(message)
        self.stage, self.log_path = stage, log_path


# --------------------------------------------------------------------------------------------
# Set-up.
# --------------------------------------------------------------------------------------------


def _init_distributed(cfg: TrainConfig) -> None:
    d = cfg.distributed
    if not d.enabled:
        return
    if jax.distributed.is_initialized():
        return
    # CPU processes need a collectives library for cross-process reductions; set before the
    # backend starts (it only affects the CPU client, so it is harmless on TPU/GPU hosts)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if d.coordinator:
        kwargs.update(coordinator_address=d.coordinator)
    if d.num_processes is not None:
        kwargs.update(num_processes=d.num_processes)
    if d.process_id is not None:
        kwargs.update(process_id=d.process_id)
    jax.distributed.initialize(**kwargs)


# What a failed start may leave in a run directory that holds no run yet.
_LEFT_BY_A_FAILED_START = ("data", "error.log")


def _check_run_dir(cfg: TrainConfig) -> Path:
    """Checks that ``run_dir`` can hold this run, without creating or changing anything."""
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"run_dir {run_dir} is a file; choose a writable run_dir directory")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(
            f"run_dir {run_dir}: cannot create it ({existing} is not a directory); choose a "
            "writable run_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(
            f"run_dir {run_dir}: {existing} is not writable; choose a writable run_dir"
        )
    saved = run_dir / "config.yaml"
    whole = _mapping_keys(cfg)
    resolved = _comparable(config_to_dict(cfg), whole)
    if saved.is_file():
        before = _comparable(yaml.safe_load(saved.read_text()) or {}, whole)
        # A key the saved config lacks was added to gti_jax after that run started; the
        # run behaved as its default does, so the default resumes it.
        try:
            defaults = _comparable(config_to_dict(type(cfg)()), whole)
        except TypeError:  # a schema with required fields has no default config
            defaults = {}
        for key in set(resolved) - set(before):
            if key in defaults and resolved[key] == defaults[key]:
                before[key] = resolved[key]
        if not cfg.resume:
            raise TrainError(
                f"run_dir {run_dir} already holds a run; remove it, choose another run_dir, or set resume=true to continue it"
            )
        if before != resolved:
            diff = sorted(
                k for k in set(before) | set(resolved) if before.get(k) != resolved.get(k)
            )
            raise TrainError(
                f"run_dir {run_dir} holds a run with a different config (differs in {', '.join(diff[:5])}); "
                "use a new run_dir to start another run, or the same config to resume"
            )
    elif (
        run_dir.is_dir()
        and not cfg.resume
        and any(p.name not in _LEFT_BY_A_FAILED_START for p in run_dir.iterdir())
    ):
        raise TrainError(f"run_dir {run_dir} is not empty; choose an empty or new run_dir")
    return run_dir


def _make_run_dir(run_dir: Path) -> None:
    """Creates ``run_dir`` (every check passed); the last step that may raise bad input."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(
            f"run_dir {run_dir}: cannot create it ({e.strerror}); choose a writable run_dir"
        ) from None


def _write_config(cfg: TrainConfig, run_dir: Path) -> None:
    # every process has checked the directory before process 0 writes into it
    barrier("gti_jax.train: run_dir checked")
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")
    barrier("gti_jax.train: run_dir ready")


# Keys that may change between a run and its resumption without changing its results.
_RESUME_FREE = (
    "resume",
    "log_every",
    # evaluation reads the model, never changes it: a resumed run may evaluate differently
    "eval.curve_every",
    "eval.batch_size",
    "eval.beam_batch_size",
    "eval.exact_match",
    "checkpoint.keep",
    "checkpoint.async_save",
    "checkpoint.every",
    # a run stopped by a non-finite step may be resumed with nan_policy=skip: the optimizer
    # state has the same structure under both policies
    "nan_policy",
    "max_skipped_steps",
    # a run may resume on another mesh or number of hosts: checkpoints restore onto any
    # sharding (the numbers then differ only by the order of floating-point reductions)
    "mesh.shape",
    "mesh.rules",
    "distributed.enabled",
    "distributed.coordinator",
    "distributed.num_processes",
    "distributed.process_id",
    # tracking only reports what the run computes
    "log.tensorboard",
    "log.wandb.project",
    "log.wandb.entity",
    "log.wandb.name",
    "log.wandb.tags",
    "log.plots",
)


def _mapping_keys(cfg) -> frozenset[str]:
    """The dotted keys of `cfg`'s schema whose values are mappings (compared whole)."""
    return frozenset(key for key, tp, *_ in walk_keys(type(cfg)) if typing.get_origin(tp) is dict)


def _comparable(d: dict, whole: frozenset[str], prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in whole:
            flat.update(_comparable(v, whole, key + "."))
        elif key not in _RESUME_FREE:
            flat[key] = json.loads(json.dumps(v, default=str))
    return flat


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


def _check_model(name: str) -> None:
    """A model that does not resolve (HF directory, .gguf file or alias) is bad input."""
    try:
        resolve_source(name, label=f"model={name}")
    except ModelSourceError as e:
        raise TrainError(str(e)) from None


class _ExportPlan(NamedTuple):
    """How the export writes: the weights' dtype and the generation config to keep."""

    dtype: str
    generation_config: dict | bool


def _export_plan(cfg: TrainConfig) -> _ExportPlan:
    """``export.dtype`` resolved (auto: the source checkpoint's) and the source's
    ``generation_config.json`` (True: none, write the token ids alone); read before the run
    starts, so a malformed file is bad input instead of a failed export."""
    source = resolve_source(cfg.model)
    dtype = source_dtype(source) if cfg.export.dtype == "auto" else cfg.export.dtype
    try:
        gen = source_generation_config(source)
    except BadInput as e:
        raise TrainError(f"model={cfg.model}: {e}") from None
    return _ExportPlan(dtype, True if gen is None else gen)


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def _mesh(cfg: TrainConfig):
    shape = dict(cfg.mesh.shape)
    if all(v == 1 for v in shape.values()) and jax.process_count() == 1:
        return None  # one device: plain jit, no sharding machinery
    return make_mesh(shape)


def _check_batch_fits(cfg: TrainConfig, mesh, rules) -> None:
    """Each stage's batch (and each micro-batch) must split evenly over the batch shards."""
    if mesh is None:
        return
    spec = logical_to_spec(("batch", "seq"), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    shards = math.prod(mesh.shape[a] for a in axes)
    for name, stage in (("ground", cfg.ground), ("sft", cfg.sft)):
        if stage.steps > 0 and (stage.batch_size // stage.grad_accum) % shards:
            raise TrainError(
                f"{name}.batch_size={stage.batch_size} (grad_accum={stage.grad_accum}) does not "
                f"split over the {shards} batch shards of mesh.shape={dict(mesh.shape)} "
                f"(axes {', '.join(axes)}); make {name}.batch_size / {name}.grad_accum a "
                f"multiple of {shards}, or shrink those mesh axes"
            )


def run(cfg: TrainConfig, *, make_data: MakeData | None = None) -> dict[str, Any]:
    """Runs every stage of ``cfg`` (resuming from ``cfg.run_dir`` when it holds a run).

    Every input is checked first, before the run directory is made: the run directory, the
    model (loaded), every data file (existence, UTF-8, form, non-empty), the new tokens and
    the examples they make. After that nothing the run writes is ever removed, whatever
    fails: an unexpected error is recorded in ``run_dir/error.log`` and re-running the same
    command resumes.

    Any combination of stages runs: ``ground.steps=0`` and ``sft.steps=0`` evaluate (or only
    export) the extended, initialized model.

    Args:
      cfg: the config (a :class:`TrainConfig`, or a whole run's
        :class:`gti_jax.pipeline.RunConfig`; ``run_dir/config.yaml`` records all of it).
      make_data: with ``data.tokens`` unset, makes the data files in ``run_dir/data`` with
        the loaded model, after every check (stage ``data``); :mod:`gti_jax.pipeline` passes
        the recommendation front end.

    Returns:
      The evaluation results (also written to ``run_dir/results.json``).

    Raises:
      TrainError: bad input (a ``BadInput``), found before the run directory was made.
      NonFiniteError: a non-finite loss or gradient under ``nan_policy=stop``, or more than
        ``max_skipped_steps`` of them under ``nan_policy=skip``; the update was not applied
        and the last good checkpoint is kept.
      StageFailed: any other error once the run started (a full disk, a bug); its message
        names the stage and the traceback file; everything written so far is kept.
      Preempted: SIGTERM arrived; a checkpoint was written; re-run to resume.

    On several processes (``distributed.enabled``) every process calls it with the same
    config; process 0 alone writes files, evaluates and exports.
    """
    t_run = time.perf_counter()
    _init_distributed(cfg)
    # Everything checkable is checked before the run directory exists: a BadInput from here
    # on leaves nothing behind.
    given = given_files(cfg, make_data)
    _check_model(cfg.model)
    check_tracking(cfg.log)
    export = _export_plan(cfg)
    mesh = _mesh(cfg)
    rules = dict(cfg.mesh.rules)
    _check_batch_fits(cfg, mesh, rules)
    run_dir = _check_run_dir(cfg)
    t0 = time.perf_counter()
    model, tokenizer = _load(cfg, mesh, rules)
    load_seconds = time.perf_counter() - t0
    inputs = read_inputs(cfg, given, model, tokenizer) if given is not None else None
    _make_run_dir(run_dir)
    # From here on the run directory holds what the run made: nothing is removed on failure.
    where = _Where()
    try:
        _write_config(cfg, run_dir)
        return _run(
            cfg,
            run_dir,
            where,
            model,
            tokenizer,
            load_seconds,
            make_data,
            inputs,
            mesh,
            rules,
            t_run,
            export,
        )
    except (Preempted, NonFiniteError, NoVerifiedCheckpointError):
        raise  # said in one line already; nothing to add to error.log
    except Exception as e:  # noqa: BLE001 - any failure: keep everything, say where to look
        raise _stage_failed(run_dir, where.stage, e) from e


class _Where:
    """The stage a run is in (named in the error of a stage that fails)."""

    stage = "start"


def _stage_failed(run_dir: Path, stage: str, e: BaseException) -> StageFailed:
    """Appends the traceback of `e` to ``run_dir/error.log``; the one-line error to raise."""
    index = jax.process_index()
    path = run_dir / ("error.log" if index == 0 else f"error.{index}.log")
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = lines[0] if lines else "(no message)"
    if len(text) > 400:
        text = text[:400] + " ..."
    try:
        with open(path, "a", encoding="utf-8") as f:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            f.write(f"=== {stamp}: stage {stage} failed ===\n")
            f.write("".join(traceback.format_exception(e)))
        told, log_path = f"traceback in {path}", path
    except OSError as w:
        told, log_path = f"could not write the traceback to {path} ({w.strerror or w})", None
    return StageFailed(
        f"stage {stage} failed: {type(e).__name__}: {text}; {told}; fix the cause and re-run "
        "the same command to resume",
        stage=stage,
        log_path=log_path,
    )


def _load(cfg: TrainConfig, mesh, rules):
    """The model and its tokenizer; a checkpoint that does not load is bad input."""
    try:
        if mesh is not None:
            return models.load_pretrained(cfg.model, mesh=mesh, rules=rules)
        return models.load_pretrained(cfg.model)
    except CheckpointMismatchError as e:  # one line: the count and the first problems
        head, *problems = [x.strip() for x in str(e).splitlines() if x.strip()]
        if "contradicts its tensors" in head:  # config.json names the sizes it got wrong
            raise TrainError(f"model={cfg.model}: {head}") from None
        more = f"; ... {len(problems) - 3} more" if len(problems) > 3 else ""
        raise TrainError(
            f"model={cfg.model}: {head.rstrip(':')}: {'; '.join(problems[:3])}{more}; fix "
            "config.json or give the checkpoint its tensors belong to"
        ) from None
    except FileNotFoundError as e:
        if isinstance(e, GtiError):
            raise
        raise TrainError(f"model={cfg.model}: {e}") from None


def _run(
    cfg: TrainConfig,
    run_dir: Path,
    where: _Where,
    model,
    tokenizer,
    load_seconds: float,
    make_data: MakeData | None,
    inputs: Inputs | None,
    mesh,
    rules,
    t_run,
    export: _ExportPlan,
) -> dict[str, Any]:
    """The stages, in order, once the run directory exists (`where` names the current one)."""
    writer = jax.process_index() == 0
    tracker = Tracker(cfg.log, run_dir, config_to_dict(cfg)) if writer else None
    log = RunLog(run_dir, writer=writer, tracker=tracker)
    stop = StopFlag().install()

    # load (done before the run directory was made) ---------------------------------------
    where.stage = "load"
    tied = bool(model.config.tie_word_embeddings)
    log.finish("load", load_seconds, model=str(cfg.model), rows=int(model.num_rows), tied=tied)

    # data + extend + init --------------------------------------------------------------
    t0 = time.perf_counter()  # the extend stage's time includes making the data
    if inputs is None:  # no data.* files: make_data writes them into run_dir/data
        where.stage = "data"
        files = make_data(run_dir / "data", model, tokenizer)
        inputs = read_inputs(cfg, files, model, tokenizer)
    where.stage = "extend"
    model, token_info, record = _extend(cfg, run_dir, log, model, tokenizer, inputs, tied, t0)

    # ground + SFT -----------------------------------------------------------------------
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest, skipped = ckpt.newest_verified()  # damaged or unsealed newer ones set aside
    for step, why in skipped:
        log_line(f"checkpoint step {step} skipped: {why}")
    latest_meta = _peek_meta(ckpt, latest)
    ctx = StageContext(
        cfg,
        run_dir,
        ckpt,
        log,
        stop,
        mesh,
        rules,
        latest,
        latest_meta,
        inputs.evaluator,
        inputs.validator,
    )
    try:
        sft_started = latest_meta is not None and latest_meta.get("stage") == "sft"
        if cfg.ground.steps > 0 and not sft_started:
            where.stage = "ground"
            model = ground_stage(ctx, model, inputs.new_range, tied, inputs.ground, token_info)
            record("ground", model)
        if cfg.sft.steps > 0:
            where.stage = "sft"
            model = sft_stage(ctx, model, inputs.sft, inputs.sft_units)
            record("sft", model)
    finally:
        ckpt.wait()
        ckpt.close()

    # evaluate + export ------------------------------------------------------------------
    where.stage = "evaluate"
    # The model stays sharded where it is: every process evaluates it (each compiled call is
    # a collective) and takes part in each exported tensor's gather; process 0 writes.
    results = _evaluate(cfg, run_dir, log, model, inputs.evaluator, t_run)
    if cfg.export.hf:
        where.stage = "export"
        t0 = time.perf_counter()
        if writer:
            _remove_stale_temps(run_dir)
        models.export_hf_dir(
            model,
            None,
            tokenizer,
            run_dir / "export",
            overwrite=True,
            dtype=export.dtype,
            generation_config=export.generation_config,
            writer=writer,
        )
        log.finish(
            "export", time.perf_counter() - t0, path=str(run_dir / "export"), dtype=export.dtype
        )
    where.stage = "finish"
    barrier("gti_jax.train: done")  # no process leaves while process 0 still writes
    log_line(f"done: {json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)})}")
    log.close()
    return results


def _extend(cfg: TrainConfig, run_dir: Path, log: RunLog, model, tokenizer, inputs, tied, t0):
    """Resizes the tables to the extended tokenizer and initializes the new rows (``init``);
    writes ``new_tokens.json`` and the ``init`` diagnostics.

    Returns:
      ``(model, token_info, record)``: ``record(stage, model)`` writes a stage's diagnostics.
    """
    writer = jax.process_index() == 0
    files, to_add, new_range = inputs.files, inputs.to_add, inputs.new_range
    num_tokens = inputs.num_tokens
    graphdef, state = nnx.split(model)
    state = resize_vocab(
        state,
        EmbeddingSpec.nnx_llama(tied=tied),
        len(tokenizer),
        cfg.init,
        jax.random.fold_in(jax.random.key(cfg.seed), 1),
        num_tokens=num_tokens,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        description_ids=inputs.desc_ids,
        init_kwargs=dict(cfg.init_kwargs),
    )
    model = apply_init_rows(nnx.merge(graphdef, state), inputs.init_rows)
    model.config = model.config.replace(vocab_size=int(model.num_rows))
    token_info = {
        "tokens": to_add,
        "new_ids": [new_range.start, new_range.stop],
        "num_tokens": len(tokenizer),
        "num_rows": int(model.num_rows),
        "codebook_dir": str(files.semantic_ids) if files.semantic_ids else None,
    }
    if writer:
        atomic_write_json(run_dir / "new_tokens.json", token_info)
    codebook = codebook_vectors(files, to_add)
    decode = lambda i: tokenizer.decode([int(i)])  # noqa: E731

    # the trackers plot each stage's diagnostics at the run's global step (others: the end)
    last = cfg.ground.steps + cfg.sft.steps
    at_step = {"init": 0, "ground": cfg.ground.steps, "sft": last}

    def record(stage, m):
        table = host(m.embed.embedding[...]).astype(np.float32)  # every process (collective)
        if writer:
            summary = diagnose.record_stage(
                run_dir,
                stage,
                table,
                new_range,
                codebook_vectors=codebook,
                decode=decode,
                old_ids=range(num_tokens),
                tokens=to_add,
                draw=cfg.log.plots,
            )
            top = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
            log.scalars("diagnostics", top, at_step.get(stage, last))

    if not log.done("extend"):
        record("init", model)
    log.finish(
        "extend",
        time.perf_counter() - t0,
        new_tokens=len(to_add),
        num_tokens=len(tokenizer),
        num_rows=int(model.num_rows),
        init=cfg.init,
    )
    return model, token_info, record


def _evaluate(cfg: TrainConfig, run_dir: Path, log: RunLog, model, evaluator, t_run):
    """Evaluates the final model where it is placed (every process; process 0 writes
    ``results.json``, ``eval_ranks.json`` and the loss curves)."""
    t0 = time.perf_counter()
    writer = jax.process_index() == 0
    n_eval = len(evaluator.examples)
    if writer and n_eval:
        log_line(f"evaluating {n_eval} examples: loss, greedy decoding, constrained beam search")
    results, ranks = evaluator(model)
    if writer and ranks:  # per-example ranks: paired tests between runs on the same users
        atomic_write_json(
            run_dir / "eval_ranks.json",
            {"targets": evaluator.targets, "ranks": ranks, "beams": cfg.eval.beams},
        )
    if cfg.nan_policy == "skip":
        results["skipped_steps"] = {
            s: int(log.stages.get(s, {}).get("skipped_steps", 0)) for s in ("ground", "sft")
        }
    if "best" in log.stages.get("sft", {}):  # eval.every: the best validation (and its use)
        results["best"] = log.stages["sft"]["best"]
    results["wall_seconds"] = round(time.perf_counter() - t_run, 1)
    if writer:
        atomic_write_json(run_dir / "results.json", results)
        log.scalars("eval", results, cfg.ground.steps + cfg.sft.steps)
        if cfg.log.plots and _has_metrics(run_dir):  # no training stage: no loss curve
            diagnose.plot_loss(run_dir)
    log.finish("evaluate", time.perf_counter() - t0)
    return results


def _has_metrics(run_dir: Path) -> bool:
    """Whether ``metrics.jsonl`` holds a line (a training stage logged a step)."""
    path = run_dir / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0


def _peek_meta(ckpt, step):
    if step is None:
        return None
    return ckpt.read_meta(step) if hasattr(ckpt, "read_meta") else None


def _remove_stale_temps(run_dir: Path) -> None:
    """Removes what an interrupted export left (its temporary and replaced directories)."""
    for stale in (*run_dir.glob(".export.tmp-*"), *run_dir.glob(".export.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Stages.
# --------------------------------------------------------------------------------------------
