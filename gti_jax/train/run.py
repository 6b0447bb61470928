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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gti_jax.config import walk_keys
from gti_jax.errors import BadInput, GtiError, RunFailed
from gti_jax.train.checkpoint import NoVerifiedCheckpointError
from gti_jax.train.config import TrainConfig, config_to_dict, save_config
from gti_jax.train.runlog import Progress, RunLog, atomic_write_json, atomic_write_text

__all__ = [
    "run",
    "TrainError",
    "NonFiniteError",
    "StageFailed",
    "Preempted",
    "PREEMPTED_EXIT_CODE",
]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, re-run the same command to resume
_STOP_ENV = "GTI_JAX_STOP_AT_STEP"  # test hook: behave as if SIGTERM arrived after that step
# Test hook: global steps (comma-separated) whose batch gets a NaN loss mask.
_FAULT_ENV = "GTI_JAX_FAULT_AT_STEP"

_TEXT_TO_TOKEN = ("Which token stands for: {d}?", 'What is the token for "{d}"?')
_TOKEN_TO_TEXT = ("What does {t} stand for?", "Describe {t}.")


class TrainError(BadInput):
    """Bad input to a run (data, model, config, a run directory in the way), found before the
    run directory is made."""


class NonFiniteError(RunFailed):
    """A non-finite loss or gradient stopped the run (nan_policy=stop, or too many skips)."""


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


class Preempted(GtiError):
    """Raised after a requested stop (SIGTERM) once a checkpoint is safely written."""


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[gti_jax.train] {msg}", file=sys.stderr, flush=True)


class _StopFlag:
    """Set by SIGTERM (or the test hook); the loops check it after every step."""

    def __init__(self):
        self.requested = False
        env = os.environ.get(_STOP_ENV)
        self.at_step = int(env) if env else None

    def install(self):
        def handler(signum, frame):
            self.requested = True
            _log("SIGTERM received: saving a checkpoint and stopping after this step")

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
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


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
        import yaml

        before = _comparable(yaml.safe_load(saved.read_text()) or {}, whole)
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
    _barrier("gti_jax.train: run_dir checked")
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")
    _barrier("gti_jax.train: run_dir ready")


def _barrier(name: str) -> None:
    """Waits for every process (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _host(x) -> np.ndarray:
    """A numpy copy of an array, gathered from every process when it spans several.

    On a multi-process run every process must call it for the same arrays (a collective).
    """
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _host_model(model):
    """The model with every array gathered to host numpy (a collective on multi-process).

    Used to export, evaluate and diagnose a model whose arrays span several processes; on one
    process the model is returned as it is.
    """
    if jax.process_count() == 1:
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(_host(x)), state))


# Keys that may change between a run and its resumption without changing its results.
_RESUME_FREE = (
    "resume",
    "log_every",
    # evaluation reads the model, never changes it: a resumed run may evaluate differently
    "eval.curve_every",
    "eval.batch_size",
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


@dataclasses.dataclass
class DataFiles:
    """The files a run reads (``data.*``, or those a data producer made).

    Attributes:
      tokens, pairs, sft, eval, candidates: the ``data.*`` files (None: unset).
      aux: auxiliary pairs for ``sft.aux_pairs_ratio`` (None: drawn from the pairs).
      semantic_ids: the directory of the tokens' semantic IDs, recorded in
        ``new_tokens.json`` (None: the tokens are not semantic IDs).
      codebooks: the loaded semantic IDs (anything with ``codebooks``, see
        :func:`gti_jax.diagnose.token_codebook_vectors`), for the RSA diagnostics. The
        producer that wrote the files passes them in already read: the trainer reads only
        the generic data files, never a front end's own formats.
    """

    tokens: Path
    pairs: Path | None
    sft: Path | None
    eval: Path | None
    candidates: Path | None
    aux: Path | None = None
    semantic_ids: Path | None = None
    codebooks: Any = None


#: ``make_data(out_dir, model, tokenizer) -> DataFiles``: writes a run's data files into
#: ``out_dir`` (``run_dir/data``) when no ``data.*`` files are given, after every check.
MakeData = Callable[[Path, Any, Any], DataFiles]


def _given_files(cfg: TrainConfig, make_data: MakeData | None) -> DataFiles | None:
    """The data files named in ``data.*`` (checked to exist), or None when `make_data` will
    make them."""
    d = cfg.data
    if d.tokens is None:
        if any(x is not None for x in (d.pairs, d.sft, d.eval, d.candidates)):
            raise TrainError(
                "data.tokens is unset but other data.* files are set; give data.tokens too, or unset all data.* to use the built-in recommendation data (rec.*)"
            )
        if make_data is None:
            raise TrainError(
                "data.tokens is unset; give the data.* files, or run the whole pipeline "
                "(python -m gti_jax.train, gti_jax.pipeline.run) to prepare the built-in "
                "recommendation data (rec.*)"
            )
        return None
    files = DataFiles(
        tokens=Path(d.tokens),
        pairs=Path(d.pairs) if d.pairs else None,
        sft=Path(d.sft) if d.sft else None,
        eval=Path(d.eval) if d.eval else None,
        candidates=Path(d.candidates) if d.candidates else None,
    )
    missing = [
        f"data.{k}={p}"
        for k in ("tokens", "pairs", "sft", "eval", "candidates")
        if (p := getattr(files, k)) is not None and not Path(p).is_file()
    ]
    if missing:
        raise TrainError(f"missing data file(s): {', '.join(missing)}; fix the paths")
    return files


def _check_model(name: str) -> None:
    p = Path(name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TrainError(
                f"model={name}: the directory has no config.json; give a Hugging Face checkpoint directory, a .gguf file or an alias"
            )
        return
    if p.suffix == ".gguf":
        if not p.is_file():
            raise TrainError(f"model={name}: no such .gguf file")
        return
    from gti_jax.models.gguf import ALIASES, resolve_alias

    if resolve_alias(name) is None:
        raise TrainError(
            f"model={name}: not a checkpoint directory, a .gguf file or an alias ({', '.join(ALIASES)})"
        )


def pairs_from_descriptions(entries, directions, seed: int):
    """Paired text <-> token prompts made from token descriptions, in the chosen directions.

    Each token gets every template of each direction: ``text_to_token`` asks for the token of
    a description, ``token_to_text`` for the description of a token.
    """
    from gti_jax.train.data import Example

    missing = [e.token for e in entries if not (e.description or "").strip()]
    if missing:
        raise TrainError(
            f"tokens {missing[:5]} have no description; grounding without data.pairs needs a "
            "description for every token: add them to the tokens file, or give data.pairs"
        )
    out = []
    for e in entries:
        if "text_to_token" in directions:
            out += [Example(t.format(d=e.description.strip()), e.token) for t in _TEXT_TO_TOKEN]
        if "token_to_text" in directions:
            out += [Example(t.format(t=e.token), e.description.strip()) for t in _TOKEN_TO_TEXT]
    rng = np.random.default_rng(seed)
    return [out[i] for i in rng.permutation(len(out))]


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _mesh(cfg: TrainConfig):
    from gti_jax.models.sharding import make_mesh

    shape = dict(cfg.mesh.shape)
    if all(v == 1 for v in shape.values()) and jax.process_count() == 1:
        return None  # one device: plain jit, no sharding machinery
    return make_mesh(shape)


def _check_batch_fits(cfg: TrainConfig, mesh, rules) -> None:
    """Each stage's batch (and each micro-batch) must split evenly over the batch shards."""
    if mesh is None:
        return
    from gti_jax.models.sharding import logical_to_spec

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
    given = _given_files(cfg, make_data)
    _check_model(cfg.model)
    mesh = _mesh(cfg)
    rules = dict(cfg.mesh.rules)
    _check_batch_fits(cfg, mesh, rules)
    run_dir = _check_run_dir(cfg)
    t0 = time.perf_counter()
    model, tokenizer = _load(cfg, mesh, rules)
    load_seconds = time.perf_counter() - t0
    inputs = _read_inputs(cfg, given, model, tokenizer) if given is not None else None
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
    from gti_jax.models import load_pretrained
    from gti_jax.models.hf import CheckpointMismatchError

    try:
        if mesh is not None:
            return load_pretrained(cfg.model, mesh=mesh, rules=rules)
        return load_pretrained(cfg.model)
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


@dataclasses.dataclass
class _Inputs:
    """Everything a run reads from its data files, read and checked before it starts."""

    files: DataFiles
    entries: list  # TokenEntry, file order
    to_add: list[str]  # the new tokens
    num_tokens: int  # the tokenizer's size before the new tokens
    new_range: range  # their ids in the extended tokenizer
    desc_ids: Any  # init=description: each token's description ids
    ground: list  # encoded grounding examples ([] without grounding)
    sft: list  # encoded fine-tuning examples, auxiliary pairs included ([] without SFT)
    sft_units: list[int]  # the targets each of them trains (the learning curve's x axis)
    evaluator: Any  # the Evaluator of data.eval (its examples encoded, candidates checked)


def _read_inputs(cfg: TrainConfig, files: DataFiles, model, tokenizer) -> _Inputs:
    """Reads and checks every data file and the examples they make; extends the tokenizer.

    Raises a BadInput (TrainError, TokenError, DataError, ...) naming the file and the line.
    """
    from gti_jax.train.data import encode_examples, read_candidates, read_examples
    from gti_jax.train.evaluate import Evaluator
    from gti_jax.vocab.resize import plan_resize
    from gti_jax.vocab.tokens import (
        description_token_ids,
        extend_tokenizer,
        read_tokens_file,
        validate_new_tokens,
    )

    entries = read_tokens_file(files.tokens)
    num_tokens = len(tokenizer)
    requested = [e.token for e in entries]
    to_add = validate_new_tokens(tokenizer, requested, skip_existing=True)
    existing = [t for t in requested if t not in set(to_add)]
    if existing:
        raise TrainError(
            f"data.tokens={files.tokens}: {len(existing)} token(s) already in the vocabulary: "
            f"{', '.join(repr(t) for t in existing[:5])}; remove them from the tokens file"
        )
    plan_resize(
        int(model.num_rows),
        num_tokens,
        num_tokens + len(to_add),
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    pairs = read_examples(files.pairs) if files.pairs else None
    if cfg.ground.steps > 0 and pairs is None:
        pairs = pairs_from_descriptions(entries, cfg.ground.templates, cfg.seed)
    # read even without fine-tuning: the popularity baseline counts its targets
    sft_examples = read_examples(files.sft) if files.sft else []
    if cfg.sft.steps > 0 and not sft_examples:
        raise TrainError("sft.steps > 0 but data.sft is unset; give data.sft or set sft.steps=0")
    aux = _aux_examples(cfg, files, pairs, sft_examples) if cfg.sft.steps > 0 else []
    eval_examples = read_examples(files.eval) if files.eval else []
    if cfg.eval.max_examples is not None:
        eval_examples = eval_examples[: cfg.eval.max_examples]
    candidates = read_candidates(files.candidates) if files.candidates else None
    desc_ids = None
    if cfg.init == "description":
        descriptions = [e.description for e in entries]
        empty = [e.token for e in entries if not (e.description or "").strip()]
        if empty:
            raise TrainError(
                f"init=description needs a description for every token; {len(empty)} have "
                f"none ({', '.join(empty[:5])}): add them to data.tokens={files.tokens} or "
                "choose another init"
            )
        desc_ids = description_token_ids(tokenizer, descriptions, tokens=requested)
    new_ids = extend_tokenizer(tokenizer, to_add)

    def encode(examples, source):
        return encode_examples(
            tokenizer,
            examples,
            max_len=cfg.data.max_len,
            chat_template=cfg.data.chat_template,
            source=source,
        )

    return _Inputs(
        files=files,
        entries=entries,
        to_add=to_add,
        num_tokens=num_tokens,
        new_range=range(new_ids[0], new_ids[-1] + 1),
        desc_ids=desc_ids,
        ground=encode(pairs, str(files.pairs or "generated pairs")) if cfg.ground.steps else [],
        sft=encode(sft_examples + aux, str(files.sft)) if cfg.sft.steps else [],
        sft_units=[ex.num_targets for ex in sft_examples + aux] if cfg.sft.steps else [],
        evaluator=Evaluator(
            cfg, tokenizer, eval_examples, candidates, sft_examples, num_tokens=len(tokenizer)
        ),
    )


def _run(
    cfg: TrainConfig,
    run_dir: Path,
    where: _Where,
    model,
    tokenizer,
    load_seconds: float,
    make_data: MakeData | None,
    inputs: _Inputs | None,
    mesh,
    rules,
    t_run,
) -> dict[str, Any]:
    from gti_jax import diagnose
    from gti_jax.models import export_hf_dir
    from gti_jax.train.checkpoint import Checkpointer
    from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab

    writer = jax.process_index() == 0
    log = RunLog(run_dir, writer=writer)
    stop = _StopFlag().install()

    # load (done before the run directory was made) ---------------------------------------
    where.stage = "load"
    tied = bool(model.config.tie_word_embeddings)
    log.finish("load", load_seconds, model=str(cfg.model), rows=int(model.num_rows), tied=tied)

    # data + extend + init --------------------------------------------------------------
    t0 = time.perf_counter()
    if inputs is None:  # the built-in recommendation data, made in run_dir/data
        where.stage = "data"
        files = make_data(run_dir / "data", model, tokenizer)
        inputs = _read_inputs(cfg, files, model, tokenizer)
    where.stage = "extend"
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
    model = nnx.merge(graphdef, state)
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
    codebook = _codebook_vectors(files, to_add)
    decode = lambda i: tokenizer.decode([int(i)])  # noqa: E731

    def record(stage, m):
        table = _host(m.embed.embedding[...]).astype(np.float32)  # every process (collective)
        if writer:
            diagnose.record_stage(
                run_dir,
                stage,
                table,
                new_range,
                codebook_vectors=codebook,
                decode=decode,
                old_ids=range(num_tokens),
                tokens=to_add,
            )

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

    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest, skipped = ckpt.newest_verified()  # damaged or unsealed newer ones set aside
    for step, why in skipped:
        _log(f"checkpoint step {step} skipped: {why}")
    latest_meta = _peek_meta(ckpt, latest)
    ctx = _Ctx(cfg, run_dir, ckpt, log, stop, mesh, rules, latest, latest_meta, inputs.evaluator)

    try:
        # ground -----------------------------------------------------------------------
        G = cfg.ground.steps
        sft_started = latest_meta is not None and latest_meta.get("stage") == "sft"
        if G > 0 and not sft_started:
            where.stage = "ground"
            model = _ground(ctx, model, new_range, tied, inputs.ground, token_info)
            record("ground", model)

        # SFT --------------------------------------------------------------------------
        if cfg.sft.steps > 0:
            where.stage = "sft"
            model = _sft(ctx, model, inputs.sft, inputs.sft_units)
            record("sft", model)
    finally:
        ckpt.wait()
        ckpt.close()

    # evaluate ---------------------------------------------------------------------------
    where.stage = "evaluate"
    t0 = time.perf_counter()
    # On several processes, every process gathers the model (a collective) and process 0
    # evaluates and exports it alone, on its own devices.
    host_model = _host_model(model)
    n_eval = len(inputs.evaluator.examples)
    if writer and n_eval:
        _log(f"evaluating {n_eval} examples: loss, greedy decoding, constrained beam search")
    results, ranks = inputs.evaluator(host_model) if writer else ({}, [])
    if writer and ranks:  # per-example ranks: paired tests between runs on the same users
        atomic_write_json(
            run_dir / "eval_ranks.json",
            {"targets": inputs.evaluator.targets, "ranks": ranks, "beams": cfg.eval.beams},
        )
    if cfg.nan_policy == "skip":
        results["skipped_steps"] = {
            s: int(log.stages.get(s, {}).get("skipped_steps", 0)) for s in ("ground", "sft")
        }
    results["wall_seconds"] = round(time.perf_counter() - t_run, 1)
    if writer:
        atomic_write_json(run_dir / "results.json", results)
        if _has_metrics(run_dir):  # no training stage ran: no loss curve to draw
            diagnose.plot_loss(run_dir)
    log.finish("evaluate", time.perf_counter() - t0)

    # export -----------------------------------------------------------------------------
    if cfg.export.hf and writer:
        where.stage = "export"
        t0 = time.perf_counter()
        _remove_stale_temps(run_dir)
        export_hf_dir(host_model, None, tokenizer, run_dir / "export", overwrite=True)
        log.finish("export", time.perf_counter() - t0, path=str(run_dir / "export"))
    where.stage = "finish"
    _barrier("gti_jax.train: done")  # no process leaves while process 0 still writes
    _log(f"done: {json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)})}")
    return results


def _has_metrics(run_dir: Path) -> bool:
    """Whether ``metrics.jsonl`` holds a line (a training stage logged a step)."""
    path = run_dir / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0


def _peek_meta(ckpt, step):
    if step is None:
        return None
    return ckpt.read_meta(step) if hasattr(ckpt, "read_meta") else None


def _codebook_vectors(files: DataFiles, tokens):
    if files.codebooks is None:
        return None
    from gti_jax.diagnose import token_codebook_vectors

    return token_codebook_vectors(files.codebooks, tokens)


def _aux_examples(cfg: TrainConfig, files: DataFiles, pairs, sft_examples):
    ratio = cfg.sft.aux_pairs_ratio
    if ratio <= 0:
        return []
    from gti_jax.train.data import read_examples

    pool = read_examples(files.aux) if files.aux else list(pairs or [])
    if not pool:
        raise TrainError(
            "sft.aux_pairs_ratio > 0 needs paired prompts (data.pairs or token descriptions)"
        )
    n = int(round(ratio * len(sft_examples)))
    rng = np.random.default_rng(cfg.seed + 7)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=n > len(pool))]


def _fault_steps() -> frozenset[int]:
    env = os.environ.get(_FAULT_ENV, "")
    return frozenset(int(x) for x in env.split(",") if x.strip())


def _guard_optimizer(tx):
    """`tx` that leaves parameters and its state unchanged on a step with non-finite gradients.

    The update of such a step is zero and the inner optimizer state is kept (optax's
    ``apply_if_finite``), inside the compiled step: no copy of the parameters or the optimizer
    state is needed even though the steps donate them. The state records whether the last
    step was applied (``last_finite``) and how many were skipped (``total_notfinite``), and is
    checkpointed with the rest, so the count survives a resume.
    """
    import optax

    return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


class _NanGuard:
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
            _log(
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


def _remove_stale_temps(run_dir: Path) -> None:
    """Removes what an interrupted export left (its temporary and replaced directories)."""
    for stale in (*run_dir.glob(".export.tmp-*"), *run_dir.glob(".export.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Stages.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Ctx:
    """What the training stages share."""

    cfg: TrainConfig
    run_dir: Path
    ckpt: Any
    log: RunLog
    stop: _StopFlag
    mesh: Any
    rules: dict
    latest: int | None  # newest verified checkpoint step
    latest_meta: dict | None  # and its meta (stage, step)
    evaluator: Any = None  # the run's Evaluator (for eval.curve_every)

    @property
    def writer(self) -> bool:
        return jax.process_index() == 0


def _ground_state_tree(params, opt_state):
    p = (
        {"embed": params.embed}
        if params.head is None
        else {"embed": params.embed, "head": params.head}
    )
    return {"params": p, "opt": opt_state}


def _ground(ctx: _Ctx, model, new_range, tied, examples, token_info):
    cfg, ckpt, log, mesh, rules = ctx.cfg, ctx.ckpt, ctx.log, ctx.mesh, ctx.rules
    latest, latest_meta, run_dir, writer = ctx.latest, ctx.latest_meta, ctx.run_dir, ctx.writer
    from gti_jax.train.checkpoint import save_rows
    from gti_jax.train.ground import (
        GroundParams,
        ground_optimizer,
        join_new_rows,
        make_ground_step,
        shared_prefix,
        split_new_rows,
    )

    G = cfg.ground.steps
    t0 = time.perf_counter()
    graphdef, state = nnx.split(model)
    tx = _guard_optimizer(ground_optimizer(cfg.ground))
    step_fn = make_ground_step(
        graphdef,
        state,
        new_range,
        tx,
        tied=tied,
        compute_dtype=_dtype(cfg.ground.compute_dtype),
        grad_accum=cfg.ground.grad_accum,
        mesh=mesh,
        rules=rules,
        max_prefix=shared_prefix((ids for ids, _ in examples), new_range),
    )
    params, opt_state = step_fn.init(split_new_rows(state, new_range, tied=tied))
    start, resumed_meta = 0, None
    if latest_meta is not None and latest_meta.get("stage") == "ground":
        restored, resumed_meta = ckpt.restore(latest, target=_ground_state_tree(params, opt_state))
        params = GroundParams(restored["params"]["embed"], restored["params"].get("head"))
        opt_state = restored["opt"]
        start = int(resumed_meta["step"])
        _log(f"resumed grounding at step {start}/{G} from {ckpt.directory}")
    log.truncate_metrics("ground", start)
    guard = _NanGuard(cfg, "ground", 0, resumed_meta)

    def step_once(carry, batch, step):
        p, o, metrics = step_fn(*carry, batch)
        return (p, o), metrics

    params, opt_state = _train_loop(
        ctx,
        "ground",
        (params, opt_state),
        step_once,
        tree=lambda c: _ground_state_tree(*c),
        opt_state_of=lambda c: c[1],
        total=G,
        offset=0,
        start=start,
        examples=examples,
        batch_size=cfg.ground.batch_size,
        data_seed=cfg.seed,
        guard=guard,
        last_saved=start if start else None,
    )
    state = join_new_rows(state, params, new_range, tied=tied)
    if cfg.export.rows:
        rows = _host(params.embed).astype(np.float32)  # every process (collective)
        head = None if tied else _host(params.head).astype(np.float32)
    if writer and cfg.export.rows:
        meta = {
            "model": str(cfg.model),
            "new_ids": token_info["new_ids"],
            "tokens": token_info["tokens"],
            "tied": tied,
        }
        save_rows(run_dir / "grounded_rows.safetensors", rows, {**meta, "part": "embed"})
        if not tied:
            save_rows(run_dir / "grounded_head_rows.safetensors", head, {**meta, "part": "head"})
    log.finish("ground", time.perf_counter() - t0, steps=G, **guard.row(), **guard.meta())
    return nnx.merge(graphdef, state)


_STAGE_WORDS = {"ground": "grounding", "sft": "fine-tuning"}


def _train_loop(
    ctx: _Ctx,
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
    train_seconds=0.0,
    cpu_seconds=0.0,
):
    """Steps ``start+1 .. total`` of a stage: NaN guard, progress, metrics, checkpoints, stops.

    ``after_step(state, step, batcher, train_seconds, cpu_seconds)``, if given, runs after
    each step (the learning curve); its time is not counted in ``train_seconds`` and
    ``cpu_seconds``, the stage's training wall time and this process's CPU time so far (in:
    what a resumed checkpoint recorded), which checkpoints keep in their meta.

    ``step_once(state, batch, step) -> (state, metrics)`` is the stage's compiled step;
    ``tree(state)`` is what a checkpoint holds. Checkpoint steps are global: ``offset + step``.
    Batch ``step`` is ``Batcher(examples, seed=data_seed).batch_at(step - 1)``: a pure function
    of the seed and the step, so a resumed stage sees the batches it would have seen.
    """
    from gti_jax.train.data import Batcher

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
                "lr": float(_lr(opt_state_of(state))),
            }
            log.metrics({**row, "grad_norm": gnorm, "tokens_per_s": tps, **guard.row()})
        train_seconds += time.perf_counter() - t_step
        cpu_seconds += time.process_time() - c_step
        if after_step is not None:
            after_step(state, step, batcher, train_seconds, cpu_seconds)
            t_last = time.perf_counter()  # tokens/s counts training only
        final = step == total
        stopping = stop.should_stop(offset + step)  # once: a SIGTERM may land between two reads
        if final or stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            meta = {
                "stage": stage,
                "step": step,
                "of": total,
                "train_seconds": round(train_seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
                **guard.meta(),
            }
            ckpt.save(offset + step, tree(state), meta, force=True)
            last_saved = offset + step
        ckpt.seal_finished()  # an async save that finished since is sealed (resumable)
        if stopping and not final:
            ckpt.wait()
            raise Preempted(
                f"stopped during {_STAGE_WORDS[stage]} after step {step}/{total}; checkpoint saved; re-run the same command to resume"
            )
    return state


def _lr(opt_state) -> float:
    """The learning rate last applied, read from optax's injected hyperparameters if any."""
    for leaf_state in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")
    ):
        if hasattr(leaf_state, "hyperparams") and "learning_rate" in leaf_state.hyperparams:
            return float(leaf_state.hyperparams["learning_rate"])
    return float("nan")


def _curve(ctx: _Ctx, step_fn, units: np.ndarray, start: int):
    """The ``after_step`` of fine-tuning that writes ``curve.jsonl`` (``eval.curve_every``).

    Each row: the step, the targets seen so far (an example counts its targets: 1 for a
    prompt, its loss segments for a sequence row), the training wall time, and the ranking
    metrics on data.eval; the popularity baseline on the same examples is in the first row.
    """
    cfg, ev = ctx.cfg, ctx.evaluator
    every = cfg.eval.curve_every
    if not every or ev is None or not ev.examples or ev.trie is None:
        return None
    path = ctx.run_dir / "curve.jsonl"
    rows = []
    if ctx.writer and path.is_file():  # a resumed run keeps the rows it had reached
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
        rows = [r for r in rows if r["step"] <= start]
    seen = {"step": 0, "targets": 0}

    def targets_seen(batcher, step):
        for s in range(seen["step"], step):
            seen["targets"] += int(units[batcher.indices_at(s)].sum())
        seen["step"] = step
        return seen["targets"]

    def after_step(st, step, batcher, train_seconds, cpu_seconds):
        if step % every and step != cfg.sft.steps:
            return
        model = _host_model(step_fn.merge(st))  # every process (collective)
        if not ctx.writer:
            return
        t0 = time.perf_counter()
        metrics, ranks = ev.retrieval(model)
        if step == cfg.sft.steps:  # the final evaluation reuses the ranking of the last point
            ev.remember_retrieval(metrics, ranks, f"curve.jsonl step {step}, before the LoRA merge")
        row = {
            "step": step,
            "targets_seen": targets_seen(batcher, step),
            "train_seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "eval_seconds": 0.0,
            "num_eval": len(ev.examples),
            **{k: round(v, 5) for k, v in metrics.items()},
        }
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        if not rows:
            row["popularity_baseline"] = ev.popularity_baseline()
        rows.append(row)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        _log(
            f"curve: step {step}, {row['targets_seen']} targets, {row['train_seconds']:.0f}s: "
            + ", ".join(
                f"{k} {metrics[k]:.4f}" for k in metrics if k.startswith(("recall@", "ndcg@"))
            )
        )

    return after_step


def _sft(ctx: _Ctx, model, examples, units=None):
    cfg, ckpt, log, mesh, rules = ctx.cfg, ctx.ckpt, ctx.log, ctx.mesh, ctx.rules
    latest_meta = ctx.latest_meta
    from gti_jax.train.lora import apply_lora, merge_lora
    from gti_jax.train.steps import make_sft_step, sft_optimizer

    S, G = cfg.sft.steps, cfg.ground.steps
    t0 = time.perf_counter()
    lora = cfg.sft.lora_rank > 0
    if lora:
        model = apply_lora(
            model,
            rank=cfg.sft.lora_rank,
            alpha=cfg.sft.lora_alpha,
            dropout=cfg.sft.lora_dropout,
            targets=cfg.sft.lora_targets,
            rngs=nnx.Rngs(cfg.seed + 11),
        )
    step_fn = make_sft_step(
        model,
        _guard_optimizer(sft_optimizer(cfg.sft)),
        lora=lora,
        compute_dtype=_dtype(cfg.sft.compute_dtype),
        grad_accum=cfg.sft.grad_accum,
        mesh=mesh,
        rules=rules,
    )
    st = step_fn.init(model)
    start, resumed_meta = 0, None
    if latest_meta is not None and latest_meta.get("stage") == "sft":
        restored, resumed_meta = ckpt.restore(
            ctx.latest, target={"trainable": st.trainable, "opt": st.opt_state}
        )
        st = st._replace(trainable=restored["trainable"], opt_state=restored["opt"])
        start = int(resumed_meta["step"])
        _log(f"resumed fine-tuning at step {start}/{S} from {ckpt.directory}")
    log.truncate_metrics("sft", start)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    guard = _NanGuard(cfg, "sft", G, resumed_meta)
    units = np.ones(len(examples), np.int64) if units is None else np.asarray(units, np.int64)
    st = _train_loop(
        ctx,
        "sft",
        st,
        lambda st, batch, step: step_fn(st, batch, jax.random.fold_in(key, step)),
        tree=lambda st: {"trainable": st.trainable, "opt": st.opt_state},
        opt_state_of=lambda st: st.opt_state,
        total=S,
        offset=G,
        start=start,
        examples=examples,
        batch_size=cfg.sft.batch_size,
        data_seed=cfg.seed + 1,
        guard=guard,
        last_saved=G + start if start else (G or None),  # grounding ends with a checkpoint
        after_step=_curve(ctx, step_fn, units, start),
        train_seconds=float((resumed_meta or {}).get("train_seconds", 0.0)),
        cpu_seconds=float((resumed_meta or {}).get("cpu_seconds", 0.0)),
    )
    model = step_fn.merge(st)
    if lora:
        model = merge_lora(model)
    log.finish("sft", time.perf_counter() - t0, steps=S, **guard.row(), **guard.meta())
    return model
