"""Grounded Token Initialization (GTI): train only the new embedding rows, backbone frozen.

After new tokens are added and initialized (e.g. all at the mean embedding), GTI trains their
rows, and nothing else, with next-token loss on paired text <-> token prompts, so each new
token gets a distinct, meaningful embedding before fine-tuning (arXiv 2604.02324).

The trainable rows live in their own arrays, :class:`GroundParams` (``embed [N, D]`` and, for
an untied head, ``head [N, D]``): gradients, Adam moments and weight decay exist for
``N x D`` numbers only, never for the ``V x D`` table. The model state stays frozen: the
step's forward pass reads the frozen table and substitutes the trainable rows wherever a new
id is looked up (input embedding) and wherever a new token is scored (the new logit columns,
from the tied table or the untied head), which is exactly the model with the rows joined into
its table (:func:`join_new_rows`), without materializing a ``[V, D]`` gradient.

This fast path needs gti_jax's own model (it reads ``model.embed`` and
``model.hidden_states``); any other model's parameter tree and loss (Linen, NNX, MaxText,
bonsai, tunix) is grounded by :mod:`gti_jax.train.generic` with the same trainable rows.

Typical use:

    >>> graphdef, state = nnx.split(model)  # doctest: +SKIP
    >>> params = split_new_rows(state, new_ids, tied=tied)  # doctest: +SKIP
    >>> step = make_ground_step(graphdef, state, new_ids, ground_optimizer(cfg.ground), tied=tied)  # doctest: +SKIP
    >>> params, opt_state = step.init(params)  # doctest: +SKIP
    >>> for s in range(cfg.ground.steps):  # doctest: +SKIP
    ...     params, opt_state, metrics = step(params, opt_state, batcher.batch_at(s))
    >>> state = join_new_rows(state, params, new_ids, tied=tied)  # fold back before export  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gti_jax.errors import BadInput
from gti_jax.io.rows import save_rows
from gti_jax.models.sharding import LOGICAL_RULES, Rules, logical_to_spec, state_shardings
from gti_jax.train.config import GroundConfig
from gti_jax.train.data import Batch
from gti_jax.train.loop import (
    NanGuard,
    StageContext,
    compute_dtype,
    guard_optimizer,
    host,
    log_line,
    train_loop,
)
from gti_jax.train.steps import (
    CompiledStep,
    adamw_optimizer,
    cast_params,
    hidden_lm_loss,
    loss_chunk_of,
    param_dtype_of,
    set_compute,
    set_compute_dtype,
)
from gti_jax.train.xent import VocabHead, model_head

__all__ = [
    "GroundError",
    "ground_stage",
    "ground_step_from_config",
    "GroundParams",
    "GroundStep",
    "eval_loss",
    "grad_free_prefix",
    "shared_prefix",
    "ground_logits",
    "ground_optimizer",
    "join_new_rows",
    "make_ground_step",
    "split_new_rows",
]

EMBED_PATH = ("embed", "embedding")
HEAD_PATH = ("lm_head", "kernel")


class GroundError(BadInput):
    """A grounding request that cannot be carried out (one line naming the fix)."""


class GroundParams(NamedTuple):
    """The trainable new rows (a pytree; float32).

    Attributes:
        embed: ``[N_new, D]`` input-embedding rows of the new tokens (for a tied model also
            their output rows).
        head: ``[N_new, D]`` output rows of an untied head (``lm_head.kernel[:, new_ids].T``),
            or None for a tied model.
    """

    embed: jax.Array
    head: jax.Array | None = None


# --------------------------------------------------------------------------------------------
# Rows in and out of the model state.
# --------------------------------------------------------------------------------------------


def _check_ids(new_ids: range | Iterable[int]) -> tuple[int, int]:
    ids = new_ids if isinstance(new_ids, range) else range(0)
    if not isinstance(new_ids, range):
        seq = [int(i) for i in new_ids]
        if seq and seq == list(range(seq[0], seq[0] + len(seq))):
            ids = range(seq[0], seq[0] + len(seq))
        else:
            raise GroundError(
                "new_ids must be contiguous ids (a range, e.g. VocabPlan.new_ids); got "
                f"{seq[:5]}{'...' if len(seq) > 5 else ''}"
            )
    if ids.step != 1 or len(ids) == 0:
        raise GroundError(f"new_ids must be a non-empty range with step 1, got {new_ids}")
    return ids.start, len(ids)


def _node(state: Any, path: tuple[str, ...]) -> Any:
    node = state
    for k in path:
        try:
            node = node[k]
        except (KeyError, TypeError, IndexError):
            raise GroundError(
                f"model state has no {'/'.join(path)}; pass nnx.state(model) of a gti_jax "
                "Llama model (tied=True when it has no lm_head)"
            ) from None
    return node


def _value(node: Any) -> jax.Array:
    return node.get_value() if isinstance(node, nnx.Variable) else node


def _replace(state: Any, path: tuple[str, ...], value: jax.Array) -> Any:
    """A shallow copy of `state` with the leaf at `path` replaced (Variables keep metadata)."""
    head, rest = path[0], path[1:]
    if isinstance(state, nnx.State):
        items = dict(state.items())
        items[head] = _replace(items[head], rest, value) if rest else _set(items[head], value)
        return nnx.State(items)
    items = dict(state)
    items[head] = _replace(items[head], rest, value) if rest else _set(items[head], value)
    return type(state)(items) if isinstance(state, dict) else items


def _set(node: Any, value: jax.Array) -> Any:
    return node.replace(value) if isinstance(node, nnx.Variable) else value


def _abstract(tree: Any) -> bool:
    """Whether `tree` holds shapes only (`jax.ShapeDtypeStruct` leaves, e.g. from
    `nnx.eval_shape`) rather than arrays."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _rows_sharding(table: Any) -> Any:
    sharding = getattr(table, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def split_new_rows(model_state: Any, new_ids: range, *, tied: bool) -> GroundParams:
    """Copies the new tokens' rows out of a model state into their own float32 arrays.

    Args:
        model_state: ``nnx.state(model)`` (or a nested dict with the same keys) of a gti_jax
            Llama model: ``embed/embedding [V, D]`` and, untied, ``lm_head/kernel [D, V]``.
        new_ids: the new tokens' ids, contiguous (``VocabPlan.new_ids``).
        tied: whether the model ties its head to the embedding.

    Returns:
        :class:`GroundParams` with ``embed = table[new_ids]`` and, untied,
        ``head = kernel[:, new_ids].T``.

    Raises:
        GroundError: ids not contiguous or out of the table, or a missing parameter.

    Example:
        >>> state = {"embed": {"embedding": jnp.arange(12.0).reshape(6, 2)}}
        >>> split_new_rows(state, range(4, 6), tied=True).embed.tolist()
        [[8.0, 9.0], [10.0, 11.0]]
    """
    start, n = _check_ids(new_ids)
    table = _value(_node(model_state, EMBED_PATH))
    if start + n > table.shape[0]:
        raise GroundError(
            f"new_ids {new_ids} exceed the embedding's {table.shape[0]} rows; resize the "
            "vocabulary (gti_jax.vocab.resize_vocab) before grounding"
        )
    embed = jax.lax.dynamic_slice_in_dim(table, start, n, axis=0).astype(jnp.float32)
    head = None
    if not tied:
        kernel = _value(_node(model_state, HEAD_PATH))
        head = jax.lax.dynamic_slice_in_dim(kernel, start, n, axis=1).T.astype(jnp.float32)
    return GroundParams(embed, head)


def _update_raw(table, rows, start, axis):
    if axis == 1:
        rows = rows.T
    idx = (start, 0) if axis == 0 else (0, start)
    return jax.lax.dynamic_update_slice(table, rows.astype(table.dtype), idx)


def _update_rows(table: jax.Array, rows: jax.Array, start: int, axis: int) -> jax.Array:
    # jitted where called, as in lora.merge_lora (jax reuses the compilation for the same
    # function and shapes): no module-level compiled function
    sharding = _rows_sharding(table)
    kw = {}
    if sharding is not None and not isinstance(table, jax.core.Tracer):
        kw = {"out_shardings": sharding}
    fn = jax.jit(_update_raw, static_argnames=("start", "axis"), **kw)
    return fn(table, rows, start=start, axis=axis)


def join_new_rows(model_state: Any, params: GroundParams, new_ids: range, *, tied: bool) -> Any:
    """Writes trained rows back into a model state (pure; the input state is not modified).

    Every other entry of the state is returned as it is (same arrays). The table keeps its
    dtype and sharding; rows are cast to the table's dtype.

    Args:
        model_state: the frozen ``nnx.state(model)`` (or nested dict).
        params: the rows (:func:`split_new_rows` layout).
        new_ids: the new tokens' ids (contiguous).
        tied: whether the model ties its head to the embedding.

    Returns:
        A new state of the same structure with ``embed/embedding[new_ids] = params.embed``
        and, untied, ``lm_head/kernel[:, new_ids] = params.head.T``.

    Example:
        >>> state = {"embed": {"embedding": jnp.zeros((4, 2))}}
        >>> out = join_new_rows(state, GroundParams(jnp.ones((1, 2))), range(3, 4), tied=True)
        >>> out["embed"]["embedding"].sum(axis=1).tolist()
        [0.0, 0.0, 0.0, 2.0]
    """
    start, n = _check_ids(new_ids)
    if params.embed.shape[0] != n:
        raise GroundError(f"params.embed has {params.embed.shape[0]} rows, new_ids {n}")
    if tied != (params.head is None):
        raise GroundError(
            "params.head must be None for a tied model and set for an untied one; "
            "make params with split_new_rows(..., tied=...) using the same tied flag"
        )
    table = _value(_node(model_state, EMBED_PATH))
    out = _replace(model_state, EMBED_PATH, _update_rows(table, params.embed, start, 0))
    if not tied:
        kernel = _value(_node(model_state, HEAD_PATH))
        out = _replace(out, HEAD_PATH, _update_rows(kernel, params.head, start, 1))
    return out


# --------------------------------------------------------------------------------------------
# The forward pass with the trainable rows substituted.
# --------------------------------------------------------------------------------------------


def ground_logits(
    model: nnx.Module,
    params: GroundParams,
    start: int,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Logits of `model` with the new rows taken from `params` instead of the model's table.

    Equal to ``model(input_ids)`` after ``join_new_rows``, but gradients reach only `params`
    and are ``[N, D]``: new ids are embedded from ``params.embed``, and the new logit columns
    are ``h @ params.embed.T`` (tied) or ``h @ params.head.T`` (untied).

    Args:
        model: the frozen model (a gti_jax Llama).
        params: the trainable rows.
        start: the first new id.
        input_ids: ``[B, T]`` ids.
        attention_mask: ``[B, T]`` 1/0, or None.

    Returns:
        ``[B, T, V]`` float32 logits.
    """
    h = _ground_hidden(model, params, start, input_ids, attention_mask)
    return _ground_head(model, params, start, h)


def _ground_hidden(model, params, start, input_ids, attention_mask, prefix=0):
    """Final hidden states with new ids embedded from ``params.embed``.

    With ``prefix > 0`` the first `prefix` positions (which must hold no new id in any row:
    :func:`grad_free_prefix`) run forward into a KV cache outside the gradient, and only the
    remaining positions are differentiated; the values are those of one full pass.
    """
    n = params.embed.shape[0]
    dtype = model.dtype
    table = model.embed.embedding[...]
    rel = input_ids - start
    is_new = (rel >= 0) & (rel < n)
    old = jnp.take(table, input_ids, axis=0).astype(dtype)
    new = jnp.take(params.embed, jnp.clip(rel, 0, n - 1), axis=0).astype(dtype)
    x = jnp.where(is_new[..., None], new, old)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if not prefix:
        h, _ = model.hidden_states(x, attention_mask=attention_mask)
        return h
    b, t = input_ids.shape
    head = jax.lax.stop_gradient(x[:, :prefix])
    h_head, cache = model.hidden_states(
        head, attention_mask=attention_mask[:, :prefix], cache=model.init_cache(b, t)
    )
    h_tail, _ = model.hidden_states(
        x[:, prefix:], attention_mask=attention_mask[:, prefix:], cache=jax.lax.stop_gradient(cache)
    )
    return jnp.concatenate([jax.lax.stop_gradient(h_head), h_tail], axis=1)


_PREFIX_MULTIPLE = 16


def _prefix_cap(length: int, multiple: int) -> int:
    """The longest prefix of a `length`-token batch that leaves >= `multiple` positions."""
    return max(0, (length - multiple) // multiple * multiple)


def grad_free_prefix(
    input_ids: Any, attention_mask: Any, new_ids: range, *, multiple: int = _PREFIX_MULTIPLE
) -> int:
    """The length of the leading positions that no gradient of the new rows passes through.

    The largest multiple of `multiple` such that, in every row, the positions before it hold
    real tokens (no padding) and no new id; at least `multiple` positions are left after it.
    With a frozen backbone, hidden states there do not depend on the trained rows, so the
    grounding step computes them without a backward pass. Rounding to `multiple` bounds the
    number of compiled variants of the step.

    Args:
        input_ids: ``[B, T]`` numpy ids (the whole batch of every process).
        attention_mask: ``[B, T]`` 1/0, or None (all real).
        new_ids: the trained ids.
        multiple: the granularity.

    Returns:
        The prefix length (0 when there is none worth splitting off).

    Example:
        >>> ids = np.array([[1, 2, 3, 4, 9, 5], [1, 2, 3, 4, 5, 9]])
        >>> grad_free_prefix(ids, None, range(9, 10), multiple=2)
        4
    """
    ids = np.asarray(input_ids)
    blocked = (ids >= new_ids.start) & (ids < new_ids.stop)
    if attention_mask is not None:
        blocked |= np.asarray(attention_mask) == 0
    t = ids.shape[1]
    first = np.where(blocked.any(axis=1), blocked.argmax(axis=1), t)
    return min(int(first.min()) // multiple * multiple, _prefix_cap(t, multiple))


def _ground_head(model, params, start, h):
    """``[B, L, D]`` hidden states -> ``[B, L, V]`` logits with the new columns from `params`."""
    dtype = model.dtype
    logits = model.logits(h)
    rows = params.embed if params.head is None else params.head
    new_logits = jnp.einsum(
        "btd,nd->btn", h.astype(dtype), rows.astype(dtype), preferred_element_type=jnp.float32
    )
    new_logits = model.finish_logits(new_logits)  # the family's soft-cap (Gemma 3), if any
    return jax.lax.dynamic_update_slice(logits, new_logits, (0, 0, start))


def shared_prefix(rows: Iterable[Any], new_ids: range, *, multiple: int = _PREFIX_MULTIPLE) -> int:
    """The gradient-free prefix that every example shares (an upper bound for every batch).

    The shortest run of leading non-new tokens over `rows` (1-D id arrays, unpadded; a row
    without new ids counts with its length), rounded down to `multiple`. A trainer passes it
    as ``max_prefix`` so that every batch uses the same prefix (one compiled step per batch
    length) and so that several processes, each seeing only its own rows, agree on it.

    Example:
        >>> shared_prefix([np.array([1, 2, 3, 9, 4]), np.array([1, 2, 3, 4, 5, 9])],
        ...               range(9, 10), multiple=2)
        2
    """
    first = None
    for row in rows:
        ids = np.asarray(row)
        hits = np.flatnonzero((ids >= new_ids.start) & (ids < new_ids.stop))
        f = int(hits[0]) if len(hits) else len(ids)
        first = f if first is None else min(first, f)
    return 0 if first is None else first // multiple * multiple


def _ground_vocab(model, params, start) -> VocabHead:
    """`_ground_head` by blocks of columns (for the chunked loss): the model's head rows, with
    the trained rows of `params` in place of the new ids' columns."""
    base = model_head(model)
    rows = params.embed if params.head is None else params.head
    n = rows.shape[0]

    def columns(lo, size):
        rel = lo + jnp.arange(size) - start
        is_new = (rel >= 0) & (rel < n)
        new = jnp.take(rows, jnp.clip(rel, 0, n - 1), axis=0).astype(base.dtype)
        return jnp.where(is_new[:, None], new, base.columns(lo, size).astype(base.dtype))

    return base._replace(columns=columns)


def _loss_sums(graphdef, frozen, params, batch, *, start, compute_dtype, prefix=0, loss_chunk=0):
    model = set_compute_dtype(nnx.merge(graphdef, frozen), compute_dtype)
    h = _ground_hidden(model, params, start, batch.input_ids, batch.attention_mask, prefix)
    return hidden_lm_loss(
        h,
        batch,
        lambda x: _ground_head(model, params, start, x),
        vocab=_ground_vocab(model, params, start),
        loss_chunk=loss_chunk,
    )


# --------------------------------------------------------------------------------------------
# Optimizer and step.
# --------------------------------------------------------------------------------------------


def ground_optimizer(
    cfg: GroundConfig,
    total_steps: int | None = None,
    *,
    schedule: Literal["cosine", "constant"] = "cosine",
) -> optax.GradientTransformation:
    """The grounding optimizer from ``ground.*``: clip by global norm, AdamW, warm-up + decay.

    Weight decay (``ground.weight_decay``) touches only the new rows, since they are the only
    parameters.

    Args:
        cfg: the ground section of the config (`lr`, `warmup_steps`, `weight_decay`,
            `clip_norm`).
        total_steps: steps of the stage; default ``cfg.steps``.
        schedule: "cosine" (to 10% of the peak) or "constant" after the warm-up.

    Returns:
        The optax transformation.

    Example:
        >>> tx = ground_optimizer(GroundConfig(steps=50, lr=1e-2))
        >>> state = tx.init(GroundParams(jnp.zeros((3, 4))))
    """
    return adamw_optimizer(
        cfg.lr,
        cfg.steps if total_steps is None else total_steps,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_norm,
        schedule=schedule,
        decay_matrices_only=False,
    )


class GroundStep(CompiledStep):
    """A compiled grounding step; build it with :func:`make_ground_step`.

    Call it as ``params, opt_state, metrics = step(params, opt_state, batch)``. The frozen
    model state is held by the step and passed to the compiled function as an argument
    (never a baked-in constant, never updated).

    Attributes:
        graphdef: the model's graph definition.
        frozen_state: the frozen model state (placed on the mesh when there is one).
        start: the first new id; `num_new`: the number of new ids.
        tied: whether the head is the embedding.
        traces: how many times the step was traced (compiled): once per batch shape.
    """

    def __init__(
        self,
        graphdef,
        frozen_state,
        new_ids,
        tx,
        *,
        tied,
        compute_dtype,
        grad_accum,
        mesh,
        rules,
        split_prefix=True,
        max_prefix=None,
        compute=None,
    ):
        start, n = _check_ids(new_ids)
        if grad_accum < 1:
            raise GroundError(f"grad_accum must be >= 1, got {grad_accum}")
        model = nnx.merge(graphdef, frozen_state)
        if bool(model.config.tie_word_embeddings) != bool(tied):
            raise GroundError(
                f"tied={tied} but the model has tie_word_embeddings="
                f"{model.config.tie_word_embeddings}; pass tied=model.config.tie_word_embeddings"
            )
        if start + n > model.num_rows:
            raise GroundError(
                f"new_ids {new_ids} exceed the embedding's {model.num_rows} rows; resize the "
                "vocabulary before grounding"
            )
        if compute is not None or mesh is not None:  # they live in the graph definition
            graphdef = nnx.split(set_compute(model, compute, mesh, rules))[0]
        self.param_dtype = param_dtype_of(compute)
        loss_chunk = loss_chunk_of(compute)
        if self.param_dtype != jnp.float32:  # the backbone kept in bf16; the rows stay float32
            frozen_state = cast_params(frozen_state, self.param_dtype)
        self.graphdef, self.start, self.num_new, self.tied = graphdef, start, n, bool(tied)
        self.compute_dtype = compute_dtype
        self.split_prefix = bool(split_prefix)
        self.max_prefix = None if max_prefix is None else int(max_prefix)
        dim = model.config.hidden_size

        def loss(params, frozen, batch, prefix=0):
            return _loss_sums(
                graphdef,
                frozen,
                params,
                batch,
                start=start,
                compute_dtype=compute_dtype,
                prefix=prefix,
                loss_chunk=loss_chunk,
            )

        shardings = {}
        self.frozen_state = frozen_state
        if mesh is not None:
            frozen_sh = state_shardings(frozen_state, mesh, rules)
            if not _abstract(frozen_state):  # an abstract state (gti_jax.plan) stays as it is
                self.frozen_state = jax.device_put(frozen_state, frozen_sh)
            rows = NamedSharding(mesh, logical_to_spec((None, "embed"), rules, mesh, (n, dim)))
            shardings = dict(
                param_shardings=GroundParams(rows, None if tied else rows),
                frozen_shardings=frozen_sh,
                abstract_params=GroundParams(
                    jax.ShapeDtypeStruct((n, dim), jnp.float32),
                    None if tied else jax.ShapeDtypeStruct((n, dim), jnp.float32),
                ),
            )
        super().__init__(
            loss,
            lambda params, frozen, batch: loss(params, frozen, batch),
            tx,
            grad_accum=grad_accum,
            mesh=mesh,
            rules=rules,
            keyed=False,
            **shardings,
        )

    @property
    def new_ids(self) -> range:
        return range(self.start, self.start + self.num_new)

    def init(self, params: GroundParams) -> tuple[GroundParams, Any]:
        """Places `params` (float32; on the mesh when there is one) and inits the optimizer.

        Returns:
            ``(params, opt_state)``: moments ``[N, D]`` like the rows, nothing else.
        """
        # A copy: the step donates its inputs, the caller's arrays must survive.
        params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
        if params.embed.shape != (self.num_new, params.embed.shape[1]):
            raise GroundError(f"params.embed must be [{self.num_new}, D], got {params.embed.shape}")
        if self.tied != (params.head is None):
            raise GroundError("params.head must be None exactly when the model is tied")
        return self.place(params)

    def __call__(
        self, params: GroundParams, opt_state: Any, batch: Batch
    ) -> tuple[GroundParams, Any, dict[str, jax.Array]]:
        """One optimizer step on the new rows.

        Args:
            params: the rows (donated: do not reuse after the call).
            opt_state: their optimizer state (donated).
            batch: a :class:`~gti_jax.train.data.Batch` (this process's rows or global arrays).

        Returns:
            ``(params, opt_state, metrics)``; metrics: ``loss`` (mean per target token),
            ``grad_norm`` (before clipping), ``tokens`` (targets in the batch).
        """
        self.check_batch(batch)
        return self.apply(params, self.frozen_state, opt_state, batch, self.prefix_for(batch))

    def prefix_for(self, batch: Batch) -> int:
        """The gradient-free prefix the step uses for `batch` (:func:`grad_free_prefix`).

        At most ``max_prefix`` when one was given. 0 (no split) when ``split_prefix`` is off.
        When this process cannot see the whole batch (several processes: each holds its own
        rows, and all must compile the same step) it is ``max_prefix`` (which the caller
        guarantees for every row, e.g. :func:`shared_prefix` of the data set), or 0 without.
        """
        if not self.split_prefix:
            return 0
        ids = batch.input_ids
        cap = _prefix_cap(np.shape(ids)[1], _PREFIX_MULTIPLE)
        bound = cap if self.max_prefix is None else min(cap, self.max_prefix)
        local = jax.process_count() > 1 or (
            isinstance(ids, jax.Array) and not ids.is_fully_addressable
        )
        if local:
            return 0 if self.max_prefix is None else bound
        mask = batch.attention_mask
        found = grad_free_prefix(
            np.asarray(ids), None if mask is None else np.asarray(mask), self.new_ids
        )
        return min(found, bound)

    def loss(self, params: GroundParams, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Evaluation sums ``(loss_sum, num_targets)`` on one batch."""
        return self.eval_sums(params, self.frozen_state, batch)


def make_ground_step(
    graphdef: Any,
    frozen_state: Any,
    new_ids: range,
    tx: optax.GradientTransformation,
    *,
    tied: bool,
    compute_dtype: Any = jnp.float32,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_RULES,
    split_prefix: bool = True,
    max_prefix: int | None = None,
    compute: Any = None,
) -> GroundStep:
    """Builds the compiled GTI step: only the new rows train, the model state stays frozen.

    The forward pass uses the frozen model with the rows of `params` substituted for the new
    ids (input embedding and output logits; see :func:`ground_logits`); the loss is the mean
    next-token cross-entropy over loss-mask tokens, in float32, accumulated over `grad_accum`
    micro-batches. Gradients, optimizer state and weight decay exist only for the
    ``N_new x D`` rows (twice that for an untied head).

    Args:
        graphdef: from ``nnx.split(model)``.
        frozen_state: the model state (``nnx.split(model)[1]``); the old values of the new rows
            in it are ignored.
        new_ids: the new tokens' ids (contiguous, e.g. ``VocabPlan.new_ids``).
        tx: the optimizer (e.g. :func:`ground_optimizer`).
        tied: whether the model ties its head to the embedding.
        compute_dtype: the frozen backbone's matmul dtype; rows and optimizer stay float32.
        grad_accum: micro-batches per optimizer step.
        mesh: device mesh; None: one device. The model state is sharded by its logical axes,
            the rows on their embedding dimension (rules' ``embed`` axis), the batch on rows.
        rules: logical axis rules.
        split_prefix: run each batch's new-token-free prefix forward without gradient
            (:func:`grad_free_prefix`; one compiled step per prefix length). Same results;
            False compiles one step per batch shape and differentiates every position.
        max_prefix: an upper bound on the prefix, true for every row of every batch; a
            trainer passes :func:`shared_prefix` of its data so every batch of a length
            shares one compiled step (and processes that see only their own rows agree).
        compute: the ``compute`` section (`gti_jax.train.config.ComputeConfig`): attention
            kernel and remat of the backbone, and ``param_dtype``, the dtype the frozen model
            state is kept in (the trained rows and their optimizer stay float32: they are
            their own master copy, ``N x D`` numbers), and ``loss_chunk``, vocabulary columns
            per chunk of the loss (0: automatic, see
            :func:`gti_jax.train.xent.loss_chunk_size`); None: the defaults.

    Returns:
        A :class:`GroundStep`: ``params, opt_state = step.init(params)``, then
        ``params, opt_state, metrics = step(params, opt_state, batch)``.

    Raises:
        GroundError: `tied` disagrees with the model, or `new_ids` are not contiguous rows of
            the table.

    Example:
        >>> step = make_ground_step(graphdef, state, range(49152, 49168), tx, tied=True)  # doctest: +SKIP
    """
    return GroundStep(
        graphdef,
        frozen_state,
        new_ids,
        tx,
        tied=tied,
        compute_dtype=compute_dtype,
        grad_accum=grad_accum,
        mesh=mesh,
        rules=rules,
        split_prefix=split_prefix,
        max_prefix=max_prefix,
        compute=compute,
    )


def eval_loss(
    graphdef: Any,
    frozen_state: Any,
    params: GroundParams,
    batches: Iterable[Batch],
    new_ids: range,
    *,
    compute_dtype: Any = jnp.float32,
) -> float:
    """Mean next-token loss per target token over `batches`, with the rows of `params`.

    Args:
        graphdef: from ``nnx.split(model)``.
        frozen_state: the model state.
        params: the new rows.
        batches: :class:`~gti_jax.train.data.Batch` es (numpy or jax arrays).
        new_ids: the new tokens' ids.
        compute_dtype: matmul dtype.

    Returns:
        ``sum(loss) / sum(targets)`` over all batches (a Python float; nan if no targets).

    Example:
        >>> eval_loss(graphdef, state, params, [batcher.batch_at(0)], new_ids)  # doctest: +SKIP
        2.31
    """
    # the evaluation of a grounding step (compiled once here, for these batches' shapes)
    step = GroundStep(
        graphdef,
        frozen_state,
        new_ids,
        optax.identity(),
        tied=params.head is None,
        compute_dtype=compute_dtype,
        grad_accum=1,
        mesh=None,
        rules=LOGICAL_RULES,
    )
    total, count = 0.0, 0.0
    for batch in batches:
        s, n = step.loss(params, batch)
        total, count = total + float(s), count + float(n)
    return total / count if count else float("nan")


# --------------------------------------------------------------------------------------------
# The stage of a run.
# --------------------------------------------------------------------------------------------


def ground_step_from_config(
    cfg: Any,
    graphdef: Any,
    frozen_state: Any,
    new_ids: range,
    *,
    tied: bool,
    mesh: Mesh | None,
    rules: Rules,
    max_prefix: int | None = None,
) -> GroundStep:
    """The grounding step a run builds from its config (``ground.*``, ``compute.*``).

    One place for both callers: the stage (:func:`ground_stage`) and the planner
    (:mod:`gti_jax.plan`, which builds it on an abstract `frozen_state` and compiles it
    without running it), so a plan is always of the step the trainer runs.
    """
    return make_ground_step(
        graphdef,
        frozen_state,
        new_ids,
        guard_optimizer(ground_optimizer(cfg.ground)),
        tied=tied,
        compute_dtype=compute_dtype(cfg.ground.compute_dtype),
        grad_accum=cfg.ground.grad_accum,
        mesh=mesh,
        rules=rules,
        max_prefix=max_prefix,
        compute=cfg.compute,
    )


def _ground_state_tree(params, opt_state):
    p = (
        {"embed": params.embed}
        if params.head is None
        else {"embed": params.embed, "head": params.head}
    )
    return {"params": p, "opt": opt_state}


def ground_stage(ctx: StageContext, model, new_range, tied, examples, token_info):
    """The grounding stage of a run: ``ground.steps`` steps on the new rows (resumed from the
    newest grounding checkpoint), then the grounded rows written alone (``export.rows``).

    Returns:
      The model with the grounded rows joined into its tables.
    """
    cfg, ckpt, log, mesh, rules = ctx.cfg, ctx.ckpt, ctx.log, ctx.mesh, ctx.rules
    latest, latest_meta, run_dir, writer = ctx.latest, ctx.latest_meta, ctx.run_dir, ctx.writer
    G = cfg.ground.steps
    t0 = time.perf_counter()
    graphdef, state = nnx.split(model)
    step_fn = ground_step_from_config(
        cfg,
        graphdef,
        state,
        new_range,
        tied=tied,
        mesh=mesh,
        rules=rules,
        max_prefix=shared_prefix((ids for ids, _ in examples), new_range),
    )
    params, opt_state = step_fn.init(split_new_rows(state, new_range, tied=tied))
    state = step_fn.frozen_state  # placed, and in compute.param_dtype: what the rows join
    start, resumed_meta = 0, None
    if latest_meta is not None and latest_meta.get("stage") == "ground":
        restored, resumed_meta = ckpt.restore(latest, target=_ground_state_tree(params, opt_state))
        params = GroundParams(restored["params"]["embed"], restored["params"].get("head"))
        opt_state = restored["opt"]
        start = int(resumed_meta["step"])
        log_line(f"resumed grounding at step {start}/{G} from {ckpt.directory}")
    log.truncate_metrics("ground", start)
    guard = NanGuard(cfg, "ground", 0, resumed_meta)

    def step_once(carry, batch, step):
        p, o, metrics = step_fn(*carry, batch)
        return (p, o), metrics

    params, opt_state = train_loop(
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
        rows = host(params.embed).astype(np.float32)  # every process (collective)
        head = None if tied else host(params.head).astype(np.float32)
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
