"""A Flax NNX decoder for the Llama family: Llama, SmolLM2, Qwen2 (q/k/v biases), Qwen3 (q/k norms),
Mistral (sliding-window attention); `gti_jax.models.gemma3` builds Gemma 3 on these modules.

The model follows the Hugging Face implementation numerically (RMSNorm in float32, RoPE with
the rotate-half convention, grouped-query attention, SwiGLU MLP) so that logits match
`transformers` to ~1e-5 in float32.

Parameters (paths in `nnx.state(model)`; shapes; logical axis names in the `out_sharding`
metadata of each `nnx.Param`, mapped to mesh axes by `gti_jax.models.sharding`):

=========================================  ==============  ===============================
path                                       shape           logical axes
=========================================  ==============  ===============================
embed/embedding                            [V, D]          (vocab, embed)
layers/{i}/input_layernorm/scale           [D]             (norm,)
layers/{i}/self_attn/q_proj/kernel         [D, H, hd]      (embed, heads, head_dim)
layers/{i}/self_attn/q_proj/bias  (Qwen2)  [H, hd]         (heads, head_dim)
layers/{i}/self_attn/k_proj/kernel         [D, K, hd]      (embed, kv_heads, head_dim)
layers/{i}/self_attn/v_proj/kernel         [D, K, hd]      (embed, kv_heads, head_dim)
layers/{i}/self_attn/q_norm/scale (Qwen3)  [hd]            (norm,)
layers/{i}/self_attn/o_proj/kernel         [H, hd, D]      (heads, head_dim, embed)
layers/{i}/post_attention_layernorm/scale  [D]             (norm,)
layers/{i}/mlp/gate_proj/kernel            [D, F]          (embed, mlp)
layers/{i}/mlp/up_proj/kernel              [D, F]          (embed, mlp)
layers/{i}/mlp/down_proj/kernel            [F, D]          (mlp, embed)
norm/scale                                 [D]             (norm,)
lm_head/kernel  (untied only)              [D, V]          (embed, vocab)
=========================================  ==============  ===============================

So `model.embed.embedding` is the input table and `model.lm_head.kernel` the untied head. A
tied model has no `lm_head` attribute at all: its logits are `h @ embed.embedding.T`, so
extending the table extends the head too.

Layers live in an `nnx.List` (not `nnx.scan`): paths keep the checkpoint's layer index, and
the decoders here have at most a few dozen layers, so unrolled compile time is acceptable.

With a mesh (`gti_jax.models.sharding.shard_activations`, which the training steps and
`shard_model` call), the residual stream `[B, T, D]` (the input, every layer's output, the
final norm) is constrained to the logical axes `(activation_batch, seq, None)` and the logits
`[B, T, V]` to `(activation_batch, seq, vocab)`: rows over the batch mesh axes (the default
rules; `activation_batch: null` turns it off), the model dimension replicated, so the
partitioner all-gathers fsdp-sharded weights instead of splitting the contraction over
them (see `gti_jax.models.sharding.constrain`). D stays replicated rather than following
`embed`: `embed` maps to fsdp, which already splits the rows, and an fsdp-sharded residual
is the layout that makes every matmul a partial sum (MaxText's `activation_embed` is likewise
not an fsdp axis).

Decoding uses an explicit functional KV cache (`KVCache`, see `LlamaForCausalLM.init_cache`).
Each layer has a static RoPE table and sliding window (`layer_inv_freq`, `layer_window`); a
window `w` lets a token attend to itself and the `w - 1` cache slots before it (the cache
keeps every slot, the mask does the windowing, as transformers' sliding-window mask).

Example:
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 64)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gti_jax.models.config import ConfigError, LlamaConfig
from gti_jax.models.sharding import constrain

__all__ = [
    "ATTENTION_KERNELS",
    "REMAT_POLICIES",
    "KVCache",
    "LlamaForCausalLM",
    "SharedPrefixKV",
    "configure_compute",
    "default_positions",
    "rope_inv_freq",
]

Array = jax.Array
_INIT_STD = 0.02

#: Attention implementations (`Attention.kernel`): "einsum" writes softmax(QK^T)V out;
#: "dot_product" calls `jax.nn.dot_product_attention`, so the backend may pick a fused kernel.
ATTENTION_KERNELS = ("einsum", "dot_product")

#: Rematerialization of each decoder layer in the backward pass (`LlamaForCausalLM.remat`):
#: "none" keeps every activation; "full" saves nothing inside a layer (its input is kept, the
#: rest recomputed); "dots" saves the outputs of matmuls without batch dimensions (the
#: projections), recomputing the cheap elementwise work and the attention scores.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs | None, init, shape, dtype, axes) -> nnx.Param:
    """A parameter with logical axis names stored as `out_sharding` metadata.

    `eager_sharding=False` keeps the names as pure metadata: the model never needs a mesh to be
    built, and `gti_jax.models.sharding` turns the names into shardings when asked.
    """
    value = init(rngs.params() if rngs is not None else None, shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


_normal = lambda key, shape, dtype: _INIT_STD * jax.random.normal(key, shape, dtype)
_zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)
_ones = lambda key, shape, dtype: jnp.ones(shape, dtype)


class Embed(nnx.Module):
    """Token embedding table `embedding` of shape `[V, D]`."""

    def __init__(self, num_rows: int, dim: int, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.embedding = _param(rngs, _normal, (num_rows, dim), param_dtype, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        """Looks up `[B, T]` ids and returns `[B, T, D]` vectors in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Dense(nnx.Module):
    """A linear map contracting the trailing `len(in_shape)` input dims with the kernel.

    The kernel has shape `in_shape + out_shape` (e.g. `[D, H, hd]` for a query projection),
    so head structure is explicit and shardable by name. `adapter` (None by default) may hold
    a module whose output is added to the result, e.g. a LoRA branch
    (`gti_jax.train.lora.apply_lora`); it adds no parameters until set.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        axes: tuple[str | None, ...],
        *,
        use_bias: bool = False,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
    ):
        self.n_in = len(in_shape)
        self.kernel = _param(rngs, _normal, in_shape + out_shape, param_dtype, axes)
        self.bias = (
            _param(rngs, _zeros, out_shape, param_dtype, axes[self.n_in :]) if use_bias else None
        )
        self.dtype = dtype
        # Optional module adding `adapter(x)` to the output (LoRA; see gti_jax.train.lora).
        self.adapter = nnx.data(None)

    def __call__(self, x: Array) -> Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.adapter is not None:
            y = y + self.adapter(x).astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned `scale` (computed in float32, like HF)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.scale = _param(None, _ones, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies `[hd // 2]` (float32), with Llama-3 scaling when configured.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> rope_inv_freq(cfg).shape
        (4,)
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # float32 throughout, as transformers computes it
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_cos_sin(inv_freq: np.ndarray, positions: Array) -> tuple[Array, Array]:
    """cos/sin tables `[B, T, hd]` for integer positions `[B, T]` (float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `[B, T, N, hd]` by the rotate-half convention of Hugging Face Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def default_positions(attention_mask: Array, start: Array | int = 0) -> Array:
    """RoPE positions `[B, T]` that skip padding: `start + cumsum(mask) - 1`, floored at 0.

    With left padding, the first real token of every row gets position `start`, so a padded
    prompt sees the same positions (and logits) as the same prompt unpadded.

    Args:
        attention_mask: `[B, T]` of 1 (token) / 0 (padding).
        start: `[B]` or scalar position of the first real token.

    Returns:
        `[B, T]` int32 positions.

    Example:
        >>> default_positions(jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist()
        [[0, 0, 0, 1], [0, 1, 2, 3]]
    """
    mask = attention_mask.astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32).reshape(-1, 1)
    return jnp.maximum(start + jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _layer_call(remat: str):
    """How `hidden_states` calls a decoder layer: directly, or as a `jax.checkpoint` with the
    policy `REMAT_POLICIES[remat]`, each layer its own checkpoint (the backward pass keeps
    the layers' inputs and recomputes one layer at a time).

    The checkpointed function is pure: the layer is split into its graph definition and
    state and merged inside. A decoder layer changes no state when called (no counters, no
    batch statistics; LoRA's dropout key is read, not advanced), so nothing needs carrying
    out, which `nnx.remat` would try to do (and cannot, for variables of an outer trace).
    """
    if remat == "none":
        return lambda layer, *args: layer(*args)
    policy = REMAT_POLICIES[remat]

    def call(layer, *args):
        graphdef, state = nnx.split(layer)
        pure = lambda state, *args: nnx.merge(graphdef, state)(*args)  # noqa: E731
        return jax.checkpoint(pure, policy=policy, prevent_cse=True)(state, *args)

    return call


def configure_compute(
    model: nnx.Module, *, attention: str | None = None, remat: str | None = None
) -> nnx.Module:
    """Sets how `model` computes (in place; returns it): the attention kernel of every
    attention module and the rematerialization policy of the decoder layers.

    Both are static Python attributes, so a jitted function traces the choice; neither
    changes the parameters, and both leave logits and gradients equal up to float rounding.
    A step sets them on the model it merges inside the compiled function, as it sets the
    compute dtype.

    Args:
        model: a gti_jax causal LM (Llama family or Gemma 3).
        attention: one of `ATTENTION_KERNELS`, or None to leave it.
        remat: a key of `REMAT_POLICIES`, or None to leave it.

    Raises:
        ConfigError: an unknown kernel or policy.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = configure_compute(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), remat="full")
        >>> model.remat, model.layers[0].self_attn.kernel
        ('full', 'einsum')
    """
    if attention is not None and attention not in ATTENTION_KERNELS:
        raise ConfigError(f"attention={attention!r} is not one of {list(ATTENTION_KERNELS)}")
    if remat is not None and remat not in REMAT_POLICIES:
        raise ConfigError(f"remat={remat!r} is not one of {list(REMAT_POLICIES)}")
    for _, module in nnx.iter_modules(model):
        if attention is not None and isinstance(module, Attention):
            module.kernel = attention
        if remat is not None and isinstance(module, LlamaForCausalLM):
            module.remat = remat
    return model


class KVCache(NamedTuple):
    """Functional key/value cache for incremental decoding (a pytree; jit and scan friendly).

    The cache has `S = max_len` slots shared by the whole batch. A call with `T` new tokens
    writes their keys/values at slots `[index, index + T)` of every row and advances `index`
    by `T`; it never mutates the cache in place, it returns a new one. Padding is tracked per
    slot in `key_mask`, RoPE positions per row in `positions`, so left-padded prompts of
    different lengths decode together correctly.

    Attributes:
        k: one `[B, S, K, hd]` array per layer (keys after RoPE).
        v: one `[B, S, K, hd]` array per layer.
        key_mask: `[B, S]` bool; True where a slot holds a real (non-padding) token.
        positions: `[B]` int32; the RoPE position the next real token of each row gets
            (= the number of real tokens seen so far).
        index: `[]` int32; the next slot to write.

    Writing past `max_len` is not detected inside jit (XLA clamps the write); size the cache
    for prompt length + new tokens. Logical axes (for `gti_jax.models.sharding.cache_shardings`):
    k/v `("batch", "cache_seq", "kv_heads", "head_dim")`, key_mask `("batch", "cache_seq")`,
    positions `("batch",)`, index replicated.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    key_mask: Array
    positions: Array
    index: Array

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    def take(self, rows: Array) -> KVCache:
        """Selects/reorders batch rows, e.g. to expand prompts into beams or follow beam parents.

        Args:
            rows: `[B']` int indices into the current batch.

        Returns:
            A cache with batch size `B'` (same `index`).

        Example:
            >>> cache = KVCache.zeros(num_layers=1, batch=2, max_len=4, num_kv_heads=1,
            ...                       head_dim=2, dtype=jnp.float32)
            >>> cache.take(jnp.array([0, 0, 1, 1])).batch_size
            4
        """
        pick = lambda x: jnp.take(x, rows, axis=0)
        # A shared prompt stays put: only the beams' own slots follow `rows`.
        pick_kv = lambda x: x.take(rows) if isinstance(x, SharedPrefixKV) else pick(x)
        return KVCache(
            k=tuple(pick_kv(x) for x in self.k),
            v=tuple(pick_kv(x) for x in self.v),
            key_mask=pick(self.key_mask),
            positions=pick(self.positions),
            index=self.index,
        )

    @staticmethod
    def zeros(
        *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype
    ) -> KVCache:
        """An empty cache (all slots invalid, index 0, positions 0)."""
        shape = (batch, max_len, num_kv_heads, head_dim)
        return KVCache(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            key_mask=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


class SharedPrefixKV(NamedTuple):
    """One layer's keys (or values) in a cache whose rows share prompts (beam search).

    A prompt's `P` slots are stored once (`prefix [B, P, K, hd]`) and read by all of its
    `W` rows, where a plain cache would hold `W` copies; each row's own slots (the tokens
    generated after the prompt) are in `suffix [B * W, S - P, K, hd]`, rows of one prompt
    adjacent. The `KVCache` holding it keeps its per-row `key_mask [B * W, S]`,
    `positions` and `index` as usual, so masks and RoPE are unchanged; `Attention` reads
    both parts, and `KVCache.take` reorders only `suffix` (rows must stay within their
    prompt, as beam parents do).
    """

    prefix: Array
    suffix: Array

    def take(self, rows: Array) -> SharedPrefixKV:
        return SharedPrefixKV(self.prefix, jnp.take(self.suffix, rows, axis=0))


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v biases and q/k RMSNorm."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        d, h, k, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        bias = config.attention_bias
        self.q_proj = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=bias, **kw)
        self.k_proj = Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), use_bias=bias, **kw)
        self.v_proj = Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), use_bias=bias, **kw)
        self.o_proj = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), **kw)
        if config.qk_norm:
            norm_kw = dict(param_dtype=param_dtype, dtype=dtype)
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, **norm_kw)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, **norm_kw)
        else:
            self.q_norm = self.k_norm = None
        self.num_kv_heads, self.head_dim, self.dtype = k, hd, dtype
        self.scale = hd**-0.5  # scores = q.k * scale (Gemma 3: query_pre_attn_scalar**-0.5)
        self.softcap = None  # scores = softcap * tanh(scores / softcap) when set (Gemma)
        # "einsum" or "dot_product" (ATTENTION_KERNELS; set by `configure_compute`).
        self.kernel = "einsum"

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        kv: tuple[Array, Array] | None,
        index: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Attends `[B, T, D]` inputs; `mask` is `[B, T, S]` bool (True = may attend).

        Without a cache `S = T`; with one, `kv` holds this layer's `[B, S, K, hd]` keys and
        values and the new ones are written at `index` before attending.
        """
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if kv is not None and isinstance(kv[0], SharedPrefixKV):
            return self._attend_shared_prefix(q, k, v, mask, kv, index)
        new_kv = None
        if kv is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            new_kv = (k, v)
        k, v = k.astype(self.dtype), v.astype(self.dtype)
        if self.kernel == "dot_product" and self.softcap is None:
            return self.o_proj(self._fused(q, k, v, mask)), new_kv
        groups = q.shape[2] // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        probs = self._probs(scores, mask)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, -1, self.head_dim)
        return self.o_proj(out), new_kv

    def _probs(self, scores: Array, mask: Array) -> Array:
        """Attention weights from raw `q.k` scores `[B, K, G, T, S]` and `mask [B, T, S]`."""
        scores = scores * self.scale
        if self.softcap is not None:
            scores = self.softcap * jnp.tanh(scores / self.softcap)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(scores, axis=-1).astype(self.dtype)

    def _attend_shared_prefix(self, q, k, v, mask, kv, index):
        """`__call__` over a `SharedPrefixKV` cache: each row's queries attend to its
        prompt's slots (read once per prompt, broadcast over its rows) and to its own."""
        (kp, ks), (vp, vs) = kv
        n, p = kp.shape[:2]
        ks = jax.lax.dynamic_update_slice(ks, k.astype(ks.dtype), (0, index - p, 0, 0))
        vs = jax.lax.dynamic_update_slice(vs, v.astype(vs.dtype), (0, index - p, 0, 0))
        b, t, h, hd = q.shape
        kh, w = self.num_kv_heads, b // n
        q = q.reshape(n, w, t, kh, h // kh, hd)
        per_row = lambda x: x.reshape(n, w, *x.shape[1:]).astype(self.dtype)
        f32 = dict(preferred_element_type=jnp.float32)
        pre = jnp.einsum("nwtkgh,nskh->nwkgts", q, kp.astype(self.dtype), **f32)
        own = jnp.einsum("nwtkgh,nwskh->nwkgts", q, per_row(ks), **f32)
        scores = jnp.concatenate([pre, own], axis=-1).reshape(b, kh, h // kh, t, -1)
        probs = self._probs(scores, mask).reshape(n, w, kh, h // kh, t, -1)
        out = jnp.einsum("nwkgts,nskh->nwtkgh", probs[..., :p], vp.astype(self.dtype))
        out = out + jnp.einsum("nwkgts,nwskh->nwtkgh", probs[..., p:], per_row(vs))
        new_kv = (SharedPrefixKV(kp, ks), SharedPrefixKV(vp, vs))
        return self.o_proj(out.reshape(b, t, h, hd)), new_kv

    def _fused(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
        """`jax.nn.dot_product_attention` on `[B, T, H, hd]` queries and `[B, S, K, hd]` keys.

        The same math as the einsum path: query head `h` reads key/value head `h // (H / K)`
        (the kernel's GQA grouping, and ours), scores in float32 times `self.scale` (Gemma 3's
        `query_pre_attn_scalar ** -0.5` included), the boolean `[B, T, S]` mask (causal, sliding
        window and padding combined) broadcast over heads. Masked scores become a large finite
        negative there instead of our float32 minimum; both vanish in the softmax, and a row
        with nothing allowed (a padding query) is uniform in both. The kernel has no score
        soft-cap, so a layer with `softcap` set keeps the einsum path.
        """
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=self.scale)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Dense((d,), (f,), ("embed", "mlp"), **kw)
        self.up_proj = Dense((d,), (f,), ("embed", "mlp"), **kw)
        self.down_proj = Dense((f,), (d,), ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask, kv, index):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class LlamaForCausalLM(nnx.Module):
    """Llama-family causal LM (Llama, SmolLM2, Qwen2, Qwen3) in Flax NNX.

    Args:
        config: the architecture.
        rngs: random streams for the initial (random) parameters.
        param_dtype: dtype parameters are stored in.
        dtype: compute dtype (activations, matmuls); logits are always float32.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> model.lm_head.kernel.shape
        (16, 32)
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        self.config = config
        self.dtype = dtype
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.embed = Embed(config.vocab_size, config.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs, **kw) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(
                (config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), rngs=rngs, **kw
            )
        self.inv_freq = tuple(rope_inv_freq(config).tolist())  # static, hashable
        # Per layer (static): the RoPE inverse frequencies and the sliding window (None = full
        # attention). One table for every layer here; Gemma 3 alternates local/global layers.
        self.layer_inv_freq = (self.inv_freq,) * config.num_hidden_layers
        self.layer_window = (config.sliding_window,) * config.num_hidden_layers
        self.remat = "none"  # REMAT_POLICIES key; set by `configure_compute`
        # An ActivationSharding or None (one device: no constraints); static, set by
        # `gti_jax.models.sharding.shard_activations`.
        self.activation_sharding = None

    @property
    def num_rows(self) -> int:
        """Rows of the embedding table (and of the output head)."""
        return self.embed.embedding.shape[0]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """Returns an empty `KVCache` for `batch` rows and `max_len` token slots.

        Decoding protocol (what a generation loop does):

        1. `cache = model.init_cache(B, T_prompt + max_new_tokens)`.
        2. Prefill: `logits, cache = model(prompt_ids, attention_mask=prompt_mask,
           cache=cache)` with left-padded `[B, T_prompt]` ids and a 1/0 mask. The next-token
           distribution of each row is `logits[:, -1]` (the last slot is real for every row
           under left padding).
        3. Step: `logits, cache = model(next_ids[:, None], cache=cache)`; `logits[:, 0]` is the
           distribution of the following token. Repeat. No mask is needed for steps (new
           tokens are real); pass `attention_mask=[[0], ...]` for rows that are finished if
           you want their keys ignored (not necessary for correctness of live rows).
        4. Beam search: `cache.take(rows)` to repeat prompts into beams
           (`rows = jnp.repeat(jnp.arange(B), n_beams)`) and to reorder by beam parents.

        All of it is jit-compatible: the cache is a pytree of fixed shapes, `index` is traced.

        Args:
            batch: rows `B`.
            max_len: slots `S` (prompt length plus tokens to generate).
            dtype: cache dtype; defaults to the compute dtype.

        Returns:
            A `KVCache` of zeros with `index = 0`.

        Example:
            >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            ...                   num_hidden_layers=1, num_attention_heads=2)
            >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
            >>> cache = model.init_cache(2, 8)
            >>> logits, cache = model(jnp.ones((2, 3), jnp.int32), cache=cache)
            >>> logits, cache = model(jnp.ones((2, 1), jnp.int32), cache=cache)
            >>> int(cache.index), logits.shape
            (4, (2, 1, 32))
        """
        cfg = self.config
        return KVCache.zeros(
            num_layers=cfg.num_hidden_layers,
            batch=batch,
            max_len=max_len,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            dtype=dtype or self.dtype,
        )

    def hidden_states(
        self,
        x: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Runs the decoder stack on input vectors `[B, T, D]`; returns final-normed `[B, T, D]`.

        Useful to feed embeddings that do not come from `self.embed` (e.g. new-token rows
        kept in their own array). Arguments as in `__call__`.
        """
        b, t, _ = x.shape
        mask_in = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        x = self._constrain(x.astype(self.dtype))
        if cache is None:
            if positions is None:
                positions = default_positions(mask_in)
            q_slot = k_slot = jnp.arange(t)
            key_mask = mask_in
            index, kvs = None, [None] * len(self.layers)
        else:
            if positions is None:
                positions = default_positions(mask_in, cache.positions)
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask_in, (0, index))
            q_slot, k_slot = index + jnp.arange(t), jnp.arange(cache.max_len)
            kvs = list(zip(cache.k, cache.v, strict=True))
        # Slots, not RoPE positions, measure causality and the window: left padding is
        # contiguous, so among real tokens slot distance equals position distance (as in HF).
        distance = q_slot[:, None] - k_slot[None, :]
        masks, ropes, new_kvs = {}, {}, []
        call = _layer_call(self.remat)
        for i, (layer, kv) in enumerate(zip(self.layers, kvs, strict=True)):
            window, inv_freq = self.layer_window[i], self.layer_inv_freq[i]
            if window not in masks:
                allowed = distance >= 0 if window is None else (distance >= 0) & (distance < window)
                masks[window] = allowed[None] & key_mask[:, None, :]
            if inv_freq not in ropes:
                ropes[inv_freq] = _rope_cos_sin(np.asarray(inv_freq, np.float32), positions)
            cos, sin = ropes[inv_freq]
            x, new_kv = call(layer, x, cos, sin, masks[window], kv, index)
            x = self._constrain(x)
            new_kvs.append(new_kv)
        x = self._constrain(self.norm(x))
        if cache is None:
            return x, None
        new_cache = KVCache(
            k=tuple(k for k, _ in new_kvs),
            v=tuple(v for _, v in new_kvs),
            key_mask=key_mask,
            positions=cache.positions + mask_in.sum(axis=1).astype(jnp.int32),
            index=cache.index + t,
        )
        return x, new_cache

    def logits(self, h: Array) -> Array:
        """Projects final hidden states `[B, T, D]` to float32 logits `[B, T, V]`.

        Tied models use `h @ embed.embedding.T`; untied ones `h @ lm_head.kernel`.
        """
        h = h.astype(self.dtype)
        if self.config.tie_word_embeddings:
            table = self.embed.embedding[...].astype(self.dtype)
            raw = jnp.einsum("btd,vd->btv", h, table, preferred_element_type=jnp.float32)
        else:
            kernel = self.lm_head.kernel[...].astype(self.dtype)
            raw = jnp.einsum("btd,dv->btv", h, kernel, preferred_element_type=jnp.float32)
        return self.finish_logits(
            constrain(raw, ("activation_batch", "seq", "vocab"), self.activation_sharding)
        )

    def _constrain(self, x: Array) -> Array:
        """The residual stream `[B, T, D]` pinned to its rows' shards (module docstring)."""
        return constrain(x, ("activation_batch", "seq", None), self.activation_sharding)

    def finish_logits(self, raw: Array) -> Array:
        """What the family does to `h @ head` before it is a logit (nothing here; Gemma 3
        soft-caps). Code that projects onto head columns itself (grounding's new rows)
        applies it too, so its logits are the model's."""
        return raw

    def __call__(
        self,
        input_ids: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Computes next-token logits.

        Args:
            input_ids: `[B, T]` int token ids (left-padded when rows differ in length).
            positions: `[B, T]` RoPE positions; by default they count only real tokens
                (`default_positions`), continuing from `cache.positions` with a cache.
            attention_mask: `[B, T]` 1 for tokens, 0 for padding; default all ones. Padding
                keys are never attended to; logits at padding positions are meaningless.
            cache: a `KVCache` to extend (see `init_cache` for the decoding protocol).

        Returns:
            float32 logits `[B, T, V]`; with a cache, `(logits, new_cache)`.
        """
        x = self.embed(input_ids)
        h, new_cache = self.hidden_states(
            x, positions=positions, attention_mask=attention_mask, cache=cache
        )
        logits = self.logits(h)
        if cache is None:
            return logits
        return logits, new_cache
