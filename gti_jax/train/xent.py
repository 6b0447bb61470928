"""Cross-entropy over a large vocabulary, one chunk of logit columns at a time.

The loss of both training stages is a logsumexp over the vocabulary at each target position.
Computed directly it materializes ``[N, V]`` float32 logits (``N`` targets), and its
backward another buffer of that size: at ``V = 256k`` and 4,096 targets that is 4 GiB each,
the largest buffers of a step. :func:`chunked_ce_sums` computes the same sums with a
`lax.scan` over chunks of ``C`` vocabulary columns, carrying a running maximum, a rescaled sum
of exponentials and the target's logit per position; each chunk's body is wrapped in
`jax.checkpoint`, so the backward pass recomputes that chunk's logits instead of keeping every
chunk's, and no buffer of a step is larger than ``[N, C]``.

A head is described by :class:`VocabHead`: a function giving the weight rows of any block of
columns (the embedding's rows for a tied model, the head kernel's columns otherwise, with the
new rows substituted during grounding), the number of columns, and the family's finishing
function (Gemma 3's soft-cap), applied per chunk since it is elementwise.

Chunking is chosen by :func:`loss_chunk_size` from ``compute.loss_chunk``: a positive value
is the chunk width in columns; 0 (the default) chunks only when the full logits would exceed
:data:`AUTO_LOGITS_BYTES` (256 MiB of float32), with chunks of about
:data:`AUTO_CHUNK_BYTES` (32 MiB). Below the threshold the step is the unchunked computation,
unchanged.

Example:
    >>> h = jnp.ones((3, 4)); table = jnp.arange(40.0).reshape(10, 4) / 40
    >>> head = VocabHead(lambda start, size: jax.lax.dynamic_slice_in_dim(table, start, size),
    ...                  num_cols=10)
    >>> t, w = jnp.array([1, 5, 9]), jnp.ones(3)
    >>> full = ce_sums(h @ table.T, t, w)
    >>> chunked = chunked_ce_sums(h, t, w, head, chunk=4)
    >>> bool(jnp.allclose(full[0], chunked[0])), float(chunked[1])
    (True, 3.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "AUTO_CHUNK_BYTES",
    "AUTO_LOGITS_BYTES",
    "VocabHead",
    "ce_sums",
    "chunked_ce_sums",
    "loss_chunk_size",
    "model_head",
]

AUTO_LOGITS_BYTES = 256 * 2**20
"""With ``compute.loss_chunk = 0``: chunk when ``targets x V x 4`` bytes exceeds this."""

AUTO_CHUNK_BYTES = 32 * 2**20
"""With ``compute.loss_chunk = 0``: aim for chunks of ``targets x C x 4`` bytes about this."""

_ALIGN = 128  # automatic chunk widths are multiples of this (lane-friendly on TPU and GPU)
_MIN_AUTO_CHUNK = 512  # below this the per-chunk overhead dominates


class VocabHead(NamedTuple):
    """A vocabulary head that can produce any block of its logit columns.

    Attributes:
        columns: ``(start, size) -> [size, D]`` weight rows of columns ``start .. start +
            size`` (`start` may be traced, `size` is static); logits are ``h @ rows.T``.
        num_cols: ``V``, the number of columns (the table's rows, padding included).
        finish: what the family applies to ``h @ rows.T`` elementwise (Gemma 3's soft-cap).
        dtype: the matmul dtype; the logits are float32.
    """

    columns: Callable[[Any, int], jax.Array]
    num_cols: int
    finish: Callable[[jax.Array], jax.Array] = lambda z: z
    dtype: Any = jnp.float32


def model_head(model: Any) -> VocabHead:
    """The :class:`VocabHead` of a gti_jax causal LM: equal to ``model.logits`` by columns."""
    if model.config.tie_word_embeddings:
        table = model.embed.embedding[...]

        def columns(start, size):
            return jax.lax.dynamic_slice_in_dim(table, start, size, axis=0)

        num_cols = table.shape[0]
    else:
        kernel = model.lm_head.kernel[...]

        def columns(start, size):
            return jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1).T

        num_cols = kernel.shape[1]
    return VocabHead(columns, int(num_cols), model.finish_logits, model.dtype)


def loss_chunk_size(num_targets: int, num_cols: int, loss_chunk: int = 0) -> int:
    """The chunk width for a loss over `num_targets` positions and `num_cols` columns.

    Args:
        num_targets: positions whose logits the loss needs (static: ``B x L``).
        num_cols: ``V``.
        loss_chunk: ``compute.loss_chunk``: > 0 the width asked for; 0 automatic.

    Returns:
        The width ``C``, or 0 for the unchunked loss (automatic below the threshold, or a
        width that covers the whole vocabulary).

    Example:
        >>> loss_chunk_size(64, 49_152), loss_chunk_size(64, 49_152, 8192)
        (0, 8192)
        >>> loss_chunk_size(4096, 262_144)  # 4 GiB of logits: chunks of 2,048 columns
        2048
    """
    if loss_chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0, got {loss_chunk}")
    if loss_chunk == 0:
        if num_targets * num_cols * 4 <= AUTO_LOGITS_BYTES:
            return 0
        width = AUTO_CHUNK_BYTES // (4 * max(num_targets, 1)) // _ALIGN * _ALIGN
        loss_chunk = max(width, _MIN_AUTO_CHUNK)
    return 0 if loss_chunk >= num_cols else int(loss_chunk)


def ce_sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted cross-entropy sums of ``[..., V]`` logits at ``[...]`` targets, in float32.

    Returns:
        ``(loss_sum, weight_sum)``, float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((lse - picked) * weights), jnp.sum(weights)


def chunked_ce_sums(
    h: jax.Array, targets: jax.Array, weights: jax.Array, head: VocabHead, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """:func:`ce_sums` of ``head.finish(h @ head.columns(0, V).T)``, ``chunk`` columns at a time.

    Equal to the unchunked sums up to float32 rounding (the logsumexp adds the exponentials
    in another order); gradients reach `h` and whatever `head.columns` reads. Peak memory
    holds one ``[N, chunk]`` block of logits, forward and backward. When ``chunk`` does not
    divide ``V`` the last chunk starts at ``V - chunk`` and ignores the columns it shares
    with the one before, so no table is padded or copied.

    Args:
        h: ``[..., D]`` hidden states at the target positions.
        targets: ``[...]`` target ids (columns).
        weights: ``[...]`` loss weights (0 drops a position).
        head: the vocabulary head.
        chunk: columns per chunk, ``1 <= chunk <= V``.

    Returns:
        ``(loss_sum, weight_sum)``, float32 scalars.
    """
    num_cols = head.num_cols
    if not 1 <= chunk <= num_cols:
        raise ValueError(f"chunk must be in [1, {num_cols}], got {chunk}")
    d = h.shape[-1]
    hn = h.reshape(-1, d).astype(head.dtype)
    tgt = targets.reshape(-1).astype(jnp.int32)
    weights = weights.reshape(-1).astype(jnp.float32)
    n = hn.shape[0]

    def body(carry, i):
        m, s, picked = carry
        lo = i * chunk
        start = jnp.minimum(lo, num_cols - chunk)
        rows = head.columns(start, chunk).astype(head.dtype)
        z = jnp.einsum("nd,cd->nc", hn, rows, preferred_element_type=jnp.float32)
        z = head.finish(z).astype(jnp.float32)
        fresh = start + jnp.arange(chunk) >= lo  # columns no earlier chunk covered
        # -inf before exp (not a where after it): exp of a stale column could overflow and
        # turn its zero gradient into inf * 0.
        zf = jnp.where(fresh, z, -jnp.inf)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(zf, axis=-1)))  # any shift works
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zf - m_new[:, None]), axis=-1)
        rel = tgt - start
        here = (tgt >= lo) & (rel < chunk)
        z_t = jnp.take_along_axis(z, jnp.clip(rel, 0, chunk - 1)[:, None], axis=-1)[:, 0]
        return (m_new, s, picked + jnp.where(here, z_t, 0.0)), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    init += (jnp.zeros((n,), jnp.float32),)
    num_chunks = -(-num_cols // chunk)
    body = jax.checkpoint(body, prevent_cse=False)
    (m, s, picked), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    lse = m + jnp.log(s)
    return jnp.sum((lse - picked) * weights), jnp.sum(weights)
