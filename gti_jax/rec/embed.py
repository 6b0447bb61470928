"""Item embeddings from the language model itself: mean-pooled final hidden states.

Each item text is tokenized as plain text (no chat template, no special tokens), run through
the decoder stack, and the final-normed hidden states are averaged over the real tokens (a
mask-weighted mean, so padding never contributes). Texts are sorted by length and padded on
the right to a few bucket lengths (four per doubling of the length, up to ``max_len``) with a
fixed batch size, so jit compiles one program per bucket, a handful in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gti_jax.progress import batches

__all__ = ["item_embeddings"]

_MIN_BUCKET = 8


def _bucket(n: int, max_len: int) -> int:
    """Pads a length up to a bucket: a multiple of ``max(8, p / 8)``, ``p`` the next power of 2.

    Four buckets per octave (padding waste under 25%), at most ``4 log2(max_len / 8) + 1``
    shapes overall; capped at ``max_len``.
    """
    p = _MIN_BUCKET
    while p < n:
        p *= 2
    step = max(_MIN_BUCKET, p // 8)
    return min(-(-n // step) * step, max_len)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = []
    for text, row in zip(texts, out, strict=True):
        row = list(row)[:max_len]
        if not row:
            raise ValueError(
                f"item text {text!r} gives no tokens; every item needs a non-empty text"
            )
        ids.append(row)
    return ids


def item_embeddings(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_len: int = 64,
    verbose: bool = True,
) -> np.ndarray:
    """Embeds texts as the mask-weighted mean of the model's final hidden states.

    Args:
        model: a :class:`gti_jax.models.LlamaForCausalLM` (anything with ``embed(ids)`` and
            ``hidden_states(x, attention_mask=...)`` returning ``([B, T, D], cache)``).
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        texts: ``N`` item texts (e.g. :func:`gti_jax.rec.data.item_text`).
        batch_size: texts per forward pass (the last batch is padded with dummy rows).
        max_len: texts are cut to this many tokens.
        verbose: print progress with an ETA to stderr (:func:`gti_jax.progress.progress`).

    Returns:
        ``[N, D]`` float32 embeddings, row ``i`` for ``texts[i]``; deterministic.

    Raises:
        ValueError: no texts, a text without tokens, or a non-positive size.

    >>> from tests.helpers.tokenizers import tiny_tokenizer  # doctest: +SKIP
    >>> item_embeddings(model, tiny_tokenizer(), ["a film", "a toy"]).shape  # doctest: +SKIP
    (2, 16)
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    if len(texts) == 0:
        raise ValueError("item_embeddings got no texts; pass one text per item")
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    ids = _tokenize(tokenizer, texts, max_len)
    n = len(ids)
    order = sorted(range(n), key=lambda i: (len(ids[i]), i))
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, tokens, mask):
        m = nnx.merge(graphdef, state)
        h, _ = m.hidden_states(m.embed(tokens), attention_mask=mask)
        w = mask.astype(jnp.float32)[..., None]
        return jnp.sum(h.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

    out: np.ndarray | None = None
    for lo in batches(n, batch_size, desc="item embeddings", enabled=verbose):
        rows = order[lo : lo + batch_size]
        t = _bucket(max(len(ids[i]) for i in rows), max_len)
        tokens = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        mask[len(rows) :, 0] = 1  # dummy rows attend to one token: no empty softmax
        for r, i in enumerate(rows):
            tokens[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        vec = np.asarray(pooled(state, jnp.asarray(tokens), jnp.asarray(mask)))
        if out is None:
            out = np.zeros((n, vec.shape[1]), np.float32)
        out[rows] = vec[: len(rows)]
    assert out is not None
    if not np.all(np.isfinite(out)):
        raise ValueError("item embeddings contain NaN or inf; check the model's weights")
    return out
