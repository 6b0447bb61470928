"""GTI for any Flax model: train only the new rows of a parameter tree, under the user's loss.

:mod:`gti_jax.train.ground` grounds gti_jax's own models fast: it knows their forward pass
(``model.embed``, ``model.hidden_states``), so it substitutes the new rows where they are
looked up and scored and never forms a ``[V, D]`` gradient. A MaxText, bonsai, tunix or
hand-written Linen/NNX model has its own forward pass, which gti_jax cannot open. This module
grounds those: the user gives

* ``loss_fn(params, batch)``: their own loss over their own parameter tree (a nested dict,
  Linen's ``{"params": ...}``, an ``nnx.State``), returning the mean loss or
  ``(loss_sum, num_targets)``;
* the tree, and an :class:`~gti_jax.vocab.resize.EmbeddingSpec` saying where the ``[V, D]``
  table and an untied head (``[V, D]`` or ``[D, V]``) live, the same spec
  :func:`~gti_jax.vocab.resize.resize_vocab` took (presets: ``maxtext``, ``bonsai_qwen3``,
  ``bonsai_gemma3``, ``tunix``, ``nnx_llama``, ``hf``);
* the new ids.

The trainable state is :class:`~gti_jax.train.ground.GroundParams`: the new rows ``[N, D]``
(and the head's ``[N, D]``), float32. Inside the compiled step the rows are written into the
frozen table (``table.at[ids].set(rows)``) and the user's loss runs on the tree with them;
the gradient reaches the rows alone, so it equals the gradient of the loss with respect to
the full table restricted to the new rows, and the optimizer state is ``N x D``. The cost of
knowing nothing about the model: the backward pass forms the table's ``[V, D]`` cotangent
inside the step (a transient buffer, freed at the end of the step; nothing ``V``-sized is
kept between steps). :func:`fold_back` writes the trained rows into the tree for export; old
rows and every other leaf stay bit for bit. An output bias in the spec stays frozen.

Example (a tied toy model in a dict):

    >>> import optax
    >>> params = {"emb": jnp.ones((6, 2)), "w": jnp.eye(2)}
    >>> def loss_fn(p, batch):  # logits of each token's own embedding against the table
    ...     h = p["emb"][batch] @ p["w"]
    ...     return -jnp.mean(jax.nn.log_softmax(h @ p["emb"].T)[:, 5])
    >>> step = make_generic_ground_step(
    ...     loss_fn, params, EmbeddingSpec(("emb",)), [4, 5], optax.adam(0.1))
    >>> rows, opt_state = step.init()
    >>> for _ in range(3):
    ...     rows, opt_state, metrics = step(rows, opt_state, jnp.array([4, 5]))
    >>> out = step.fold_back(params, rows)
    >>> bool((out["emb"][:4] == 1).all()), bool((out["emb"][4:] != 1).any())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gti_jax.models.sharding import LOGICAL_RULES, Rules, logical_to_spec
from gti_jax.train.ground import GroundError, GroundParams
from gti_jax.train.steps import CompiledStep
from gti_jax.vocab.resize import EmbeddingSpec, get_path, set_paths, spec_arrays

__all__ = [
    "EmbeddingSpec",
    "GenericGroundStep",
    "GroundParams",
    "fold_back",
    "make_generic_ground_step",
    "scatter_rows",
    "split_rows",
]

LossFn = Callable[[Any, Any], Any]


def _ids(new_ids: Iterable[int] | np.ndarray | range, num_rows: int) -> np.ndarray:
    """The new ids as a checked ``int32 [N]`` array (unique, in ``[0, num_rows)``)."""
    try:
        ids = np.asarray(list(new_ids) if isinstance(new_ids, range) else new_ids)
    except TypeError:
        raise GroundError(
            f"new_ids must be a sequence of ints, got {type(new_ids).__name__}"
        ) from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise GroundError(
            f"new_ids must be a non-empty 1-D sequence of ints, got shape {ids.shape} of "
            f"{ids.dtype}; pass e.g. VocabPlan.new_ids or the ids extend_tokenizer returned"
        )
    bad = ids[(ids < 0) | (ids >= num_rows)]
    if bad.size:
        raise GroundError(
            f"new_ids {bad[:5].tolist()} are outside the table's {num_rows} rows; resize the "
            "vocabulary first (gti_jax.vocab.resize.resize_vocab)"
        )
    if np.unique(ids).size != ids.size:
        raise GroundError("new_ids has repeated ids; give each new token once")
    return ids.astype(np.int32)


def _axis(spec: EmbeddingSpec) -> int:
    """The vocabulary axis of the head: 0 for ``[V, D]``, 1 for a ``[D, V]`` kernel."""
    return 1 if spec.head_layout == "dv" else 0


def _gather(x: jax.Array, ids: jax.Array, axis: int) -> jax.Array:
    """Rows ``[N, D]`` of a ``[V, D]`` table (axis 0) or a ``[D, V]`` kernel (axis 1)."""
    rows = jnp.take(x, ids, axis=axis)
    return rows.T if axis == 1 else rows


def _write(x: jax.Array, rows: jax.Array, ids: jax.Array, axis: int) -> jax.Array:
    """``x`` with its rows (axis 0) or columns (axis 1) at ``ids`` set to ``rows [N, D]``."""
    rows = rows.astype(x.dtype)
    return x.at[ids].set(rows) if axis == 0 else x.at[:, ids].set(rows.T)


def split_rows(params: Any, spec: EmbeddingSpec, new_ids: Iterable[int]) -> GroundParams:
    """Copies the new tokens' rows out of a parameter tree into their own float32 arrays.

    Args:
        params: the tree (dict, Linen ``{"params": ...}``, ``nnx.State``).
        spec: where the table and an untied head are.
        new_ids: the new tokens' ids (any order; each once).

    Returns:
        ``GroundParams(embed=table[ids] [N, D], head=[N, D] or None)``; row ``i`` belongs to
        ``new_ids[i]``.

    Raises:
        BadInput: a path is missing, the shapes disagree, or an id is bad (one line).

    Example:
        >>> tree = {"e": jnp.arange(8.0).reshape(4, 2), "k": jnp.arange(8.0).reshape(2, 4)}
        >>> r = split_rows(tree, EmbeddingSpec(("e",), ("k",), "dv"), [3])
        >>> r.embed.tolist(), r.head.tolist()
        ([[6.0, 7.0]], [[3.0, 7.0]])
    """
    arrays, num_rows = spec_arrays(params, spec)
    ids = jnp.asarray(_ids(new_ids, num_rows))
    embed = _gather(arrays["embed"], ids, 0).astype(jnp.float32)
    head = None
    if "head" in arrays:
        head = _gather(arrays["head"], ids, _axis(spec)).astype(jnp.float32)
    return GroundParams(embed, head)


def scatter_rows(params: Any, spec: EmbeddingSpec, rows: GroundParams, ids: jax.Array) -> Any:
    """The tree with ``rows`` written at ``ids`` into the table (and head); pure, jit-safe.

    What the compiled step does to the frozen tree before calling the loss; no checks (see
    :func:`fold_back` for the checked, eager version).
    """
    new = {spec.embed: _write(get_path(params, spec.embed), rows.embed, ids, 0)}
    if spec.head is not None:
        new[spec.head] = _write(get_path(params, spec.head), rows.head, ids, _axis(spec))
    return set_paths(params, new)


def _check_rows(rows: GroundParams, spec: EmbeddingSpec, n: int, dim: int) -> None:
    if spec.tied != (rows.head is None):
        raise GroundError(
            "rows.head must be None exactly when the spec has no head; make the rows with "
            "split_rows (or step.init) for this spec"
        )
    for name, x in (("embed", rows.embed), ("head", rows.head)):
        if x is not None and tuple(np.shape(x)) != (n, dim):
            raise GroundError(f"rows.{name} must be [{n}, {dim}] (N new ids, D), got {np.shape(x)}")


def _write_rows(table, head, rows, ids, axis):
    out = _write(table, rows.embed, ids, 0)
    return out, (None if head is None else _write(head, rows.head, ids, axis))


def fold_back(params: Any, spec: EmbeddingSpec, new_ids: Iterable[int], rows: GroundParams) -> Any:
    """Writes trained rows into a parameter tree (pure: the input tree is not modified).

    Old rows are kept bit for bit, every other leaf is returned as it is (the same array);
    the rows are cast to the table's dtype, and a ``NamedSharding`` of the table is kept.

    Args:
        params: the tree (the step's input tree, or any tree of the same layout).
        spec: where the table and an untied head are.
        new_ids: the ids the rows belong to, in the rows' order.
        rows: the trained rows.

    Returns:
        A tree of the same structure with the new rows in place.

    Example:
        >>> out = fold_back({"e": jnp.zeros((3, 2))}, EmbeddingSpec(("e",)), [1],
        ...                 GroundParams(jnp.ones((1, 2))))
        >>> out["e"].tolist()
        [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    arrays, num_rows = spec_arrays(params, spec)
    ids = _ids(new_ids, num_rows)
    table, head = arrays["embed"], arrays.get("head")
    _check_rows(rows, spec, ids.size, np.shape(table)[1])
    shardings = tuple(
        s if isinstance(s := getattr(x, "sharding", None), NamedSharding) else None
        for x in (table, head)
    )
    kw = {} if shardings == (None, None) else {"out_shardings": shardings}
    # jitted where called, as in ground.join_new_rows: jax reuses the compilation
    fn = jax.jit(_write_rows, static_argnames=("axis",), **kw)
    table, head = fn(table, head, rows, jnp.asarray(ids), axis=_axis(spec))
    new = {spec.embed: table} if head is None else {spec.embed: table, spec.head: head}
    return set_paths(params, new)


def _loss_sums(out: Any) -> tuple[jax.Array, jax.Array]:
    """The user's loss as ``(loss_sum, num_targets)``: a scalar mean counts as one target."""
    if isinstance(out, tuple | list):
        if len(out) != 2:
            raise GroundError(
                "loss_fn must return a scalar mean loss or (loss_sum, num_targets), got a "
                f"tuple of {len(out)}"
            )
        return jnp.asarray(out[0], jnp.float32), jnp.asarray(out[1], jnp.float32)
    out = jnp.asarray(out, jnp.float32)
    if out.shape != ():
        raise GroundError(f"loss_fn must return a scalar, got shape {out.shape}")
    return out, jnp.float32(1.0)


def _placed_shardings(tree: Any, mesh: Mesh) -> Any:
    """Each leaf's own ``NamedSharding`` when it is on `mesh`, else replicated on it."""
    repl = NamedSharding(mesh, PartitionSpec())

    def one(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else repl

    return jax.tree.map(one, tree)


class GenericGroundStep(CompiledStep):
    """A compiled grounding step over a user's parameter tree and loss; build it with
    :func:`make_generic_ground_step`.

    Call ``rows, opt_state, metrics = step(rows, opt_state, batch)``. The tree given at
    build time is held (placed on the mesh when there is one) as the step's frozen argument:
    never updated, never donated, never a baked-in constant.

    Attributes:
        spec: where the table and head are. ``new_ids``: ``int32 [N]``, the rows' ids.
        frozen: the held tree. ``dim``: the table's width ``D``.
        traces: how many times the step was traced (once per batch shape).
    """

    def __init__(self, loss_fn, params, spec, new_ids, tx, *, grad_accum, mesh, rules):
        if not callable(loss_fn):
            raise GroundError(
                f"loss_fn must be a function (params, batch) -> loss, got {loss_fn!r}"
            )
        if grad_accum < 1:
            raise GroundError(f"grad_accum must be >= 1, got {grad_accum}")
        arrays, num_rows = spec_arrays(params, spec)
        self.spec, self.new_ids = spec, _ids(new_ids, num_rows)
        self.dim = int(np.shape(arrays["embed"])[1])
        n, tied = self.new_ids.size, spec.tied

        def loss(rows, frozen, batch, _extra):
            tree, ids = frozen
            return _loss_sums(loss_fn(scatter_rows(tree, spec, rows, ids), batch))

        ids = jnp.asarray(self.new_ids)
        shardings = {}
        if mesh is not None:
            frozen_sh = (_placed_shardings(params, mesh), NamedSharding(mesh, PartitionSpec()))
            params, ids = jax.device_put((params, ids), frozen_sh)
            spec_rows = logical_to_spec((None, "embed"), rules, mesh, (n, self.dim))
            rows = NamedSharding(mesh, spec_rows)
            abstract = jax.ShapeDtypeStruct((n, self.dim), jnp.float32)
            shardings = dict(
                param_shardings=GroundParams(rows, None if tied else rows),
                frozen_shardings=frozen_sh,
                abstract_params=GroundParams(abstract, None if tied else abstract),
            )
        self.frozen = (params, ids)
        super().__init__(
            loss,
            lambda rows, frozen, batch: loss(rows, frozen, batch, None),
            tx,
            grad_accum=grad_accum,
            mesh=mesh,
            rules=rules,
            keyed=False,
            **shardings,
        )

    def init(self, rows: GroundParams | None = None) -> tuple[GroundParams, Any]:
        """Places the rows (default: the held tree's current rows) and inits the optimizer.

        Returns:
            ``(rows, opt_state)``: float32 copies (the step donates them), and an optimizer
            state whose arrays are ``[N, D]`` like the rows, nothing else.
        """
        if rows is None:
            rows = split_rows(self.frozen[0], self.spec, self.new_ids)
        _check_rows(rows, self.spec, self.new_ids.size, self.dim)
        rows = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), rows)
        return self.place(rows)

    def _put(self, batch: Any) -> Any:
        leaves = jax.tree.leaves(batch)
        if not leaves:
            raise GroundError("the batch has no arrays")
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise GroundError(
                f"every array of the batch must have the same leading (batch) size, got {sizes}"
            )
        b = sizes.pop()
        if not isinstance(leaves[0], jax.Array):
            b *= jax.process_count()  # numpy rows are this process's part of the batch
        for what, k in (("grad_accum", self.grad_accum), ("the mesh's batch shards", self._shards)):
            if b % k:
                raise GroundError(f"a batch of {b} rows does not divide by {what} = {k}")
        sh = self.batch_sharding

        def one(x):
            if isinstance(x, jax.Array):
                return x
            x = np.asarray(x)
            return jnp.asarray(x) if sh is None else jax.make_array_from_process_local_data(sh, x)

        return jax.tree.map(one, batch)

    def __call__(
        self, rows: GroundParams, opt_state: Any, batch: Any
    ) -> tuple[GroundParams, Any, dict[str, jax.Array]]:
        """One optimizer step on the new rows.

        Args:
            rows: the rows (donated: do not reuse after the call).
            opt_state: their optimizer state (donated).
            batch: whatever ``loss_fn`` takes as its batch: a pytree of ``[B, ...]`` arrays
                (split on ``B`` for ``grad_accum``; with a mesh, arrays of >= 2 dims).

        Returns:
            ``(rows, opt_state, metrics)``; metrics: ``loss`` (the mean; with ``grad_accum``
            the mean over micro-batches, or per target when ``loss_fn`` returns sums),
            ``grad_norm`` (before any clipping), ``tokens`` (summed counts).
        """
        return self._step(rows, self.frozen, opt_state, self._put(batch), 0)

    def loss(self, rows: GroundParams, batch: Any) -> tuple[jax.Array, jax.Array]:
        """``(loss_sum, num_targets)`` of the user's loss with `rows` in place (no update)."""
        return self._eval(rows, self.frozen, self._put(batch))

    def fold_back(self, params: Any, rows: GroundParams) -> Any:
        """:func:`fold_back` with this step's spec and ids."""
        return fold_back(params, self.spec, self.new_ids, rows)


def make_generic_ground_step(
    loss_fn: LossFn,
    params: Any,
    spec: EmbeddingSpec,
    new_ids: Iterable[int],
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_RULES,
) -> GenericGroundStep:
    """Builds the compiled GTI step for any model: only the new rows of `params` train.

    Args:
        loss_fn: ``(params, batch) -> loss``: the user's loss on a tree of `params`' layout
            (it runs under jit, on the tree with the trainable rows written in). Return the
            mean loss, or ``(loss_sum, num_targets)`` so that ``grad_accum`` weighs every
            target equally.
        params: the parameter tree (frozen: held by the step, never updated).
        spec: where the ``[V, D]`` table and an untied head are (e.g.
            ``EmbeddingSpec.maxtext(tied=False)``, ``EmbeddingSpec.tunix(tied=True)``).
        new_ids: the new tokens' ids (each once, inside the table).
        tx: the optimizer of the rows (e.g. ``gti_jax.train.ground.ground_optimizer``).
        grad_accum: micro-batches per optimizer step (must divide the batch's rows).
        mesh: a device mesh, or None (one device). With one, the tree keeps the
            ``NamedSharding`` of each leaf already on this mesh (others are replicated),
            the rows are sharded on ``D`` (rules' ``embed`` axis), the batch on its rows.
        rules: logical axis rules for the rows and the batch.

    Returns:
        A :class:`GenericGroundStep`: ``rows, opt_state = step.init()``, then
        ``rows, opt_state, metrics = step(rows, opt_state, batch)``, and finally
        ``params = step.fold_back(params, rows)``.

    Raises:
        BadInput: a spec path is missing, the table and head shapes disagree, or an id is
            repeated or outside the table (one line, before anything compiles).
    """
    return GenericGroundStep(
        loss_fn, params, spec, new_ids, tx, grad_accum=grad_accum, mesh=mesh, rules=rules
    )
