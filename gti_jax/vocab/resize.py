"""Grow the vocabulary-shaped parameters of a model: pure, jit-compiled, sharding-preserving.

Two sizes are kept apart everywhere:

* ``num_tokens``: how many tokens the tokenizer has (``len(tokenizer)``);
* ``num_rows``: how many rows the table has. It may be larger (Qwen checkpoints pad their
  tables: 152,064 rows for 151,667 tokens), and after resizing it is rounded up for the
  device mesh and the matrix units.

New tokens get ids ``num_tokens .. new_num_tokens - 1`` (what a tokenizer assigns); they take
spare rows first, and the table grows only if it must. Old rows, including spare rows that no
new token needs, are preserved bit for bit in the parameter's own dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from gti_jax.errors import BadInput
from gti_jax.vocab.initializers import InitContext, Initializer, get_initializer

__all__ = [
    "EmbeddingSpec",
    "VocabPlan",
    "plan_resize",
    "resize_vocab",
    "get_path",
    "set_paths",
    "spec_arrays",
    "ResizeError",
]

Path = tuple[Hashable, ...]


class ResizeError(BadInput):
    """A resize request that cannot be carried out (bad spec, shrink, bad descriptions)."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """Where a model keeps its vocabulary-shaped parameters.

    Paths are tuples of keys into the parameter tree (dict keys, ``nnx.State`` keys, list
    indices); a flat Hugging Face dict uses one-element paths.

    Attributes:
      embed: path of the input embedding, ``[V, D]``.
      head: path of the output projection, or ``None`` when the embeddings are tied (the
        model computes logits with the input embedding, so there is nothing else to grow).
      head_layout: ``"vd"`` for a ``[V, D]`` head (Hugging Face ``lm_head.weight``), ``"dv"``
        for a ``[D, V]`` kernel (Flax ``Linear``, MaxText ``logits_dense``).
      bias: path of an output bias ``[V]``, if the model has one.
    """

    embed: Path
    head: Path | None = None
    head_layout: Literal["vd", "dv"] = "vd"
    bias: Path | None = None

    def __post_init__(self):
        if self.head_layout not in ("vd", "dv"):
            raise ResizeError(f"head_layout must be 'vd' or 'dv', got {self.head_layout!r}")

    @property
    def tied(self) -> bool:
        return self.head is None

    @classmethod
    def hf(cls, *, tied: bool, bias: bool = False) -> EmbeddingSpec:
        """Hugging Face tensor names: ``model.embed_tokens.weight``, ``lm_head.weight`` [V, D]."""
        return cls(
            embed=("model.embed_tokens.weight",),
            head=None if tied else ("lm_head.weight",),
            head_layout="vd",
            bias=("lm_head.bias",) if bias else None,
        )

    @classmethod
    def nnx_llama(cls, *, tied: bool) -> EmbeddingSpec:
        """gti_jax's NNX Llama family: ``embed.embedding`` [V, D], ``lm_head.kernel`` [D, V]."""
        return cls(
            embed=("embed", "embedding"),
            head=None if tied else ("lm_head", "kernel"),
            head_layout="dv",
        )

    @classmethod
    def maxtext(cls, *, tied: bool) -> EmbeddingSpec:
        """A Linen / MaxText parameter dict: ``params/token_embedder/embedding`` [V, D] and
        ``params/decoder/logits_dense/kernel`` [D, V].

        Pass MaxText's ``state.params`` (``{"params": {...}}``). Sources (AI-Hypercomputer/
        maxtext): ``src/maxtext/models/models.py`` (``embed_as_linen(..., name=
        "token_embedder")``, a ``[vocab, emb_dim]`` table in ``layers/embeddings.py``),
        ``src/maxtext/layers/decoders.py`` (``dense_general(..., kernel_axes=("embed_vocab",
        "vocab"), name="logits_dense")`` unless ``logits_via_embedding``: ``tied=True``),
        ``checkpoint_conversion/utils/utils.py`` (``params={"params": jax_weights}``).
        """
        return cls(
            embed=("params", "token_embedder", "embedding"),
            head=None if tied else ("params", "decoder", "logits_dense", "kernel"),
            head_layout="dv",
        )

    @classmethod
    def bonsai_qwen3(cls) -> EmbeddingSpec:
        """bonsai's NNX Qwen3 (``nnx.state(model)``): ``embedder/embedding`` [V, D] and
        ``lm_head/kernel`` [D, V].

        The head always exists: for a tied checkpoint bonsai's loader copies the transposed
        table into it, so the two are separate parameters that each get their new rows.
        Sources (jax-ml/bonsai): ``bonsai/models/qwen3/modeling.py`` (``self.embedder =
        nnx.Embed(...)``, ``self.lm_head = nnx.Einsum("BTD,DV->BTV", (emb_dim, vocab_size))``),
        ``bonsai/models/qwen3/params.py`` (``lm_head.kernel = embedder.embedding.T`` if tied).
        """
        return cls(embed=("embedder", "embedding"), head=("lm_head", "kernel"), head_layout="dv")

    @classmethod
    def bonsai_gemma3(cls) -> EmbeddingSpec:
        """bonsai's NNX Gemma 3 (``nnx.state(model)``): ``embed_tokens/weight/embedding``
        [V, D], tied (logits by ``embed_tokens.weight.attend``).

        Source (jax-ml/bonsai): ``bonsai/models/gemma3/modeling.py``
        (``Gemma3TextScaledWordEmbedding.weight = nnx.Embed(vocab_size, hidden_size)``) and
        ``bonsai/models/gemma3/params.py`` (``embed_tokens.weight.embedding``).
        """
        return cls(embed=("embed_tokens", "weight", "embedding"))

    @classmethod
    def tunix(cls, *, tied: bool) -> EmbeddingSpec:
        """tunix's NNX Llama 3, Qwen 2/3 and Gemma (``nnx.state(model)``):
        ``embedder/input_embedding`` [V, D] and, untied, ``lm_head/w`` [D, V].

        Gemma is always tied. Sources (google/tunix): ``tunix/models/llama3/model.py``
        (``Embedder.input_embedding`` ``(vocab_size, embed_dim)``; ``if not
        config.weight_tying: self.lm_head = Einsum("BTD,DV->BTV", (embed_dim, vocab_size))``
        whose parameter is ``w``), ``tunix/models/qwen3/model.py`` (the same, under
        ``use_tied_embedding``), ``tunix/models/llama3/params.py`` (``lm_head.weight`` ->
        ``lm_head.w`` transposed), ``tunix/models/gemma3/params_safetensors.py``.
        """
        return cls(
            embed=("embedder", "input_embedding"),
            head=None if tied else ("lm_head", "w"),
            head_layout="dv",
        )

    def paths(self) -> dict[str, Path]:
        out = {"embed": self.embed}
        if self.head is not None:
            out["head"] = self.head
        if self.bias is not None:
            out["bias"] = self.bias
        return out


@dataclass(frozen=True)
class VocabPlan:
    """Sizes before and after a resize.

    Attributes:
      num_rows: rows of the table before.
      num_tokens: tokens of the tokenizer before.
      new_num_tokens: tokens of the tokenizer after.
      new_num_rows: rows of the table after (>= new_num_tokens, a multiple of the padding).
    """

    num_rows: int
    num_tokens: int
    new_num_tokens: int
    new_num_rows: int

    @property
    def num_new(self) -> int:
        return max(self.new_num_tokens - self.num_tokens, 0)

    @property
    def new_ids(self) -> range:
        return range(self.num_tokens, self.num_tokens + self.num_new)


def plan_resize(
    num_rows: int,
    num_tokens: int,
    new_num_tokens: int,
    *,
    pad_to_multiple_of: int = 1,
    allow_shrink: bool = False,
) -> VocabPlan:
    """Decides the table's new size.

    The table keeps its rows if the new tokens fit into its spare rows; otherwise it grows to
    ``new_num_tokens`` rounded up to ``pad_to_multiple_of``. It never shrinks unless
    ``allow_shrink``; then it is cut to ``new_num_tokens`` rounded up.

    >>> plan_resize(152064, 151667, 151667 + 100).new_num_rows  # fits in the spare rows
    152064
    >>> plan_resize(1000, 1000, 1010, pad_to_multiple_of=64).new_num_rows
    1024
    """
    if pad_to_multiple_of < 1:
        raise ResizeError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if not 0 < num_tokens <= num_rows:
        raise ResizeError(
            f"the tokenizer has {num_tokens} tokens but the table has {num_rows} rows; "
            "a tokenizer cannot have more tokens than the model has rows (wrong tokenizer for this checkpoint?)"
        )
    if new_num_tokens < num_tokens and not allow_shrink:
        raise ResizeError(
            f"new vocabulary of {new_num_tokens} tokens is smaller than the current {num_tokens}: "
            "this would delete tokens; pass allow_shrink=True if that is really intended"
        )
    pad = int(pad_to_multiple_of)
    rounded = -(-new_num_tokens // pad) * pad
    if allow_shrink:
        new_rows = rounded
    else:
        new_rows = num_rows if new_num_tokens <= num_rows else rounded
    return VocabPlan(num_rows, num_tokens, new_num_tokens, new_rows)


def _norm_key(k) -> Hashable:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _leaf_path(path) -> Path:
    keys = tuple(_norm_key(k) for k in path)
    # nnx.Variable leaves flatten to (..., 'value'); the variable is what a spec names.
    if keys and keys[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
        keys = keys[:-1]
    return keys


def get_path(tree: Any, path: Path) -> Any:
    """Returns the array at ``path`` in a parameter tree (unwrapping ``nnx.Variable``)."""
    node = tree
    for i, k in enumerate(path):
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            have = list(node.keys()) if hasattr(node, "keys") else type(node).__name__
            where = "/".join(map(str, path[: i + 1]))
            raise ResizeError(
                f"parameter {where!r} not found (have {have}); check the EmbeddingSpec for this model"
            ) from None
    if hasattr(node, "get_value"):
        node = node.get_value()
    return node


def set_paths(tree: Any, by_path: Mapping[Path, Any]) -> Any:
    """A copy of ``tree`` with the arrays at ``by_path``'s paths replaced (pure; jit-safe).

    Every other leaf is returned as it is (the same array); an ``nnx.Variable`` keeps its
    type and metadata around the new value.

    >>> set_paths({"a": {"b": 1, "c": 2}}, {("a", "b"): 5})
    {'a': {'b': 5, 'c': 2}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: by_path.get(_leaf_path(path), leaf), tree
    )


def spec_arrays(params: Any, spec: EmbeddingSpec) -> tuple[dict[str, Any], int]:
    """The arrays ``spec`` names in ``params`` (``embed``, and ``head``/``bias`` when the spec
    has them) and the table's row count, after checking that their shapes agree.

    Raises:
      ResizeError: a path is missing, or the shapes disagree (one line naming the fix).

    >>> arrays, rows = spec_arrays({"e": jnp.zeros((5, 2))}, EmbeddingSpec(("e",)))
    >>> sorted(arrays), rows
    (['embed'], 5)
    """
    arrays = {name: get_path(params, p) for name, p in spec.paths().items()}
    return arrays, _check_shapes(arrays, spec)


def _vocab_shards(x: Any, axis: int) -> int:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return 1
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    names = spec[axis]
    if names is None:
        return 1
    names = (names,) if isinstance(names, str) else tuple(names)
    return math.prod(sharding.mesh.shape[n] for n in names)


def _out_sharding(x: Any):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


@functools.lru_cache(maxsize=64)
def _compiled(
    plan: VocabPlan, init: Initializer, layouts: tuple[str, ...], out_shardings, donate: bool
):
    """One jitted function per (sizes, initializer, layout, shardings)."""

    def place(table, rows, pad_row, axis):
        # table: the old parameter; rows: [N_new, D] (or [N_new] for a bias) in its dtype.
        rows = jnp.moveaxis(rows, 0, axis) if rows.ndim == 2 else rows
        if plan.new_num_rows > plan.num_rows:
            grow = list(table.shape)
            grow[axis] = plan.new_num_rows - plan.num_rows
            filler = jnp.broadcast_to(
                jnp.expand_dims(pad_row, axis) if table.ndim == 2 else pad_row, grow
            )
            table = jnp.concatenate([table, filler.astype(table.dtype)], axis=axis)
        elif plan.new_num_rows < plan.num_rows:
            table = jax.lax.slice_in_dim(table, 0, plan.new_num_rows, axis=axis)
        if plan.num_new:
            start = [0] * table.ndim
            start[axis] = plan.num_tokens
            table = jax.lax.dynamic_update_slice(table, rows.astype(table.dtype), start)
        return table

    def fn(key, tables, description_ids):
        out = []
        for i, (table, layout) in enumerate(zip(tables, layouts, strict=True)):
            axis = 1 if layout == "dv" else 0
            num_old = min(plan.num_tokens, plan.new_num_tokens)
            if layout == "bias":
                old = table[:num_old]
                pad_row = jnp.mean(old.astype(jnp.float32))
                rows = jnp.broadcast_to(pad_row, (plan.num_new,))
            else:
                old = jax.lax.slice_in_dim(table, 0, num_old, axis=axis)
                old = old.T if axis == 1 else old
                pad_row = jnp.mean(old.astype(jnp.float32), axis=0)
                ctx = InitContext(old, plan.num_new, description_ids)
                rows = init(jax.random.fold_in(key, i), ctx) if plan.num_new else old[:0]
            out.append(place(table, rows, pad_row, axis))
        return tuple(out)

    return jax.jit(fn, out_shardings=out_shardings, donate_argnums=(1,) if donate else ())


def _padded_ids(description_ids: Sequence[Sequence[int]], plan: VocabPlan) -> np.ndarray:
    if len(description_ids) != plan.num_new:
        raise ResizeError(
            f"got {len(description_ids)} descriptions for {plan.num_new} new tokens; give one per new token"
        )
    empty = [plan.num_tokens + i for i, ids in enumerate(description_ids) if len(ids) == 0]
    if empty:
        raise ResizeError(
            f"new token ids {empty[:5]} have empty descriptions; the 'description' initializer needs text for every token"
        )
    width = max((len(ids) for ids in description_ids), default=1)
    out = np.full((plan.num_new, width), -1, np.int32)
    for i, ids in enumerate(description_ids):
        out[i, : len(ids)] = ids
    bad = out[(out >= plan.num_tokens) | (out < -1)]
    if bad.size:
        raise ResizeError(
            f"description token ids {sorted(set(bad.tolist()))[:5]} are not old tokens (must be in [0, {plan.num_tokens})); "
            "encode descriptions with the tokenizer before extending it"
        )
    return out


def _check_shapes(arrays: Mapping[str, Any], spec: EmbeddingSpec) -> int:
    """Checks that the embedding, head and bias agree; returns the table's row count."""
    embed = arrays["embed"]
    if np.ndim(embed) != 2:
        raise ResizeError(
            f"embedding {'/'.join(map(str, spec.embed))} must be 2-D [V, D], got shape {np.shape(embed)}"
        )
    num_rows, dim = np.shape(embed)
    if "head" in arrays:
        want = (num_rows, dim) if spec.head_layout == "vd" else (dim, num_rows)
        if tuple(np.shape(arrays["head"])) != want:
            raise ResizeError(
                f"head has shape {tuple(np.shape(arrays['head']))}, expected {want} for head_layout={spec.head_layout!r}; "
                "check the EmbeddingSpec (a [D, V] kernel needs head_layout='dv')"
            )
    if "bias" in arrays and tuple(np.shape(arrays["bias"])) != (num_rows,):
        raise ResizeError(
            f"output bias has shape {tuple(np.shape(arrays['bias']))}, expected ({num_rows},)"
        )
    return num_rows


def _sharded_plan(
    arrays: Mapping[str, Any],
    layouts: Mapping[str, str],
    num_rows: int,
    num_tokens: int,
    new_num_tokens: int,
    *,
    pad_to_multiple_of: int,
    allow_shrink: bool,
) -> VocabPlan:
    """:func:`plan_resize`, with a grown row count also divisible by the vocabulary shards."""
    plan = plan_resize(
        num_rows,
        num_tokens,
        new_num_tokens,
        pad_to_multiple_of=pad_to_multiple_of,
        allow_shrink=allow_shrink,
    )
    shards = max(_vocab_shards(arrays[n], 1 if layouts[n] == "dv" else 0) for n in arrays)
    if plan.new_num_rows != plan.num_rows and plan.new_num_rows % shards:
        plan = plan_resize(
            num_rows,
            num_tokens,
            new_num_tokens,
            pad_to_multiple_of=math.lcm(pad_to_multiple_of, shards),
            allow_shrink=allow_shrink,
        )
    return plan


def resize_vocab(
    params: Any,
    spec: EmbeddingSpec,
    new_num_tokens: int,
    init: str | Initializer = "mean",
    key: jax.Array | None = None,
    *,
    num_tokens: int | None = None,
    pad_to_multiple_of: int = 1,
    allow_shrink: bool = False,
    description_ids: Sequence[Sequence[int]] | None = None,
    init_kwargs: Mapping[str, Any] | None = None,
    donate: bool = False,
) -> Any:
    """Returns a copy of ``params`` whose vocabulary-shaped parameters fit ``new_num_tokens``.

    Works on any parameter pytree: a nested dict (Linen, MaxText), an ``nnx.State`` or a flat
    Hugging Face name -> array dict; the tree's structure and every other leaf are returned
    as they are. The embedding ``[V, D]``, an untied head (``[V, D]`` or ``[D, V]``) and an
    output bias ``[V]`` are resized together in one jit-compiled call:

    * rows of existing tokens (and spare rows no new token needs) are kept bit for bit, in
      the parameter's own dtype;
    * new rows ``num_tokens .. new_num_tokens - 1`` come from ``init``, computed in float32
      from the old rows of the same parameter (an untied head is initialized from the head's
      own rows) and cast to the parameter's dtype; new bias entries are the old mean;
    * rows added only for padding hold the mean of the old rows;
    * arrays sharded with a ``NamedSharding`` come back with the same sharding; when the
      vocabulary axis is sharded, the row count is also rounded up to divide the shards. The
      computation runs sharded (SPMD): the table is never gathered onto one device.

    Args:
      params: the parameter tree.
      spec: where the vocabulary-shaped parameters are (:class:`EmbeddingSpec`).
      new_num_tokens: the tokenizer's size after adding the new tokens.
      init: an initializer name (``mean``, ``mean_noise``, ``mean_cov``, ``normal``,
        ``description``) or a callable ``(key, InitContext) -> [N_new, D]``.
      key: PRNG key for random initializers; ``None`` means ``jax.random.key(0)``.
      num_tokens: the tokenizer's size before; defaults to the table's row count. Pass it
        when the table has spare rows so new tokens use them.
      pad_to_multiple_of: round the row count up to a multiple of this when the table grows.
      allow_shrink: permit a result smaller than the current table (drops rows).
      description_ids: for ``init="description"``, each new token's description token ids.
      init_kwargs: keyword arguments of a named initializer (e.g. ``{"std": 0.01}``).
      donate: donate the old arrays to the computation (saves memory when the table does not
        grow; the input tree must not be used afterwards).

    Returns:
      A new tree of the same structure.

    Raises:
      ResizeError: a path is missing, shapes disagree, the request would shrink the table,
        or descriptions are missing or invalid. Raised before any computation.

    >>> import jax, jax.numpy as jnp
    >>> params = {"embed": jnp.ones((4, 2)), "head": jnp.zeros((2, 4))}
    >>> spec = EmbeddingSpec(embed=("embed",), head=("head",), head_layout="dv")
    >>> out = resize_vocab(params, spec, 6, "mean", jax.random.key(0), pad_to_multiple_of=8)
    >>> out["embed"].shape, out["head"].shape
    ((8, 2), (2, 8))
    """
    paths = spec.paths()
    arrays, num_rows = spec_arrays(params, spec)
    num_tokens = num_rows if num_tokens is None else int(num_tokens)
    layouts = {"embed": "vd", "head": spec.head_layout, "bias": "bias"}
    plan = _sharded_plan(
        arrays,
        layouts,
        num_rows,
        num_tokens,
        int(new_num_tokens),
        pad_to_multiple_of=pad_to_multiple_of,
        allow_shrink=allow_shrink,
    )

    initializer = _named_initializer(init, tuple(sorted((init_kwargs or {}).items())))
    ids = None
    if init == "description":
        if description_ids is None:
            raise ResizeError(
                "init='description' needs description_ids (the token ids of each new token's description)"
            )
        ids = jnp.asarray(_padded_ids(description_ids, plan))
    key = jax.random.key(0) if key is None else key

    names = tuple(arrays)
    fn = _compiled(
        plan,
        initializer,
        tuple(layouts[n] for n in names),
        tuple(_out_sharding(arrays[n]) for n in names),
        donate,
    )
    results = dict(zip(names, fn(key, tuple(arrays[n] for n in names), ids), strict=True))
    return set_paths(params, {paths[n]: results[n] for n in names})


@functools.lru_cache(maxsize=64)
def _named_initializer(init, kwargs: tuple) -> Initializer:
    # Cached so that repeated calls with the same named initializer reuse one compiled
    # function (a fresh closure would retrace and recompile every time).
    return get_initializer(init, **dict(kwargs))
