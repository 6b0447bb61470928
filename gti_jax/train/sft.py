"""The fine-tuning (SFT) stage of a run, and its learning curve (``eval.curve_every``).

The compiled step is :class:`gti_jax.train.steps.SFTStep`; the loop, the NaN guard and the
checkpoints are :func:`gti_jax.train.loop.train_loop`'s.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from flax import nnx

from gti_jax.train.config import TrainConfig
from gti_jax.train.loop import (
    NanGuard,
    StageContext,
    compute_dtype,
    guard_optimizer,
    log_line,
    train_loop,
)
from gti_jax.train.lora import apply_lora, merge_lora
from gti_jax.train.runlog import atomic_write_text
from gti_jax.train.steps import SFTStep, inner_opt_state, make_sft_step, sft_optimizer
from gti_jax.train.validate import Validation

__all__ = ["learning_curve", "sft_model_from_config", "sft_stage", "sft_step_from_config"]


def learning_curve(ctx: StageContext, step_fn, units: np.ndarray, start: int):
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
        t0 = time.perf_counter()
        # every process ranks the sharded model (each compiled call is a collective)
        metrics, ranks = ev.retrieval(step_fn.merge(st))
        if step == cfg.sft.steps:  # the final evaluation reuses the ranking of the last point
            ev.remember_retrieval(metrics, ranks, f"curve.jsonl step {step}, before the LoRA merge")
        if not ctx.writer:
            return
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
        ctx.log.scalars("curve", row, step)  # TensorBoard / W&B, when configured
        log_line(
            f"curve: step {step}, {row['targets_seen']} targets, {row['train_seconds']:.0f}s: "
            + ", ".join(
                f"{k} {metrics[k]:.4f}" for k in metrics if k.startswith(("recall@", "ndcg@"))
            )
        )

    return after_step


def sft_model_from_config(cfg: TrainConfig, model: nnx.Module) -> nnx.Module:
    """The model fine-tuning trains: `model` with LoRA adapters when ``sft.lora_rank > 0``
    (the stage and :mod:`gti_jax.plan`, which calls it inside `nnx.eval_shape`, share it)."""
    if cfg.sft.lora_rank <= 0:
        return model
    return apply_lora(
        model,
        rank=cfg.sft.lora_rank,
        alpha=cfg.sft.lora_alpha,
        dropout=cfg.sft.lora_dropout,
        targets=cfg.sft.lora_targets,
        rngs=nnx.Rngs(cfg.seed + 11),
    )


def sft_step_from_config(cfg: TrainConfig, model: nnx.Module, *, mesh, rules) -> SFTStep:
    """The fine-tuning step a run builds from its config (``sft.*``, ``compute.*``) for the
    model of :func:`sft_model_from_config`: one place for the stage and the planner
    (:mod:`gti_jax.plan`, which builds it on an abstract model and compiles it unrun)."""
    return make_sft_step(
        model,
        guard_optimizer(sft_optimizer(cfg.sft)),
        lora=cfg.sft.lora_rank > 0,
        compute_dtype=compute_dtype(cfg.sft.compute_dtype),
        grad_accum=cfg.sft.grad_accum,
        mesh=mesh,
        rules=rules,
        compute=cfg.compute,
    )


def sft_stage(ctx: StageContext, model, examples, units=None):
    """The fine-tuning stage of a run: ``sft.steps`` steps, full or LoRA (merged at the end),
    resumed from the newest fine-tuning checkpoint; the learning curve when asked.

    Returns:
      The fine-tuned model.
    """
    cfg, ckpt, log, mesh, rules = ctx.cfg, ctx.ckpt, ctx.log, ctx.mesh, ctx.rules
    latest_meta = ctx.latest_meta

    S, G = cfg.sft.steps, cfg.ground.steps
    t0 = time.perf_counter()
    lora = cfg.sft.lora_rank > 0
    model = sft_model_from_config(cfg, model)
    step_fn = sft_step_from_config(cfg, model, mesh=mesh, rules=rules)
    st = step_fn.init(model)
    start, resumed_meta = 0, None
    if latest_meta is not None and latest_meta.get("stage") == "sft":
        restored, resumed_meta = ckpt.restore(
            ctx.latest, target={"trainable": st.trainable, "opt": st.opt_state}
        )
        st = st._replace(trainable=restored["trainable"], opt_state=restored["opt"])
        start = int(resumed_meta["step"])
        log_line(f"resumed fine-tuning at step {start}/{S} from {ckpt.directory}")
    log.truncate_metrics("sft", start)
    log.truncate_metrics("valid", start)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    guard = NanGuard(cfg, "sft", G, resumed_meta)
    units = np.ones(len(examples), np.int64) if units is None else np.asarray(units, np.int64)
    val = Validation(ctx, step_fn, resumed_meta)
    try:
        if not val.stopped_early:  # a stage that stopped early and was resumed is done
            st = train_loop(
                ctx,
                "sft",
                st,
                lambda st, batch, step: step_fn(st, batch, jax.random.fold_in(key, step)),
                tree=lambda st: {"trainable": st.trainable, "opt": st.opt_state},
                opt_state_of=lambda st: inner_opt_state(st.opt_state),
                total=S,
                offset=G,
                start=start,
                examples=examples,
                batch_size=cfg.sft.batch_size,
                data_seed=cfg.seed + 1,
                guard=guard,
                last_saved=G + start if start else (G or None),  # grounding ends with one
                after_step=_both(learning_curve(ctx, step_fn, units, start), val.after_step),
                extra_meta=val.meta,
                train_seconds=float((resumed_meta or {}).get("train_seconds", 0.0)),
                cpu_seconds=float((resumed_meta or {}).get("cpu_seconds", 0.0)),
            )
        best = val.restore_best(st)
        if best is not st and ctx.evaluator is not None:
            ctx.evaluator.forget_retrieval()  # the curve's last ranking was of another model
        st = best
    finally:
        val.close()
    model = step_fn.merge(st)
    if lora:
        model = merge_lora(model)
    info = {**guard.row(), **guard.meta(), **val.record()}
    log.finish("sft", time.perf_counter() - t0, steps=S, **info)
    return model


def _both(first, second):
    """One ``after_step`` running `first` (may be None) then `second`; True ends the stage."""
    if first is None:
        return second

    def after_step(*args):
        first(*args)
        return second(*args)

    return after_step
