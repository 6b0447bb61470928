"""Jitted training steps: the masked LM loss, gradient accumulation, optimizers, SFT steps.

The supervised fine-tuning (SFT) step trains either every parameter (full fine-tune) or the
LoRA factors plus the embedding (and an untied head), as in the GTI paper's appendix. The
model is split once into a *trainable* and a *frozen* `nnx.State`; gradients and optimizer
state exist only for the trainable part, and the frozen part is an argument of the compiled
step that is never updated (nor copied).

Both stages (this SFT step and the grounding step of `gti_jax.train.ground`) share:

* :class:`CompiledStep`: the compiled step itself (jit, donation, shardings, trace count);

* :func:`masked_lm_loss`: next-token cross-entropy in float32 over the loss-mask tokens,
  returned as ``(sum, count)`` so that micro-batches and devices combine exactly;
  :func:`hidden_lm_loss` is the same loss from final hidden states, projecting to the
  vocabulary only at the target positions (``Batch.targets``) when the batch lists them;
* :func:`accumulate_grads`: gradient accumulation over ``grad_accum`` micro-batches with a
  `lax.scan` (one compiled body), normalized by the token count of the whole batch;
* :func:`lr_schedule`: linear warm-up then cosine decay (or constant);
* placement: with a mesh, parameters are sharded by the model's logical axis names
  (`gti_jax.models.sharding.state_shardings`), optimizer moments like their parameters, the
  batch on its batch dimension over the rules' ``batch`` axes (``("data", "fsdp")``), and the
  compiled step keeps every sharding (jit ``in_shardings``/``out_shardings``).

Example:
    >>> tx = sft_optimizer(SFTConfig(steps=10))
    >>> sft = make_sft_step(model, tx, lora=False)  # doctest: +SKIP
    >>> state = sft.init(model)  # doctest: +SKIP
    >>> state, metrics = sft(state, batcher.batch_at(0))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gti_jax.errors import BadInput
from gti_jax.models.llama import configure_compute
from gti_jax.models.sharding import (
    LOGICAL_RULES,
    Rules,
    logical_to_spec,
    shard_activations,
    state_shardings,
)
from gti_jax.train.config import ComputeConfig, SFTConfig
from gti_jax.train.data import Batch
from gti_jax.train.xent import VocabHead, ce_sums, chunked_ce_sums, loss_chunk_size, model_head

__all__ = [
    "CompiledStep",
    "MasterState",
    "SFTState",
    "SFTStep",
    "StepError",
    "accumulate_grads",
    "adamw_optimizer",
    "batch_sharding",
    "batch_shards",
    "cast_params",
    "current_lr",
    "inner_opt_state",
    "hidden_lm_loss",
    "loss_chunk_of",
    "lr_schedule",
    "make_sft_step",
    "masked_lm_loss",
    "model_lm_loss",
    "opt_state_shardings",
    "param_dtype_of",
    "put_batch",
    "set_compute",
    "set_compute_dtype",
    "sft_optimizer",
    "trainable_filter",
]

Metrics = dict[str, jax.Array]


class StepError(BadInput):
    """A training step cannot be built or run as asked (one line naming the fix)."""


# --------------------------------------------------------------------------------------------
# Loss and gradients.
# --------------------------------------------------------------------------------------------


def masked_lm_loss(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over target tokens, in float32.

    Position ``t`` of `logits` predicts token ``t + 1``; token ``t + 1`` counts when
    ``loss_mask[:, t + 1]`` is set.

    Args:
        logits: ``[B, T, V]`` logits.
        input_ids: ``[B, T]`` token ids.
        loss_mask: ``[B, T]`` weights (1 on targets).

    Returns:
        ``(loss_sum, num_targets)``, float32 scalars; the mean is their ratio.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> s, n = masked_lm_loss(logits, jnp.array([[0, 1, 2]]), jnp.array([[0., 1., 1.]]))
        >>> round(float(s / n), 4), float(n)  # uniform over 4 classes: log 4
        (1.3863, 2.0)
    """
    return ce_sums(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def hidden_lm_loss(
    h: jax.Array,
    batch: Batch,
    head: Callable[[jax.Array], jax.Array],
    *,
    vocab: VocabHead | None = None,
    loss_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """:func:`masked_lm_loss` from final hidden states ``[B, T, D]`` and a vocabulary head.

    With ``batch.targets`` (``[B, L]`` positions, -1 = none) the head runs on the ``L``
    gathered positions only, so the ``[., D] x [D, V]`` projection and its gradient cost
    ``L / T`` of the full one (completions are short: a few semantic-ID tokens after a long
    prompt); the result equals the full computation. Without it, every position is projected.

    With `vocab` (the same head by columns) the logits are computed in chunks of columns when
    :func:`gti_jax.train.xent.loss_chunk_size` says so (``compute.loss_chunk``; automatic past
    256 MiB of logits), so no ``[targets, V]`` buffer is ever built; the sums equal the
    unchunked ones up to float32 rounding.

    Args:
        h: final hidden states.
        batch: the batch (``input_ids``, ``loss_mask`` and optionally ``targets``).
        head: ``[B, L, D] -> [B, L, V]`` logits (e.g. ``model.logits``).
        vocab: `head` as a :class:`~gti_jax.train.xent.VocabHead`, for the chunked loss.
        loss_chunk: ``compute.loss_chunk`` (0: automatic).

    Returns:
        ``(loss_sum, num_targets)``, float32 scalars.

    Example:
        >>> b = Batch(jnp.array([[0, 1, 2]]), jnp.array([[0., 1., 1.]]), None, jnp.array([[0, 1]]))
        >>> s, n = hidden_lm_loss(jnp.zeros((1, 3, 2)), b, lambda x: jnp.zeros((*x.shape[:2], 4)))
        >>> round(float(s / n), 4), float(n)
        (1.3863, 2.0)
    """
    if batch.targets is None:
        picked_h = h[:, :-1]
        targets, weights = batch.input_ids[:, 1:], batch.loss_mask[:, 1:]
    else:
        pos = batch.targets.astype(jnp.int32)
        valid = pos >= 0
        pos = jnp.maximum(pos, 0)
        picked_h = jnp.take_along_axis(h, pos[..., None], axis=1)
        targets = jnp.take_along_axis(batch.input_ids.astype(jnp.int32), pos + 1, axis=1)
        weights = jnp.take_along_axis(batch.loss_mask.astype(jnp.float32), pos + 1, axis=1)
        weights = jnp.where(valid, weights, 0.0)
    if vocab is not None:
        chunk = loss_chunk_size(math.prod(targets.shape), vocab.num_cols, loss_chunk)
        if chunk:
            return chunked_ce_sums(picked_h, targets, weights, vocab, chunk)
    if batch.targets is None:  # the logits of every position, as before (bitwise)
        return masked_lm_loss(head(h), batch.input_ids, batch.loss_mask)
    return ce_sums(head(picked_h), targets, weights)


def model_lm_loss(
    model: nnx.Module, batch: Batch, *, loss_chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """:func:`hidden_lm_loss` of a gti_jax causal LM on `batch` (the SFT and eval loss)."""
    h, _ = model.hidden_states(model.embed(batch.input_ids), attention_mask=batch.attention_mask)
    return hidden_lm_loss(h, batch, model.logits, vocab=model_head(model), loss_chunk=loss_chunk)


def accumulate_grads(
    loss_fn: Callable[..., tuple[jax.Array, jax.Array]],
    params: Any,
    batch: Any,
    grad_accum: int = 1,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, Any]:
    """Gradients of a summed loss over `grad_accum` micro-batches, normalized per target token.

    The batch (every leaf ``[B, ...]``) is split into micro-batches of rows ``a, a + A,
    a + 2A, ...`` (strided, so a batch sharded on rows stays balanced), the summed loss and
    its gradient are accumulated with `lax.scan`, and both are divided by the number of target
    tokens in the whole batch: the result equals the one-shot gradient of the mean loss.

    Args:
        loss_fn: ``(params, micro_batch, key) -> (loss_sum, num_targets)``.
        params: the differentiated pytree.
        batch: a pytree of ``[B, ...]`` arrays.
        grad_accum: number of micro-batches ``A`` (must divide ``B``).
        key: optional PRNG key; micro-batch ``a`` gets ``split(key, A)[a]``.

    Returns:
        ``(mean_loss, num_targets, grads)``.

    Example:
        >>> f = lambda p, b, k: (jnp.sum(p * b), jnp.float32(b.size))
        >>> loss, n, g = accumulate_grads(f, jnp.float32(2.0), jnp.ones(4), grad_accum=2)
        >>> float(loss), float(n), float(g)
        (2.0, 4.0, 1.0)
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (total, count), grads = grad_fn(params, batch, key)
    else:

        def split(x):
            return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

        micro = jax.tree.map(split, batch)
        keys = None if key is None else jax.random.split(key, grad_accum)

        def body(carry, xs):
            mb, k = xs
            (s, n), g = grad_fn(params, mb, k)
            total, count, acc = carry
            return (total + s, count + n, jax.tree.map(jnp.add, acc, g)), None

        # float32 sums even for bfloat16 parameters (compute.param_dtype): adding A
        # micro-batch gradients in bf16 would round each partial sum to 8 bits
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, "f4")), params)
        init = (jnp.float32(0), jnp.float32(0), zeros)
        (total, count, grads), _ = jax.lax.scan(body, init, (micro, keys))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    return total / denom, count, grads


def set_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
    """Sets the compute dtype of every submodule that has one (in place; returns `model`).

    Use on a freshly merged model inside a step: parameters keep their dtype, matmuls run in
    `dtype`, logits stay float32.
    """
    if dtype is None:
        return model
    dtype = jnp.dtype(dtype).type
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = dtype
    return model


def cast_params(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating-point leaf cast to `dtype` (new arrays, even when the dtype
    is already `dtype`, so donating the result never invalidates the input); integer leaves
    (counters, keys) pass through.

    Example:
        >>> t = cast_params({"w": jnp.ones(2), "n": jnp.int32(3)}, jnp.bfloat16)
        >>> str(t["w"].dtype), str(t["n"].dtype)
        ('bfloat16', 'int32')
    """

    def one(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.array(x, dtype, copy=True)
        return x

    return jax.tree.map(one, tree)


class MasterState(NamedTuple):
    """The optimizer state of parameters kept in a low precision (``compute.param_dtype``).

    The step differentiates the bfloat16 parameters the forward pass reads, casts the
    gradients to float32, runs the optimizer on the float32 `master` copy and writes the
    parameters back as ``master.astype(bfloat16)``. Why a master copy rather than applying
    float32 updates to bfloat16 parameters: bfloat16 keeps 8 significant bits, so an update
    below half a unit in the last place (2**-9 to 2**-8 of the weight) rounds away. Adam
    moves a weight by about the learning rate: at 1e-5 a weight of 0.02 (a relative step of
    2**-11) would never move, at 1e-4 (2**-7.6) only in coarse steps, and the cosine decays
    the rate further; the master accumulates every update. The cost is 4 bytes per trained
    parameter (bf16 2 + master 4 + Adam 8 = 14 bytes instead of 16); the saving is in what is
    not trained (LoRA's and grounding's frozen backbone: 2 bytes instead of 4) and in the
    bandwidth of every forward pass.

    Attributes:
        master: float32 copy of the trainable parameters (same tree).
        inner: the optimizer's state over `master`.
    """

    master: Any
    inner: Any


def inner_opt_state(opt_state: Any) -> Any:
    """The optimizer's own state (what `guard_optimizer` and `current_lr` read), unwrapped
    from a :class:`MasterState` when the parameters are kept in bfloat16."""
    return opt_state.inner if isinstance(opt_state, MasterState) else opt_state


def loss_chunk_of(compute: ComputeConfig | None) -> int:
    """Vocabulary columns per chunk of the loss (``compute.loss_chunk``; 0: automatic)."""
    return 0 if compute is None else int(compute.loss_chunk)


def param_dtype_of(compute: ComputeConfig | None) -> Any:
    """The dtype parameters are kept in during training (``compute.param_dtype``)."""
    name = "float32" if compute is None else compute.param_dtype
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def set_compute(
    model: nnx.Module,
    compute: ComputeConfig | None,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_RULES,
) -> nnx.Module:
    """Sets ``compute.attention`` and ``compute.remat`` on `model`'s modules, and with a mesh
    the activation sharding constraints (in place; returns it; None leaves each as it is).

    All are static attributes (`gti_jax.models.llama.configure_compute`,
    `gti_jax.models.sharding.shard_activations`), so they live in the graph definition: a step
    sets them on a model it merged from the caller's arrays (new module objects; the caller's
    model is not modified) and splits again, and every model it merges from that graph
    definition computes that way. The constraints keep the batch dimension of the activations
    on the batch mesh axes; without them the partitioner may keep fsdp-sharded weights in
    place and have every device hold the whole global batch's activations.
    """
    if mesh is not None:
        shard_activations(model, mesh, rules)
    if compute is None:
        return model
    return configure_compute(model, attention=compute.attention, remat=compute.remat)


# --------------------------------------------------------------------------------------------
# Optimizers.
# --------------------------------------------------------------------------------------------


def lr_schedule(
    peak: float,
    total_steps: int,
    warmup_steps: int = 0,
    *,
    kind: Literal["cosine", "constant"] = "cosine",
    end_ratio: float = 0.1,
) -> optax.Schedule:
    """Linear warm-up to `peak`, then cosine decay to ``end_ratio * peak`` (or constant).

    Warm-up step ``s < warmup_steps`` uses ``peak * (s + 1) / (warmup_steps + 1)`` (never 0,
    so no step is wasted); the cosine runs from the end of the warm-up to `total_steps`.

    Args:
        peak: the peak learning rate.
        total_steps: optimizer steps of the stage.
        warmup_steps: warm-up steps.
        kind: "cosine" or "constant" after the warm-up.
        end_ratio: final learning rate as a fraction of the peak (cosine).

    Returns:
        An optax schedule ``step -> learning rate``.

    Example:
        >>> f = lr_schedule(1.0, 10, 1)
        >>> float(f(0)), float(f(1)), round(float(f(10)), 3)
        (0.5, 1.0, 0.1)
    """
    if kind not in ("cosine", "constant"):
        raise StepError(f"schedule kind must be 'cosine' or 'constant', got {kind!r}")
    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)
    end = peak * end_ratio

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        ramp = peak * (c + 1.0) / (warm + 1.0)
        if kind == "constant":
            after = jnp.float32(peak)
        else:
            progress = jnp.clip((c - warm) / max(total - warm, 1), 0.0, 1.0)
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(c < warm, ramp, after)

    return schedule


def adamw_optimizer(
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    schedule: Literal["cosine", "constant"] = "cosine",
    decay_matrices_only: bool = True,
) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (optional) then AdamW with :func:`lr_schedule`.

    Args:
        lr: peak learning rate.
        total_steps: steps of the stage (for the cosine).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decoupled weight decay.
        clip_norm: clip gradients to this global norm; None: no clipping.
        schedule: "cosine" or "constant".
        decay_matrices_only: apply weight decay to parameters with >= 2 dims only (not to
            norm scales and biases).

    Returns:
        The optax transformation.

    Example:
        >>> tx = adamw_optimizer(1e-3, 100, warmup_steps=10, clip_norm=1.0)
        >>> state = tx.init({"w": jnp.zeros((2, 2))})
    """
    mask = (lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p)) if decay_matrices_only else None
    # inject_hyperparams keeps the learning rate of the last update in the state
    # (`opt_state[...].hyperparams["learning_rate"]`, see `current_lr`) for logging.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr_schedule(lr, total_steps, warmup_steps, kind=schedule),
        weight_decay=weight_decay,
        mask=mask if weight_decay else None,
    )
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def current_lr(opt_state: Any) -> float:
    """The learning rate of the last update of an optimizer from :func:`adamw_optimizer`.

    Example:
        >>> tx = adamw_optimizer(1.0, 10, warmup_steps=1)
        >>> current_lr(tx.init({"w": jnp.zeros(2)}))  # before any update: the step-0 rate
        0.5
    """
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        if hasattr(node, "hyperparams") and "learning_rate" in node.hyperparams:
            return float(node.hyperparams["learning_rate"])
    return float("nan")


def sft_optimizer(
    cfg: SFTConfig,
    total_steps: int | None = None,
    *,
    schedule: Literal["cosine", "constant"] = "cosine",
) -> optax.GradientTransformation:
    """The fine-tuning optimizer from the ``sft.*`` config: clip, AdamW, warm-up + cosine.

    Args:
        cfg: the SFT section of the config (`lr`, `warmup_steps`, `weight_decay`,
            `clip_norm`).
        total_steps: steps of the stage; default ``cfg.steps``.
        schedule: "cosine" or "constant" after the warm-up.

    Returns:
        The optax transformation (weight decay on matrices only).

    Example:
        >>> tx = sft_optimizer(SFTConfig(steps=100, lr=1e-4))
    """
    return adamw_optimizer(
        cfg.lr,
        cfg.steps if total_steps is None else total_steps,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_norm,
        schedule=schedule,
    )


# --------------------------------------------------------------------------------------------
# Placement.
# --------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """The sharding of ``[B, T]`` batch arrays: rows over the rules' ``batch`` mesh axes.

    Example:
        >>> from gti_jax.models.sharding import make_mesh
        >>> batch_sharding(make_mesh({"data": 1}, devices=jax.devices()[:1])).spec
        P(None, None)
    """
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules, mesh))


def put_batch(batch: Batch, sharding: NamedSharding | None = None) -> Batch:
    """Places a batch for a step: numpy rows of this process -> one global array per field.

    With a sharding, each process passes its own rows (``Batcher.batch_at`` slices) and gets
    global ``[B, T]`` arrays (`jax.make_array_from_process_local_data`); on one process this
    is a plain sharded `device_put`. Arrays that are already `jax.Array`s pass through.

    Args:
        batch: a :class:`~gti_jax.train.data.Batch` of numpy (or jax) arrays.
        sharding: the batch sharding (:func:`batch_sharding`), or None for the default device.

    Returns:
        The batch of `jax.Array`s.

    Example:
        >>> b = put_batch(Batch(np.zeros((2, 4), np.int32), np.zeros((2, 4), np.float32),
        ...                     np.ones((2, 4), np.int32)))
        >>> b.input_ids.shape
        (2, 4)
    """

    def one(x):
        if x is None or isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        if sharding is None:
            return jnp.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x)

    return Batch(*(one(x) for x in batch))


def opt_state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Shardings of ``tx.init(params)``: moments like their parameters, the rest replicated."""
    abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


def batch_shards(mesh: Mesh | None, rules: Rules = LOGICAL_RULES) -> int:
    """How many ways a batch's rows are split over `mesh` (the rules' ``batch`` axes; 1 with
    no mesh): every batch and micro-batch must split evenly.

    Example:
        >>> batch_shards(None)
        1
    """
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch", "seq"), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


class CompiledStep:
    """The compiled-step mechanism both training stages are built on (:class:`SFTStep` and
    :class:`gti_jax.train.ground.GroundStep`).

    It compiles, once per batch shape, an optimizer step over ``(params, frozen, opt_state,
    batch, extra)`` and an evaluation over ``(params, frozen, batch)``, from the stage's loss
    ``loss(params, frozen, micro_batch, key_or_extra) -> (loss_sum, num_targets)``: gradients
    accumulated over ``grad_accum`` micro-batches (:func:`accumulate_grads`), then the
    optimizer update. `params` and `opt_state` are donated, `frozen` is an argument (never a
    baked-in constant, never updated). With a mesh, every input and output keeps its
    sharding (``in_shardings``/``out_shardings``): the params' as given, the optimizer
    moments like their parameters, the batch on its rows. The compiled functions live on the
    object (no module-level cache); :attr:`traces` counts the step's compilations.

    Args:
        loss: the stage's summed loss (above); `evaluate(params, frozen, batch)` its
            evaluation sums.
        tx: the optimizer.
        grad_accum: micro-batches per optimizer step.
        mesh, rules: the device mesh (None: one device) and logical axis rules.
        param_shardings, frozen_shardings: with a mesh, the shardings of `params` and
            `frozen`; `abstract_params` (shapes) places the optimizer state.
        keyed: ``extra`` is a PRNG key, split over the micro-batches and passed to `loss`
            (SFT dropout); otherwise it is a static Python value passed to `loss` as is
            (grounding's gradient-free prefix), compiled once per value.
        master: the params are kept in a low precision (``compute.param_dtype``) and the
            optimizer state is a :class:`MasterState`: float32 gradients, float32 update
            math on the master copy, params written back as the master cast to their dtype.
    """

    def __init__(
        self,
        loss: Callable[..., tuple[jax.Array, jax.Array]],
        evaluate: Callable[..., tuple[jax.Array, jax.Array]],
        tx: optax.GradientTransformation,
        *,
        grad_accum: int,
        mesh: Mesh | None,
        rules: Rules,
        keyed: bool,
        param_shardings: Any = None,
        frozen_shardings: Any = None,
        abstract_params: Any = None,
        master: bool = False,
    ):
        self.tx, self.mesh, self.rules, self.grad_accum = tx, mesh, rules, int(grad_accum)
        self.traces = 0
        self.master = bool(master)
        grad_accum = self.grad_accum

        def step(params, frozen, opt_state, batch, extra):
            self.traces += 1
            if keyed:
                f = lambda p, b, k: loss(p, frozen, b, k)  # noqa: E731
                key = extra
            else:
                f = lambda p, b, k: loss(p, frozen, b, extra)  # noqa: E731
                key = None
            value, count, grads = accumulate_grads(f, params, batch, grad_accum, key)
            if master:
                params, opt_state, grads = _master_update(tx, params, opt_state, grads)
            else:
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "tokens": count}
            return params, opt_state, metrics

        static = () if keyed else (4,)
        if mesh is None:
            self._param_sh = self._opt_sh = self._batch_sh = None
            self._step = jax.jit(step, donate_argnums=(0, 2), static_argnums=static)
            self._eval = jax.jit(evaluate)
            self._init = _master_init(tx) if master else tx.init
        else:
            self._param_sh = param_shardings
            self._opt_sh = opt_state_shardings(tx, abstract_params, param_shardings, mesh)
            if master:
                self._opt_sh = MasterState(param_shardings, self._opt_sh)
            self._batch_sh = batch_sharding(mesh, rules)
            repl = NamedSharding(mesh, PartitionSpec())
            batch_sh = self._batch_sh  # a prefix: every field of the batch, targets or not
            ins = (param_shardings, frozen_shardings, self._opt_sh, batch_sh)
            self._step = jax.jit(
                step,
                in_shardings=ins + ((repl,) if keyed else ()),
                out_shardings=(param_shardings, self._opt_sh, repl),
                donate_argnums=(0, 2),
                static_argnums=static,
            )
            self._eval = jax.jit(
                evaluate,
                in_shardings=(param_shardings, frozen_shardings, batch_sh),
                out_shardings=(repl, repl),
            )
            self._init = jax.jit(
                _master_init(tx) if master else tx.init, out_shardings=self._opt_sh
            )
        self._shards = batch_shards(mesh, rules)

    @property
    def batch_sharding(self) -> NamedSharding | None:
        """The batch's sharding on the mesh (None without one)."""
        return self._batch_sh

    def place(self, params: Any) -> tuple[Any, Any]:
        """`params` placed (on the mesh when there is one) and their initial optimizer state."""
        if self.mesh is None:
            return params, self._init(params)
        params = jax.device_put(params, self._param_sh)
        return params, self._init(params)

    def check_batch(self, batch: Batch) -> None:
        """Raises StepError unless the batch's rows split into ``grad_accum`` micro-batches and
        over the mesh's batch shards."""
        b = np.shape(batch.input_ids)[0]
        if not isinstance(batch.input_ids, jax.Array):
            b *= jax.process_count()  # numpy rows are this process's part of the global batch
        if b % self.grad_accum:
            raise StepError(
                f"batch of {b} rows is not divisible by grad_accum={self.grad_accum}; make "
                "batch_size a multiple of grad_accum"
            )
        if b % self._shards:
            raise StepError(
                f"batch of {b} rows does not divide over the {self._shards} batch shards of the "
                f"mesh; make batch_size a multiple of {self._shards}"
            )

    def apply(self, params: Any, frozen: Any, opt_state: Any, batch: Batch, extra: Any):
        """One compiled step on a checked batch: ``(params, opt_state, metrics)``."""
        return self._step(params, frozen, opt_state, put_batch(batch, self._batch_sh), extra)

    def eval_sums(self, params: Any, frozen: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """``(loss_sum, num_targets)`` of one batch."""
        return self._eval(params, frozen, put_batch(batch, self._batch_sh))

    def lower(
        self, params: Any, frozen: Any, batch: Batch, extra: Any, opt_state: Any = None
    ) -> jax.stages.Lowered:
        """The step lowered for these arguments without running it: for ahead-of-time planning
        (:mod:`gti_jax.plan` compiles it for a mesh of fake devices and reads its memory, FLOPs
        and collectives) and to read what an option such as ``compute.remat`` saves
        (``.compile().memory_analysis()``).

        Every argument may be abstract (`jax.ShapeDtypeStruct`); `opt_state` defaults to the
        abstract ``init(params)``; a concrete batch is placed as a step would place it.
        Nothing is donated (lowering traces the step, which :attr:`traces` counts).
        """
        if opt_state is None:
            opt_state = jax.eval_shape(self._init, params)
        if not isinstance(batch.input_ids, jax.ShapeDtypeStruct):
            batch = put_batch(batch, self._batch_sh)
        return self._step.lower(params, frozen, opt_state, batch, extra)


def _master_init(tx: optax.GradientTransformation) -> Callable[[Any], MasterState]:
    """``params -> MasterState(float32 copy, tx.init(copy))``."""

    def init(params):
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterState(master, tx.init(master))

    return init


def _master_update(tx, params, opt_state: MasterState, grads):
    """One optimizer update on the float32 master copy (see :class:`MasterState`); returns
    ``(params in their dtype, new MasterState, float32 grads)``."""
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, inner = tx.update(grads, opt_state.inner, opt_state.master)
    master = optax.apply_updates(opt_state.master, updates)
    params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
    return params, MasterState(master, inner), grads


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning.
# --------------------------------------------------------------------------------------------


class SFTState(NamedTuple):
    """The state of a fine-tuning run (a pytree; checkpoint it whole).

    Attributes:
        trainable: `nnx.State` of the trained variables (all params, or LoRA + embed + head).
        frozen: `nnx.State` of everything else (never updated by the step).
        opt_state: the optimizer state of `trainable`.
    """

    trainable: Any
    frozen: Any
    opt_state: Any


def _has_lora(model: nnx.Module) -> bool:
    from gti_jax.train.lora import LoRAParam

    return any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(model))


def _active_dropout(model: nnx.Module) -> bool:
    from gti_jax.train.lora import LoRA

    return any(isinstance(m, LoRA) and m.dropout > 0 for _, m in nnx.iter_modules(model))


def _train_mode(model: nnx.Module, key: jax.Array) -> None:
    from gti_jax.train.lora import set_dropout_keys

    set_dropout_keys(model, key)


def trainable_filter(lora: bool) -> nnx.filterlib.Filter:
    """What trains: every `nnx.Param` (full), or LoRA factors + embedding + untied head."""
    if not lora:
        return nnx.Param
    from gti_jax.train.lora import LoRAParam

    return nnx.All(
        nnx.Param, nnx.Any(LoRAParam, nnx.PathContains("embed"), nnx.PathContains("lm_head"))
    )


class SFTStep(CompiledStep):
    """A compiled fine-tuning step; build it with :func:`make_sft_step`.

    Attributes:
        graphdef: the model's graph definition (``nnx.merge(graphdef, trainable, frozen)``).
        lora: whether only LoRA factors, the embedding and the head train.
        mesh: the mesh, or None (single device).
        traces: how many times the step was traced (compiled): once per batch shape.
    """

    def __init__(self, model, tx, *, lora, compute_dtype, grad_accum, mesh, rules, compute=None):
        if grad_accum < 1:
            raise StepError(f"grad_accum must be >= 1, got {grad_accum}")
        if lora and not _has_lora(model):
            raise StepError(
                "lora=True but the model has no LoRA adapters; call "
                "gti_jax.train.lora.apply_lora(model, ...) first"
            )
        self.lora = lora
        self.compute_dtype = compute_dtype
        self.param_dtype = param_dtype_of(compute)
        self.dropout = _active_dropout(model)
        self._filter = trainable_filter(lora)
        self.graphdef, trainable, frozen = nnx.split(model, self._filter, ...)
        if not jax.tree.leaves(trainable):
            raise StepError("the model has no trainable parameters")
        if compute is not None or mesh is not None:  # they live in the graph definition
            configured = set_compute(
                nnx.merge(self.graphdef, trainable, frozen), compute, mesh, rules
            )
            self.graphdef = nnx.split(configured, self._filter, ...)[0]
        graphdef = self.graphdef
        dropout = self.dropout
        loss_chunk = loss_chunk_of(compute)

        def loss_sums(trainable, frozen, batch, key, train):
            model = nnx.merge(graphdef, trainable, frozen)
            set_compute_dtype(model, compute_dtype)
            if train and dropout:
                _train_mode(model, key)
            return model_lm_loss(model, batch, loss_chunk=loss_chunk)

        shardings = {}
        if mesh is not None:
            shardings = dict(
                param_shardings=state_shardings(trainable, mesh, rules),
                abstract_params=trainable,
            )
            self._frozen_sh = state_shardings(frozen, mesh, rules)
        super().__init__(
            lambda p, fr, b, k: loss_sums(p, fr, b, k, True),
            lambda p, fr, b: loss_sums(p, fr, b, None, False),
            tx,
            grad_accum=grad_accum,
            mesh=mesh,
            rules=rules,
            keyed=True,
            frozen_shardings=None if mesh is None else self._frozen_sh,
            master=self.param_dtype != jnp.float32,
            **shardings,
        )

    def init(self, model: nnx.Module) -> SFTState:
        """Splits `model` (same structure as at build time), places it, and inits the optimizer.

        Args:
            model: the model to fine-tune (after `apply_lora` for LoRA).

        Returns:
            The initial :class:`SFTState`, sharded on the mesh when there is one. With
            ``compute.param_dtype`` bfloat16, the parameters (trained and frozen) are cast to
            it and the optimizer state is a :class:`MasterState`.
        """
        _, trainable, frozen = nnx.split(model, self._filter, ...)
        # A copy: the step donates the trainable buffers, the model's arrays must survive.
        if self.param_dtype == jnp.float32:
            trainable = jax.tree.map(jnp.copy, trainable)
        else:  # compute.param_dtype: everything kept in it, the optimizer's master in float32
            trainable, frozen = cast_params((trainable, frozen), self.param_dtype)
        trainable, opt_state = self.place(trainable)
        if self.mesh is not None:
            frozen = jax.device_put(frozen, self._frozen_sh)
        return SFTState(trainable, frozen, opt_state)

    def __call__(
        self, state: SFTState, batch: Batch, key: jax.Array | None = None
    ) -> tuple[SFTState, Metrics]:
        """One optimizer step.

        Args:
            state: the current state (its `trainable` and `opt_state` buffers are donated:
                do not use them after the call).
            batch: a :class:`~gti_jax.train.data.Batch` (this process's numpy rows, or
                global jax arrays).
            key: PRNG key for LoRA dropout; pass a fresh one each step (e.g.
                ``jax.random.fold_in(seed_key, step)``). Required when dropout is active.

        Returns:
            ``(new_state, metrics)``; metrics: ``loss`` (mean per target token),
            ``grad_norm`` (before clipping), ``tokens`` (targets in the batch).
        """
        self.check_batch(batch)
        if key is None:
            if self.dropout:
                raise StepError(
                    "LoRA dropout is active: pass key=jax.random.fold_in(seed_key, step) to "
                    "the step (or build the adapters with dropout=0)"
                )
            key = jax.random.key(0)
        trainable, opt_state, metrics = self.apply(
            state.trainable, state.frozen, state.opt_state, batch, key
        )
        return SFTState(trainable, state.frozen, opt_state), metrics

    def loss(self, state: SFTState, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Evaluation sums ``(loss_sum, num_targets)`` on one batch (no dropout)."""
        return self.eval_sums(state.trainable, state.frozen, batch)

    def merge(self, state: SFTState) -> nnx.Module:
        """The model with the state's parameters (arrays shared, not copied)."""
        return nnx.merge(self.graphdef, state.trainable, state.frozen)


def make_sft_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    lora: bool,
    compute_dtype: Any = jnp.float32,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_RULES,
    compute: ComputeConfig | None = None,
) -> SFTStep:
    """Builds the compiled fine-tuning step for `model`.

    Trainable: every `nnx.Param` when ``lora=False``; with ``lora=True`` the LoRA factors
    (`gti_jax.train.lora.LoRAParam`, added by `apply_lora`), the embedding and an untied
    ``lm_head`` (the GTI paper's appendix). Everything else is frozen: no gradient, no
    optimizer state.

    Args:
        model: the model (its structure fixes the step; its values are read by `init`).
        tx: the optimizer (e.g. :func:`sft_optimizer`).
        lora: train LoRA factors + embedding + head only.
        compute_dtype: matmul dtype (parameters and optimizer state keep theirs).
        grad_accum: micro-batches per optimizer step.
        mesh: a device mesh; None: one device.
        rules: logical axis rules for the mesh.
        compute: the ``compute`` section: attention kernel, remat policy, parameter dtype,
            vocabulary columns per chunk of the loss (``loss_chunk``; 0: automatic, see
            :func:`gti_jax.train.xent.loss_chunk_size`); None: the defaults.

    Returns:
        An :class:`SFTStep`: ``state = step.init(model)``, then
        ``state, metrics = step(state, batch, key)``; ``step.merge(state)`` gives the model.

    Example:
        >>> step = make_sft_step(model, sft_optimizer(cfg.sft), lora=False)  # doctest: +SKIP
        >>> state = step.init(model)  # doctest: +SKIP
        >>> state, m = step(state, batcher.batch_at(0))  # doctest: +SKIP
    """
    return SFTStep(
        model,
        tx,
        lora=lora,
        compute_dtype=compute_dtype,
        grad_accum=grad_accum,
        mesh=mesh,
        rules=rules,
        compute=compute,
    )
