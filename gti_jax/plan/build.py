"""Plan a run without its hardware: the trainer's steps compiled ahead of time on shapes.

The grounding step and the fine-tuning step are built by the trainer's own builders
(:func:`gti_jax.train.ground.ground_step_from_config`,
:func:`gti_jax.train.sft.sft_step_from_config`, :func:`gti_jax.train.sft.sft_model_from_config`)
on an abstract model (`nnx.eval_shape`: shapes, dtypes and logical axes, no weights), then
lowered on abstract parameters, optimizer state and a batch (:meth:`CompiledStep.lower`) and
compiled for the configured mesh. The compiled program is what one device runs, so XLA's
``memory_analysis()`` and ``cost_analysis()`` are per device; the collectives are read from
its HLO (:mod:`gti_jax.plan.hlo`). A step time is then estimated for a named accelerator
(:data:`gti_jax.plan.shapes.ACCELERATORS`) with a roofline plus the collectives' traffic.

What the compiled numbers are: XLA:CPU's buffer assignment and FLOP count for the SPMD
program of one device (the CPU compiler fuses differently from the TPU and GPU compilers,
so temporaries are an estimate of theirs, usually on the high side); FLOPs are XLA's count
(matrix multiplications as ``2 m n k`` plus elementwise work), scaled for loops such as the
gradient-accumulation scan, whose bodies XLA counts once.

Example:
    >>> cfg = load_config(None, ["model=qwen3-0.6b", "plan.new_tokens=64"])
    >>> rows_for(cfg, *model_shape(cfg.model), mesh=None, rules=dict(cfg.mesh.rules))
    (151936, range(151669, 151733))
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from gti_jax import config as engine
from gti_jax.errors import BadInput
from gti_jax.models.config import LlamaConfig
from gti_jax.models.families import model_class
from gti_jax.models.sharding import logical_to_spec, make_mesh
from gti_jax.models.source import ModelSourceError, resolve_source
from gti_jax.pipeline import RunConfig, check_run
from gti_jax.plan.hlo import collectives, dot_flops, summarize
from gti_jax.plan.shapes import ACCELERATORS, MODEL_SHAPES, TOKENIZER_SIZES, Accelerator
from gti_jax.train.config import HELP_HEADER
from gti_jax.train.data import Batch, target_width
from gti_jax.train.ground import GroundParams, ground_step_from_config
from gti_jax.train.loop import compute_dtype
from gti_jax.train.sft import sft_model_from_config, sft_step_from_config
from gti_jax.train.steps import batch_shards, trainable_filter
from gti_jax.vocab.resize import plan_resize

__all__ = [
    "PlanConfig",
    "PlanError",
    "PlanSection",
    "StagePlan",
    "check_fits",
    "devices_needed",
    "estimate",
    "format_plan",
    "load_config",
    "model_shape",
    "parse_cli",
    "plan_stages",
    "rows_for",
]

AcceleratorName = Literal[tuple(ACCELERATORS)]  # type: ignore[valid-type]
_GiB = 2**30


class PlanError(BadInput):
    """A plan that cannot be made or cannot fit (one line naming what to change)."""


@dataclass(frozen=True)
class PlanSection:
    """What a plan needs beyond the run's own config."""

    accelerator: AcceleratorName = "tpu-v5e"
    """The chip the step time and the memory check are for (gti_jax/plan/shapes.py)."""

    new_tokens: int | None = None
    """How many tokens the run adds; null: the lines of data.tokens."""

    base_tokens: int | None = None
    """The tokenizer's size before the new tokens (the first new id); null: known for the
    named shapes, else the config's vocab_size (or the GGUF's token list)."""

    seq_len: int | None = None
    """Tokens per row of the planned batch; null: data.max_len (the largest bucket)."""

    targets: int = 8
    """Target tokens per row (the loss projects to the vocabulary only there); the batch's
    target width is this rounded up to 8."""

    ground_prefix: int = 0
    """Leading positions of every grounding row without new tokens, run without gradient
    (the trainer takes it from the data; rounded down to a multiple of 16 as it does); 0:
    every position differentiated (the upper bound)."""

    devices: int | None = None
    """Devices of the mesh; null: the product of mesh.shape (needed when an axis is -1)."""

    sample_layers: int | None = None
    """Compile the model with this many and with twice as many decoder layers and extrapolate
    every figure linearly to its real depth (exact for memory of unrolled, identical layers
    up to XLA's buffer packing; quicker to compile); null: compile the whole model."""

    hbm_gib: float | None = None
    """Memory per device in GiB for the fit check; null: the accelerator's."""

    output: str | None = None
    """Also write the plan as JSON to this file."""


@dataclass(frozen=True)
class PlanConfig(RunConfig):
    """A run's config (every key of python -m gti_jax.train) plus the plan's own section."""

    plan: PlanSection = field(default_factory=PlanSection)
    """The plan: accelerator, new tokens, batch shape."""


def _check_plan(cfg: PlanConfig) -> None:
    check_run(cfg)
    p = cfg.plan
    engine.at_least("plan.new_tokens", p.new_tokens, 1)
    engine.at_least("plan.base_tokens", p.base_tokens, 1)
    engine.at_least("plan.seq_len", p.seq_len, 2)
    engine.at_least("plan.targets", p.targets, 1)
    engine.at_least("plan.ground_prefix", p.ground_prefix, 0)
    engine.at_least("plan.devices", p.devices, 1)
    engine.at_least("plan.sample_layers", p.sample_layers, 1)
    engine.positive("plan.hbm_gib", p.hbm_gib)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> PlanConfig:
    """A checked :class:`PlanConfig` from defaults, a YAML file and dotted overrides."""
    return engine.load(PlanConfig, path, overrides, validate=_check_plan)


def _help() -> str:
    header = ("usage: python -m gti_jax.plan [--config FILE] [key=value ...]", *HELP_HEADER[1:])
    return engine.help_text(PlanConfig, header)


def parse_cli(argv: Sequence[str]) -> PlanConfig:
    """``[--config FILE] [--help] [key=value ...]``, as the trainer's command line."""
    return engine.parse_cli(PlanConfig, argv, help=_help, validate=_check_plan)


# --------------------------------------------------------------------------------------------
# The model, the vocabulary and the mesh, from the config alone.
# --------------------------------------------------------------------------------------------


def model_shape(name: str) -> tuple[dict[str, Any], int]:
    """``(config.json dict, tokenizer size)`` of `model`: a named shape
    (:data:`~gti_jax.plan.shapes.MODEL_SHAPES`), a ``config.json`` file, a checkpoint
    directory, a ``.gguf`` file or alias (its header only). No weight is read.

    Example:
        >>> model_shape("llama-3.1-8b")[0]["num_hidden_layers"]
        32
    """
    key = str(name).lower()
    if key in MODEL_SHAPES:
        return dict(MODEL_SHAPES[key]), TOKENIZER_SIZES[key]
    path = Path(name)
    if path.is_file() and path.suffix == ".json":
        return _read_json(path)
    try:
        source = resolve_source(name, label=f"model={name}")
    except ModelSourceError as e:
        raise PlanError(
            f"{e}; or name a shape: {', '.join(MODEL_SHAPES)}, or give a config.json"
        ) from None
    if source.kind == "hf":
        return _read_json(Path(source.path) / "config.json")
    from gti_jax.models.gguf import gguf_config

    return gguf_config(source.path)


def _read_json(path: Path) -> tuple[dict[str, Any], int]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"model={path}: cannot read it as JSON ({e}); give a config.json") from None
    if not isinstance(d, dict) or "vocab_size" not in d:
        raise PlanError(f"model={path} is not a Hugging Face config.json (no vocab_size)")
    return d, int(d["vocab_size"])


def devices_needed(cfg: PlanConfig) -> int:
    """The devices the plan compiles for: ``plan.devices`` or the product of ``mesh.shape``.

    Raises:
        PlanError: an axis of size -1 without ``plan.devices``, or sizes that do not divide it.
    """
    sizes = list(cfg.mesh.shape.values())
    fixed = math.prod(s for s in sizes if s != -1)
    n = cfg.plan.devices
    if -1 in sizes and n is None:
        raise PlanError(
            f"mesh.shape={dict(cfg.mesh.shape)} has a -1 axis: say how many devices to plan "
            "for with plan.devices=N"
        )
    if n is None:
        return fixed
    if n % fixed or (-1 not in sizes and n != fixed):
        raise PlanError(
            f"plan.devices={n} does not fit mesh.shape={dict(cfg.mesh.shape)}; make the axis "
            f"sizes multiply to {n} (or give one axis -1)"
        )
    return n


def plan_mesh(cfg: PlanConfig) -> Mesh | None:
    """The mesh a run of `cfg` would build (None on one device, as the trainer does)."""
    n = devices_needed(cfg)
    if n == 1:
        return None
    devices = jax.devices()
    if len(devices) < n:
        raise PlanError(
            f"the plan needs {n} devices but jax sees {len(devices)}; run it as python -m "
            "gti_jax.plan, which starts jax with that many fake CPU devices"
        )
    return make_mesh(dict(cfg.mesh.shape), devices=devices[:n])


def rows_for(cfg: PlanConfig, hf: dict, num_tokens: int, *, mesh, rules) -> tuple[int, range]:
    """The extended table's rows and the new ids, as the trainer's resize makes them
    (padding to ``pad_to_multiple_of``, and to the vocabulary shards of a sharded table)."""
    n_new = cfg.plan.new_tokens
    if n_new is None:
        n_new = _count_tokens(cfg.data.tokens)
    base = cfg.plan.base_tokens or num_tokens
    rows = int(hf["vocab_size"])
    if base > rows:
        raise PlanError(f"plan.base_tokens={base} exceeds the model's {rows} rows")
    pad = cfg.pad_to_multiple_of
    plan = plan_resize(rows, base, base + n_new, pad_to_multiple_of=pad)
    if mesh is not None and plan.new_num_rows != rows:
        spec = logical_to_spec(("vocab", "embed"), rules, mesh, (rows, int(hf["hidden_size"])))
        axes = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
        shards = math.prod(mesh.shape[a] for a in axes)
        if plan.new_num_rows % shards:
            pad = math.lcm(pad, shards)
            plan = plan_resize(rows, base, base + n_new, pad_to_multiple_of=pad)
    return plan.new_num_rows, plan.new_ids


def _count_tokens(path: str | None) -> int:
    if path is None:
        raise PlanError("say how many tokens the run adds: plan.new_tokens=N (or data.tokens=FILE)")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PlanError(f"data.tokens={path}: {e.strerror}; or give plan.new_tokens=N") from None
    return sum(1 for line in lines if line.strip())


# --------------------------------------------------------------------------------------------
# Compiling the steps.
# --------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """One compiled step, per device (bytes, FLOPs) and per step (collectives).

    Attributes:
        stage: "ground", "sft-lora" or "sft-full".
        batch: ``[rows, tokens, target width]`` of the planned batch; `grad_accum` its split.
        trainable_params: parameters the step trains (all devices).
        param_bytes, opt_bytes, batch_bytes: the step's arguments on one device (parameters
            trained and frozen, optimizer state, batch).
        temp_bytes, peak_bytes: XLA's temporaries, and arguments + outputs - donated + temps.
        flops, bytes_accessed: XLA's cost analysis of one step on one device (loops scaled).
        collectives: :func:`gti_jax.plan.hlo.summarize` of the program's collectives.
        compile_seconds: the wall time of lowering and compiling.
        sampled_peaks: with ``plan.sample_layers``, the peaks of the k- and 2k-layer
            programs the figures were extrapolated from (a peak that does not grow with the
            layers means XLA scheduled the two differently: trust it less).
    """

    stage: str
    devices: int
    batch: tuple[int, int, int]
    grad_accum: int
    trainable_params: int
    param_bytes: int
    opt_bytes: int
    batch_bytes: int
    temp_bytes: int
    peak_bytes: int
    flops: float
    bytes_accessed: float
    collectives: list[dict]
    compile_seconds: float
    sampled_peaks: list[int] | None = None


def _device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of `tree`'s leaves on one device under `shardings` (a matching tree; a leaf the
    program does not read has no sharding and counts whole, as the trainer still holds it)."""

    def one(x, sh):
        shape = sh.shard_shape(x.shape) if sh is not None and x.shape else x.shape
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def _abstract_batch(rows: int, length: int, width: int) -> Batch:
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    return Batch(
        ids,
        jax.ShapeDtypeStruct((rows, length), jnp.float32),
        ids,
        jax.ShapeDtypeStruct((rows, width), jnp.int32),
    )


def _check_batch(cfg: PlanConfig, stage: str, mesh, rules) -> None:
    sec = getattr(cfg, stage)
    shards = batch_shards(mesh, rules)
    if (sec.batch_size // sec.grad_accum) % shards:
        raise PlanError(
            f"{stage}.batch_size={sec.batch_size} (grad_accum={sec.grad_accum}) does not split "
            f"over the {shards} batch shards of mesh.shape={dict(cfg.mesh.shape)}; make "
            f"{stage}.batch_size / {stage}.grad_accum a multiple of {shards}"
        )


def _compile(stage, step, args, extra, *, rows, length, width, accum, devices, t0):
    """Lowers and compiles `step` on abstract `args` and reads what the compiled program says."""
    params, frozen, batch = args
    compiled = step.lower(params, frozen, batch, extra).compile()
    seconds = time.perf_counter() - t0
    (sh_params, sh_frozen, sh_opt, sh_batch, *_), _ = compiled.input_shardings
    opt_state = jax.eval_shape(step.tx.init, params)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    text = compiled.as_text()
    # XLA counts a loop body (the gradient-accumulation scan) once: add the matrix
    # multiplications of its other trips (their elementwise work stays uncounted, ~1%), and
    # scale the bytes by the same ratio
    weighted, once = dot_flops(text)
    scale = weighted / once if once else 1.0
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return StagePlan(
        stage=stage,
        devices=devices,
        batch=(rows, length, width),
        grad_accum=accum,
        trainable_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        param_bytes=_device_bytes(params, sh_params) + _device_bytes(frozen, sh_frozen),
        opt_bytes=_device_bytes(opt_state, sh_opt),
        batch_bytes=_device_bytes(batch, sh_batch),
        temp_bytes=int(mem.temp_size_in_bytes),
        peak_bytes=int(peak),
        flops=float(cost.get("flops", 0.0)) + weighted - once,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)) * scale,
        collectives=summarize(collectives(text, devices)),
        compile_seconds=round(seconds, 1),
    )


def _make_model(cfg: PlanConfig, config: LlamaConfig):
    cls = model_class(config)
    param_dtype = compute_dtype(cfg.compute.param_dtype)
    return lambda: cls(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=jnp.float32)


def _shape(cfg: PlanConfig, stage: str) -> tuple[int, int, int]:
    length = cfg.plan.seq_len or cfg.data.max_len
    return getattr(cfg, stage).batch_size, length, target_width(cfg.plan.targets, length)


def plan_ground(cfg: PlanConfig, config: LlamaConfig, new_ids: range, mesh, rules) -> StagePlan:
    """The grounding step of `cfg`, compiled on shapes."""
    t0 = time.perf_counter()
    _check_batch(cfg, "ground", mesh, rules)
    rows, length, width = _shape(cfg, "ground")
    # the trainer's prefixes are multiples of 16 that leave >= 16 positions (ground.py)
    prefix = min(cfg.plan.ground_prefix // 16 * 16, max(0, length - 16) // 16 * 16)
    graphdef, state = nnx.split(nnx.eval_shape(_make_model(cfg, config)))
    tied = bool(config.tie_word_embeddings)
    step = ground_step_from_config(cfg, graphdef, state, new_ids, tied=tied, mesh=mesh, rules=rules)
    row = jax.ShapeDtypeStruct((len(new_ids), config.hidden_size), jnp.float32)
    params = GroundParams(row, None if tied else row)
    args = (params, step.frozen_state, _abstract_batch(rows, length, width))
    return _compile(
        "ground", step, args, prefix, rows=rows, length=length, width=width,
        accum=cfg.ground.grad_accum, devices=_ndev(mesh), t0=t0,
    )  # fmt: skip


def plan_sft(cfg: PlanConfig, config: LlamaConfig, mesh, rules) -> StagePlan:
    """The fine-tuning step of `cfg` (LoRA or full), compiled on shapes."""
    t0 = time.perf_counter()
    _check_batch(cfg, "sft", mesh, rules)
    rows, length, width = _shape(cfg, "sft")
    make = _make_model(cfg, config)
    model = nnx.eval_shape(lambda: sft_model_from_config(cfg, make()))
    step = sft_step_from_config(cfg, model, mesh=mesh, rules=rules)
    _, trainable, frozen = nnx.split(model, trainable_filter(step.lora), ...)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (trainable, frozen, _abstract_batch(rows, length, width))
    return _compile(
        "sft-lora" if step.lora else "sft-full", step, args, key, rows=rows, length=length,
        width=width, accum=cfg.sft.grad_accum, devices=_ndev(mesh), t0=t0,
    )  # fmt: skip


def _ndev(mesh) -> int:
    return 1 if mesh is None else mesh.size


def plan_stages(cfg: PlanConfig) -> tuple[dict[str, Any], list[StagePlan]]:
    """Compiles every stage `cfg` runs (``ground.steps > 0``, ``sft.steps > 0``) on shapes.

    Returns:
        ``(about, stages)``: what was planned (model, rows, mesh) and one
        :class:`StagePlan` per stage.
    """
    hf, num_tokens = model_shape(cfg.model)
    mesh = plan_mesh(cfg)
    rules = dict(cfg.mesh.rules)
    num_rows, new_ids = rows_for(cfg, hf, num_tokens, mesh=mesh, rules=rules)
    try:
        config = LlamaConfig.from_hf_dict(hf).replace(vocab_size=num_rows)
    except BadInput as e:
        raise PlanError(f"model={cfg.model}: {e}") from None
    about = {
        "model": str(cfg.model),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_rows": num_rows,
        "new_tokens": len(new_ids),
        "new_ids": [new_ids.start, new_ids.stop],
        "mesh": {k: int(v) for k, v in (mesh.shape if mesh else {"devices": 1}).items()},
        "devices": _ndev(mesh),
    }
    k = cfg.plan.sample_layers
    if k is None or 2 * k >= config.num_hidden_layers:
        return about, _plan_all(cfg, config, new_ids, mesh, rules)
    about["sampled_layers"] = [k, 2 * k]
    small = _plan_all(cfg, config.replace(num_hidden_layers=k), new_ids, mesh, rules)
    large = _plan_all(cfg, config.replace(num_hidden_layers=2 * k), new_ids, mesh, rules)
    t = (config.num_hidden_layers - k) / k
    return about, [_extrapolate(a, b, t) for a, b in zip(small, large, strict=True)]


def _plan_all(cfg, config, new_ids, mesh, rules) -> list[StagePlan]:
    stages = []
    if cfg.ground.steps > 0:
        stages.append(plan_ground(cfg, config, new_ids, mesh, rules))
    if cfg.sft.steps > 0:
        stages.append(plan_sft(cfg, config, mesh, rules))
    return stages


_LINEAR = ("trainable_params", "param_bytes", "opt_bytes", "temp_bytes", "peak_bytes")


def _extrapolate(a: StagePlan, b: StagePlan, t: float) -> StagePlan:
    """``a + t (b - a)`` for every per-layer figure of two plans (k and 2k layers)."""
    line = lambda x, y: x + t * (y - x)  # noqa: E731
    out = {f: int(round(line(getattr(a, f), getattr(b, f)))) for f in _LINEAR}
    keys = {(c["kind"], c["group_size"]) for c in a.collectives + b.collectives}
    zero = {"instructions": 0, "executions": 0, "operand_bytes": 0, "traffic_bytes": 0.0}
    pick = lambda plan, key: next(  # noqa: E731
        (c for c in plan.collectives if (c["kind"], c["group_size"]) == key), zero
    )
    colls = []
    for key in keys:
        ca, cb = pick(a, key), pick(b, key)
        c = {n: line(ca[n], cb[n]) for n in zero}
        c = {n: (v if n == "traffic_bytes" else int(round(v))) for n, v in c.items()}
        colls.append({"kind": key[0], "group_size": key[1], **c})
    return replace(
        a,
        **out,
        flops=line(a.flops, b.flops),
        bytes_accessed=line(a.bytes_accessed, b.bytes_accessed),
        collectives=sorted(colls, key=lambda c: -c["traffic_bytes"]),
        compile_seconds=round(a.compile_seconds + b.compile_seconds, 1),
        sampled_peaks=[a.peak_bytes, b.peak_bytes],
    )


# --------------------------------------------------------------------------------------------
# Time, fit and the report.
# --------------------------------------------------------------------------------------------


def estimate(stage: StagePlan, acc: Accelerator) -> dict[str, float]:
    """A step's time on `acc`: ``max(FLOPs / peak, bytes / HBM bandwidth)`` (a roofline of
    the whole step) plus every collective's ring traffic at the link bandwidth, not
    overlapped with compute (seconds)."""
    compute = stage.flops / acc.peak_flops
    memory = stage.bytes_accessed / acc.hbm_bytes_per_s
    comm = sum(c["traffic_bytes"] for c in stage.collectives) / acc.link_bytes_per_s
    return {"compute_s": compute, "memory_s": memory, "comm_s": comm,
            "step_s": max(compute, memory) + comm}  # fmt: skip


def _hbm(cfg: PlanConfig) -> float:
    acc = ACCELERATORS[cfg.plan.accelerator]
    return acc.hbm_bytes if cfg.plan.hbm_gib is None else cfg.plan.hbm_gib * _GiB


def check_fits(cfg: PlanConfig, stages: Sequence[StagePlan]) -> None:
    """Raises PlanError (one line: what to change) when a stage's per-device peak exceeds the
    accelerator's memory (``plan.hbm_gib`` overrides it)."""
    hbm = _hbm(cfg)
    for s in stages:
        if s.peak_bytes <= hbm:
            continue
        sec = cfg.ground if s.stage == "ground" else cfg.sft
        name = "ground" if s.stage == "ground" else "sft"
        tips = []
        state = s.param_bytes + s.opt_bytes
        if state > hbm / 2:
            fsdp = int(cfg.mesh.shape.get("fsdp", 1))
            tips.append(f"more fsdp (mesh.shape={{fsdp: {max(2, 2 * fsdp)}, ...}})")
            if s.stage == "sft-full":
                tips.append("LoRA (sft.lora_rank=8)")
        if cfg.compute.remat == "none":
            tips.append("compute.remat=full")
        if sec.batch_size // sec.grad_accum > 1:
            tips.append(
                f"a smaller batch per step ({name}.grad_accum={2 * sec.grad_accum} or "
                f"{name}.batch_size={max(1, sec.batch_size // 2)})"
            )
        if cfg.compute.loss_chunk == 0 or cfg.compute.loss_chunk > 8192:
            tips.append("chunked loss (compute.loss_chunk=8192)")
        raise PlanError(
            f"the {s.stage} step needs {s.peak_bytes / _GiB:.2f} GiB per device but "
            f"{cfg.plan.accelerator} has {hbm / _GiB:.2f} GiB; try " + ", or ".join(tips)
        )


def _b(n: float) -> str:
    for unit, size in (("GiB", _GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _t(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def format_plan(cfg: PlanConfig, about: dict, stages: Sequence[StagePlan]) -> str:
    """The human-readable report: per stage and per device, then the assumptions."""
    acc = ACCELERATORS[cfg.plan.accelerator]
    hbm = _hbm(cfg)
    mesh = ", ".join(f"{k}: {v}" for k, v in about["mesh"].items())
    lines = [
        f"plan: {about['model']} ({about['layers']} layers, D={about['hidden_size']}), "
        f"{about['new_tokens']} new tokens -> {about['num_rows']} rows; mesh {{{mesh}}} = "
        f"{about['devices']} devices (compiled for fake CPU devices); {acc.name}: "
        f"{hbm / _GiB:.0f} GiB, {acc.peak_flops / 1e12:.0f} TFLOP/s, "
        f"{acc.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, {acc.link_bytes_per_s / 1e9:.0f} GB/s link",
    ]
    if "sampled_layers" in about:
        k, k2 = about["sampled_layers"]
        lines.append(
            f"(compiled with {k} and {k2} decoder layers; every figure extrapolated linearly to "
            f"{about['layers']})"
        )
    for s in stages:
        t = estimate(s, acc)
        rows, length, width = s.batch
        lines += [
            f"{s.stage}: batch {rows} x {length} tokens ({width} target slots a row), "
            f"grad_accum {s.grad_accum}, {s.trainable_params:,} trained parameters "
            f"(compiled in {s.compile_seconds:.0f} s)",
            f"  per device: parameters {_b(s.param_bytes)}, optimizer state {_b(s.opt_bytes)}, "
            f"batch {_b(s.batch_bytes)}, temporaries {_b(s.temp_bytes)}, peak "
            f"{_b(s.peak_bytes)} ({100 * s.peak_bytes / hbm:.0f}% of {hbm / _GiB:.0f} GiB)"
            + (f"; sampled peaks {', '.join(map(_b, s.sampled_peaks))}" if s.sampled_peaks else ""),
            f"  per device per step: {s.flops:.3e} FLOPs, {_b(s.bytes_accessed)} accessed",
        ]
        for c in s.collectives or [{"kind": "none"}]:
            if c["kind"] == "none":
                lines.append("  collectives: none")
                continue
            lines.append(
                f"  {c['kind']} over {c['group_size']} devices: {c['instructions']} ops, "
                f"{c['executions']} runs, operands {_b(c['operand_bytes'])}, "
                f"sent {_b(c['traffic_bytes'])}"
            )
        lines.append(
            f"  estimated step on {acc.name}: {_t(t['step_s'])} = max(compute "
            f"{_t(t['compute_s'])}, HBM {_t(t['memory_s'])}) + collectives {_t(t['comm_s'])}"
        )
    lines.append(ASSUMPTIONS)
    return "\n".join(lines)


#: What the estimate assumes, printed under every plan.
ASSUMPTIONS = (
    "assumptions: memory and FLOPs are XLA:CPU's analysis of the same SPMD program (TPU/GPU "
    "compilers fuse differently; temporaries are an estimate); time = max(FLOPs at the bf16 "
    "peak, bytes accessed at the HBM bandwidth) + collectives' ring traffic at the per-chip "
    "link bandwidth, not overlapped; float32 matmuls run slower than the bf16 peak."
)


def plan_json(cfg: PlanConfig, about: dict, stages: Sequence[StagePlan]) -> dict[str, Any]:
    """The plan as JSON-ready values (what ``plan.output`` writes)."""
    acc = ACCELERATORS[cfg.plan.accelerator]
    return {
        **about,
        "accelerator": asdict(acc),
        "hbm_bytes": _hbm(cfg),
        "stages": [{**asdict(s), "estimate": estimate(s, acc)} for s in stages],
        "assumptions": ASSUMPTIONS,
    }


def write_json(path: str, data: dict) -> None:
    """Writes the plan's JSON atomically."""
    from gti_jax.io.atomic import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))
