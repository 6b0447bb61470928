"""LoRA adapters for the projections of the gti_jax Llama family (Hu et al., 2021).

A LoRA branch adds ``(alpha / r) * dropout(x) @ A @ B`` to a projection ``x @ W``, with
``A: in_shape + [r]`` and ``B: [r] + out_shape`` matching the projection's own kernel layout
(e.g. ``W [D, H, hd]`` for a query projection: ``A [D, r]``, ``B [r, H, hd]``). ``B`` starts at
zero, so the adapted model computes exactly what the base model did.

The factors are :class:`LoRAParam` variables (a subclass of ``nnx.Param``), so a filter
selects them: ``nnx.Optimizer(model, tx, wrt=LoRAParam)``, or
``gti_jax.train.steps.make_sft_step(..., lora=True)`` (which also trains the embedding and an
untied head). Their logical axes are the kernel's input axes plus ``lora_rank`` (A) and
``lora_rank`` plus the kernel's output axes (B), so they shard with the kernel on a mesh.

Dropout is applied to the LoRA input only, and only in training: a model computes without
dropout unless :func:`set_dropout_keys` gave its branches keys, which the SFT step does on the
copy of the model it builds inside each compiled step (one key per step, folded per branch).
No random state is stored in the model.

Example:
    >>> model = apply_lora(model, rank=8, alpha=32, dropout=0.05,
    ...                    targets=("q", "v"), rngs=nnx.Rngs(0))  # doctest: +SKIP
    >>> merged = merge_lora(model)  # for export  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from gti_jax.errors import BadInput

__all__ = [
    "LORA_TARGETS",
    "LoRA",
    "LoRAError",
    "LoRAParam",
    "apply_lora",
    "lora_modules",
    "merge_lora",
    "set_dropout_keys",
]

#: Config target name -> (sub-module of a decoder layer, projection attribute).
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


class LoRAError(BadInput):
    """A LoRA request that cannot be carried out (one line naming the fix)."""


class LoRAParam(nnx.Param):
    """A LoRA factor (A or B). A subclass of `nnx.Param`: select it with filters."""


class LoRA(nnx.Module):
    """The low-rank branch ``(alpha / rank) * dropout(x) @ A @ B`` of one projection.

    Args:
        in_shape: the projection's input dims (contracted), e.g. ``(D,)`` or ``(H, hd)``.
        out_shape: its output dims, e.g. ``(H, hd)``.
        in_axes: logical axis names of `in_shape`.
        out_axes: logical axis names of `out_shape`.
        rank: ``r``.
        alpha: scale numerator.
        dropout: dropout rate on the input of the branch.
        rngs: random streams (``params`` initializes A).
        param_dtype: dtype of A and B.
        dtype: compute dtype.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        in_axes: tuple[str | None, ...],
        out_axes: tuple[str | None, ...],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
    ):
        fan_in = math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # like Kaiming-uniform with a = sqrt(5)
        a = jax.random.uniform(rngs.params(), (*in_shape, rank), param_dtype, -bound, bound)
        self.lora_a = LoRAParam(a, out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)
        self.lora_b = LoRAParam(
            jnp.zeros((rank, *out_shape), param_dtype),
            out_sharding=("lora_rank", *out_axes),
            eager_sharding=False,
        )
        self.n_in = len(in_shape)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.dtype = dtype
        # Set only on a model merged inside a training step (`set_dropout_keys`); None means
        # inference mode: no dropout.
        self.dropout_key = nnx.data(None)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        x = x.astype(self.dtype)
        z = jnp.tensordot(x, self.lora_a[...].astype(self.dtype), self.n_in)
        y = jnp.tensordot(z, self.lora_b[...].astype(self.dtype), 1)
        return y * jnp.asarray(self.scale, self.dtype)

    def delta(self) -> jax.Array:
        """``(alpha / r) * A @ B`` in the kernel's layout ``in_shape + out_shape`` (float32)."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return jnp.tensordot(a, b, 1) * self.scale


def _targets(model: nnx.Module, targets: Sequence[str]) -> Iterator[tuple[str, Any]]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise LoRAError("the model has no decoder layers; pass a gti_jax Llama model")
    for i, layer in enumerate(layers):
        for name in targets:
            sub, attr = LORA_TARGETS[name]
            yield f"layers/{i}/{sub}/{attr}", getattr(getattr(layer, sub), attr)


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRA]]:
    """The LoRA branches of a model as ``(projection path, LoRA)`` pairs."""
    return [
        (path, dense.adapter)
        for path, dense in _targets(model, tuple(LORA_TARGETS))
        if isinstance(dense.adapter, LoRA)
    ]


def set_dropout_keys(model: nnx.Module, key: jax.Array | None) -> int:
    """Gives every LoRA branch of `model` its dropout key (in place), or clears them (None).

    Branch ``i`` (in graph order) gets ``fold_in(key, i)``. Meant for a model merged inside a
    jitted step; a model with keys applies dropout on every call.

    Args:
        model: a model with LoRA branches.
        key: a PRNG key, or None to turn dropout off.

    Returns:
        The number of branches with a dropout rate > 0.
    """
    count = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRA):
            module.dropout_key = None if key is None else jax.random.fold_in(key, count)
            count += module.dropout > 0
    return int(count)


def _fresh(model: nnx.Module) -> nnx.Module:
    """A new module graph sharing the (immutable) arrays of `model`."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # new Variable objects, same arrays
    return nnx.merge(graphdef, state)


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str],
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Returns a copy of `model` with LoRA branches on the targeted projections.

    The input model is left unchanged (the copy shares its arrays; no memory is duplicated).
    ``B`` is zero, so the result computes the same logits as the input.

    Args:
        model: a gti_jax Llama model without adapters.
        rank: LoRA rank ``r`` (>= 1).
        alpha: scale numerator (the branch is scaled by ``alpha / r``).
        dropout: dropout rate on the branch input, in [0, 1).
        targets: projections to adapt, from ``q, k, v, o, gate, up, down``
            (config ``sft.lora_targets``).
        rngs: random streams: ``params`` initializes A.

    Returns:
        The adapted model.

    Raises:
        LoRAError: bad rank, dropout or target, or the model already has adapters.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> base = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> lora = apply_lora(base, rank=4, alpha=8, dropout=0.0, targets=("q", "v"),
        ...                   rngs=nnx.Rngs(1))
        >>> lora.layers[0].self_attn.q_proj.adapter.lora_b.shape
        (4, 2, 8)
    """
    if int(rank) < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank} (sft.lora_rank)")
    if not 0 <= dropout < 1:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout} (sft.lora_dropout)")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise LoRAError(
            f"unknown LoRA targets {bad or list(targets)}; choose from {', '.join(LORA_TARGETS)}"
        )
    if lora_modules(model):
        raise LoRAError("the model already has LoRA adapters; merge_lora(model) first")
    out = _fresh(model)
    for _, dense in _targets(out, tuple(dict.fromkeys(targets))):
        kernel = dense.kernel
        axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        shape = tuple(kernel.shape)
        dense.adapter = LoRA(
            shape[: dense.n_in],
            shape[dense.n_in :],
            axes[: dense.n_in],
            axes[dense.n_in :],
            rank=int(rank),
            alpha=float(alpha),
            dropout=float(dropout),
            rngs=rngs,
            param_dtype=kernel.dtype,
            dtype=dense.dtype,
        )
    return out


def _add_delta(kernel: jax.Array, delta: jax.Array) -> jax.Array:
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Returns a copy of `model` with every LoRA branch folded into its kernel and removed.

    ``kernel += (alpha / r) * A @ B`` (computed in float32, cast to the kernel's dtype; the
    kernel keeps its sharding). The result has exactly the base model's parameters, ready for
    export; the input model is left unchanged.

    Args:
        model: a model with LoRA adapters (a model without any is returned as a copy).

    Returns:
        The merged model.

    Example:
        >>> merged = merge_lora(lora_model)  # doctest: +SKIP
        >>> any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(merged))  # doctest: +SKIP
        False
    """
    out = _fresh(model)
    for _, dense in _targets(out, tuple(LORA_TARGETS)):
        lora = dense.adapter
        if not isinstance(lora, LoRA):
            continue
        kernel = dense.kernel[...]
        sharding = getattr(kernel, "sharding", None)
        kw = {"out_shardings": sharding} if isinstance(sharding, NamedSharding) else {}
        merged = jax.jit(_add_delta, **kw)(kernel, lora.delta())
        dense.kernel.set_value(merged)
        dense.adapter = None
    return out
