"""Logical axis names -> mesh axes: one rules table, a mesh builder, and model placement.

Every model parameter carries logical axis names (`("vocab", "embed")` for the embedding) in
its `out_sharding` metadata. A rules table maps each logical name to zero, one or several mesh
axes; re-sharding a model is a matter of editing the rules, not the model code (MaxText style).

Example:
    >>> mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    >>> logical_to_spec(("vocab", "embed"), LOGICAL_RULES, mesh)
    P(None, None)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gti_jax.errors import BadInput

__all__ = [
    "ActivationSharding",
    "LOGICAL_RULES",
    "MESH_AXES",
    "MeshError",
    "make_mesh",
    "logical_to_spec",
    "logical_axes",
    "state_shardings",
    "cache_shardings",
    "constrain",
    "shard_activations",
    "shard_model",
    "create_sharded_model",
    "host_array",
    "model_mesh",
    "put_rows",
]

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]]

#: Mesh axis names used by the default rules, outermost first.
MESH_AXES = ("data", "fsdp", "tensor")

#: Default logical -> mesh axis rules. `None` means replicated. Names not listed replicate.
LOGICAL_RULES: Mapping[str, MeshAxes] = MappingProxyType(
    {
        "batch": ("data", "fsdp"),
        # The rows of the activations inside the model (residual stream, logits): pinned to
        # the batch axes so that fsdp all-gathers weights (see `constrain`); null turns the
        # constraints off and leaves the layout to XLA's partitioner.
        "activation_batch": ("data", "fsdp"),
        "vocab": "tensor",
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "mlp": "tensor",
        "norm": None,
        "seq": None,
        "cache_seq": None,
    }
)


class MeshError(BadInput):
    """A mesh request does not fit the available devices."""


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a device mesh with named axes (Auto axis types).

    Args:
        axis_sizes: ordered mapping axis name -> size; one size may be -1 ("the rest").
        devices: devices to use; defaults to `jax.devices()`.

    Returns:
        A `jax.sharding.Mesh` whose axes follow the order of `axis_sizes`.

    Raises:
        MeshError: the product of the sizes differs from the number of devices.

    Example:
        >>> dict(make_mesh({"data": -1, "tensor": 1}, devices=jax.devices()[:1]).shape)
        {'data': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axis_sizes)
    sizes = [int(s) for s in axis_sizes.values()]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(axis_sizes)}: at most one axis may have size -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {dict(axis_sizes)}: sizes must be positive (or one -1)")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise MeshError(
                f"mesh {dict(axis_sizes)}: {len(devices)} devices are not divisible by {rest}"
            )
        sizes[sizes.index(-1)] = len(devices) // rest
    if math.prod(sizes) != len(devices):
        raise MeshError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{len(devices)} are available; make the axis sizes multiply to {len(devices)}"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names)


def _as_dict(rules: Rules) -> dict[str, MeshAxes]:
    return dict(rules.items() if isinstance(rules, Mapping) else rules)


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules = LOGICAL_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names of an array to a `PartitionSpec` for `mesh`.

    Per dimension: the rule's mesh axes, minus axes the mesh lacks or has at size 1, minus axes
    an earlier dimension already uses. When `shape` is given and a dimension is not divisible
    by the product of its mesh axes, that dimension is replicated instead (correct, only less
    distributed), so odd vocabulary sizes never fail to load. Unknown names replicate.

    Args:
        names: one logical name (or None) per dimension.
        rules: logical name -> mesh axis, tuple of axes, or None.
        mesh: the mesh; None keeps every rule axis (no size information).
        shape: the array shape, to check divisibility.

    Returns:
        The `PartitionSpec`.

    Example:
        >>> logical_to_spec(("embed", "vocab"), {"vocab": "tensor", "embed": "fsdp"})
        P('fsdp', 'tensor')
    """
    table = _as_dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        if axes and shape is not None and mesh is not None:
            if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names of a variable (all None when it has none)."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else (None,) * len(variable.shape)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """`NamedSharding`s for every variable of a model or `nnx.State`, from its logical names.

    Args:
        tree: an NNX module or state (concrete or abstract from `nnx.eval_shape`).
        mesh: the mesh.
        rules: logical rules.

    Returns:
        A pytree of the same structure as `nnx.state(tree)` with `NamedSharding` leaves, usable
        as jit `out_shardings` or with `jax.device_put`.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
        >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
        >>> state_shardings(model, mesh)["embed"]["embedding"].get_value().spec
        P(None, None)
    """
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

    def one(v):
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(logical_axes(v), rules, mesh, v.shape)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """`NamedSharding`s for a `KVCache` (batch and kv_heads sharded as the rules say).

    Args:
        cache: a `gti_jax.models.llama.KVCache` (concrete or abstract).
        mesh: the mesh.
        rules: logical rules.

    Returns:
        A `KVCache`-shaped pytree of `NamedSharding`, for `jax.device_put` or jit shardings.

    Example:
        >>> from gti_jax.models.llama import KVCache
        >>> cache = KVCache.zeros(num_layers=1, batch=2, max_len=4, num_kv_heads=1,
        ...                       head_dim=2, dtype=jax.numpy.float32)
        >>> mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
        >>> cache = jax.device_put(cache, cache_shardings(cache, mesh))
    """
    spec = lambda names, x: NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape))
    kv_axes = ("batch", "cache_seq", "kv_heads", "head_dim")
    return type(cache)(
        k=tuple(spec(kv_axes, x) for x in cache.k),
        v=tuple(spec(kv_axes, x) for x in cache.v),
        key_mask=spec(("batch", "cache_seq"), cache.key_mask),
        positions=spec(("batch",), cache.positions),
        index=NamedSharding(mesh, PartitionSpec()),
    )


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Where a model's activations live: the mesh and the rules (hashable, so a model holding
    it as a static attribute keeps a hashable graph definition; see :func:`shard_activations`).
    """

    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...]

    @classmethod
    def of(cls, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> ActivationSharding:
        """From a mesh and a rules table (lists of axes, as a YAML config gives, become tuples).

        Example:
            >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
            >>> ActivationSharding.of(mesh, {"batch": ["data", "fsdp"]}).rules
            (('batch', ('data', 'fsdp')),)
        """
        fix = lambda a: a if a is None or isinstance(a, str) else tuple(a)  # noqa: E731
        return cls(mesh, tuple((k, fix(v)) for k, v in _as_dict(rules).items()))


def constrain(x: jax.Array, names: Sequence[str | None], where: ActivationSharding | None):
    """`x` constrained (`jax.lax.with_sharding_constraint`) to the sharding its logical names
    give under `where`; `x` unchanged when `where` is None, when the rules shard nothing on this
    mesh (e.g. ``activation_batch: null``), or when `x`'s leading (rows) dimension does not
    divide over its mesh axes.

    Why it exists: given weights sharded on ``embed -> fsdp`` and nothing said about the
    activations, XLA's SPMD partitioner may keep the weights in place and contract over the
    sharded model dimension, so that every device holds the activations of the whole global
    batch and all-reduces activation-sized partial sums. Pinning the batch dimension of the
    residual stream and the logits to the batch axes makes it all-gather the weights instead
    (FSDP). A leading dimension that does not divide (beam rows, padded evaluation rows) is left
    to the partitioner rather than forced to replicate; other dimensions that do not divide
    are replicated, as `logical_to_spec` does for parameters.

    Example:
        >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
        >>> x = jax.numpy.ones((2, 3))
        >>> constrain(x, ("activation_batch", None), None) is x  # no mesh: nothing to do
        True
    """
    if where is None:
        return x
    full = logical_to_spec(names, where.rules, where.mesh)
    spec = logical_to_spec(names, where.rules, where.mesh, x.shape)
    if spec[0] != full[0] or all(axes is None for axes in spec):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(where.mesh, spec))


def shard_activations(model: nnx.Module, mesh: Mesh | None, rules: Rules = LOGICAL_RULES):
    """Makes `model` constrain its activations to `mesh` (in place; returns it): every module
    with an ``activation_sharding`` attribute (the gti_jax causal LMs) gets an
    :class:`ActivationSharding` (None when `mesh` is None: no constraints, the default).

    The attribute is static, so it lives in the graph definition: a model merged from it
    anywhere (a step's compiled function, `nnx.split`/`merge`, LoRA wrapping) constrains the
    same way. The training steps set it whenever they are given a mesh; `shard_model` and
    `create_sharded_model` set it on the models they return.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
        >>> model = shard_activations(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
        >>> model.activation_sharding.mesh is mesh
        True
    """
    where = None if mesh is None else ActivationSharding.of(mesh, rules)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "activation_sharding"):
            module.activation_sharding = where
    return model


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Returns a new model whose parameters are placed by the rules on `mesh`, and whose
    activations are constrained to it (:func:`shard_activations`).

    Args:
        model: a concrete NNX model.
        mesh: the mesh.
        rules: logical rules.

    Returns:
        A model (new object) with resharded parameters; the input is left unchanged.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
        >>> sharded = shard_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    """
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return shard_activations(nnx.merge(graphdef, state), mesh, rules)


def create_sharded_model(make_model, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Builds a model directly in its sharded placement (never whole on one device), its
    activations constrained to the mesh (:func:`shard_activations`).

    Args:
        make_model: a zero-argument function returning a freshly initialized model, e.g.
            `lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))`.
        mesh: the mesh.
        rules: logical rules.

    Returns:
        The model, each parameter created by a jit with `out_shardings` from the rules.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
        >>> m = create_sharded_model(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    init = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)
    return shard_activations(nnx.merge(graphdef, init()), mesh, rules)


# --------------------------------------------------------------------------------------------
# Arrays that span processes: one tensor at a time to the host, whole host rows onto a mesh.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="dtype")
def _astype(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype)


def _identity(x):
    return x


def _replicate(x: jax.Array) -> jax.Array:
    """`x` whole on every device of its mesh: the one transient copy a gather makes."""
    return jax.jit(_identity, out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))(x)


def host_array(x: Any, *, dtype=None) -> np.ndarray:
    """One array whole in host memory, cast on its devices first; a collective across processes.

    The cast runs where the shards are (so a bfloat16 copy moves half the bytes of a float32
    one, and every process rounds the same way); an array that spans several processes is
    then gathered by a replicated copy of this one array, never more.
    Every process must call it for the same arrays in the same order.

    Args:
        x: a `jax.Array` (sharded or not) or a host array.
        dtype: cast to this dtype first (e.g. `jnp.bfloat16`); None keeps it.

    Returns:
        A numpy array of `x`'s global shape.

    Example:
        >>> host_array(jax.numpy.arange(3.0), dtype=jax.numpy.bfloat16).dtype.name
        'bfloat16'
    """
    if dtype is not None and np.dtype(dtype) != x.dtype:
        x = _astype(x, np.dtype(dtype)) if isinstance(x, jax.Array) else np.asarray(x, dtype)
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if isinstance(x.sharding, NamedSharding):
        return np.asarray(_replicate(x).addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_rows(x: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Places a host array that every process holds whole (the same rows everywhere) on
    `sharding`, each device taking its slice; None: the default device.

    Example:
        >>> mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
        >>> put_rows(np.zeros((2, 3)), NamedSharding(mesh, PartitionSpec("data"))).shape
        (2, 3)
    """
    x = np.asarray(x)
    if sharding is None:
        return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def model_mesh(tree: Any) -> Mesh | None:
    """The mesh a model's (or state's) parameters are placed on, or None when they live on
    one device (a model never sharded, or gathered to the host).

    Example:
        >>> model_mesh({"w": jax.numpy.zeros(2)}) is None
        True
    """
    leaves = jax.tree.leaves(nnx.state(tree) if isinstance(tree, nnx.Module) else tree)
    for x in leaves:
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None
