"""Decoding with the KV cache: sampling/greedy generation, batched beam search, constraints.

All three entry points take an NNX `LlamaForCausalLM`, split it with `nnx.split` and run
module-level `jax.jit` functions keyed on the (hashable) graph definition, so a second call
with the same model structure, batch size and prompt-length bucket reuses the compiled code.

* `generate`: left-pads the prompts (length rounded up to `prompt_bucket`), prefills the cache
  with one call, then decodes inside one `jax.lax.while_loop` that stops as soon as every row
  has produced an EOS token (or after `max_new_tokens`). Greedy by default; temperature,
  top-k and top-p sampling with an explicit key.
* `beam_search`: batched beam search. The prompts are prefilled once (not once per beam) and
  their keys/values are shared by the prompt's `num_beams` rows (`SharedPrefixKV`: stored
  once, broadcast inside attention); only the slots of generated tokens are per beam and
  follow beam parents (`KVCache.take`). Each step keeps the best `num_beams` unfinished
  continuations and merges finished ones (EOS, or a complete candidate under a constraint)
  into a pool of the best `num_beams` hypotheses; a prompt stops early once no live beam
  can beat its worst pooled hypothesis. The whole search is one `while_loop` in one jit.
* `TrieConstraint`: restricts beams to a fixed set of token sequences (e.g. the semantic IDs
  of all items). The trie is stored as padded arrays (`children_tokens [num_nodes, M]`), so a
  constrained step computes each beam's log-probs at its node's `M` allowed tokens only
  (normalized over the whole vocabulary, as transformers does: `_trie_logp`) and ranks
  `num_beams x M` candidates per prompt: no `[num_nodes, V]` mask or `[R, V]` log-softmax
  is ever built. A Python callable `fn(prefix) -> allowed ids` (Hugging Face
  `prefix_allowed_tokens_fn` style) is also accepted; it runs on the host once per step
  (only the model step and the beam update are jit-compiled), so it is slower and meant for
  constraints a trie cannot express.
* `score_sequences`: teacher-forced log-probability sums of continuations, the exhaustive
  reference for beam search and a building block for evaluation.

Conventions: generated sequences hold new tokens only (no prompt) and include the EOS token
that ended them, as `transformers.generate` does. `num_tokens` (the tokenizer's size) keeps
rows of a padded table (`num_rows > num_tokens`) from ever being chosen: their logits are set
to -inf before the softmax.

Example:
    >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> out = generate(model, [[1, 2, 3], [4]], max_new_tokens=4)
    >>> out.tokens.shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gti_jax.errors import BadInput
from gti_jax.models.llama import KVCache, LlamaForCausalLM, SharedPrefixKV
from gti_jax.models.sharding import host_array, put_rows

__all__ = [
    "BeamOutput",
    "DecodeError",
    "GenerateOutput",
    "TrieConstraint",
    "beam_search",
    "generate",
    "score_sequences",
]

Array = jax.Array
Prompts = Sequence[Sequence[int]] | tuple[Any, Any]
_NEG_INF = float("-inf")


class DecodeError(BadInput):
    """Bad decoding input (prompts, token ids, constraint or settings)."""


class GenerateOutput(NamedTuple):
    """Result of `generate`.

    Attributes:
        sequences: per prompt, the new tokens up to and including the first EOS.
        tokens: `[B, N]` int32 new tokens, `pad_id` after a row's EOS (`N = max_new_tokens`).
        lengths: `[B]` int32 number of generated tokens per row (EOS included).
    """

    sequences: list[list[int]]
    tokens: np.ndarray
    lengths: np.ndarray


class BeamOutput(NamedTuple):
    """Result of `beam_search`.

    Attributes:
        sequences: per prompt, up to `num_beams` distinct new-token sequences, best first
            (an EOS that ended a hypothesis is included). Fewer when fewer exist (e.g. a
            constraint with fewer candidates than beams).
        scores: `[B, num_beams]` float32 ranking scores aligned with `sequences`: the sum of
            the tokens' log-probs divided by `length ** length_penalty` (the plain sum with
            the default `length_penalty=0`); -inf where no hypothesis exists.
    """

    sequences: list[list[list[int]]]
    scores: np.ndarray


# ----------------------------------------------------------------------------------------------
# Constraint


@dataclasses.dataclass(frozen=True, eq=False)
class TrieConstraint:
    """A set of allowed token sequences as a padded trie (jit-friendly arrays).

    Node 0 is the root. Under the constraint a beam at node `n` may only continue with
    `children_tokens[n]` (entries `-1` are padding). With `eos_id`, a node where a candidate
    ends also allows `eos_id`, which leads to a shared sink node that finishes the beam;
    without it, reaching such a node finishes the beam (a candidate that is also a prefix of
    a longer one both finishes and continues). Memory is `num_nodes x max_branch` ints.

    Attributes:
        children_tokens: `[num_nodes, M]` int32 allowed next tokens, -1 padded (valid first).
        children_nodes: `[num_nodes, M]` int32 the node each allowed token leads to (0 pad).
        final: `[num_nodes]` bool, reaching the node finishes a hypothesis.
        complete: `[num_nodes]` bool, the path to the node is a whole candidate (plus EOS for
            the sink).
        eos_id: the token that ends a candidate, or None.
        min_length: tokens of the shortest candidate (EOS included when `eos_id` is set).
        max_length: tokens of the longest candidate (EOS included when `eos_id` is set).
    """

    children_tokens: np.ndarray
    children_nodes: np.ndarray
    final: np.ndarray
    complete: np.ndarray
    eos_id: int | None
    min_length: int
    max_length: int

    @classmethod
    def from_sequences(
        cls, seqs: Sequence[Sequence[int]], *, eos_id: int | None = None
    ) -> TrieConstraint:
        """Builds the trie of `seqs` (duplicates are merged).

        Args:
            seqs: the allowed token-id sequences (non-empty, ids >= 0).
            eos_id: token that must follow a complete candidate; None to finish beams as soon
                as they complete a candidate.

        Returns:
            The constraint.

        Raises:
            DecodeError: no sequences, an empty sequence, a negative id, or `eos_id` inside a
                sequence.

        Example:
            >>> trie = TrieConstraint.from_sequences([[5, 6], [5, 7], [8, 6]])
            >>> trie.allowed([]), trie.allowed([5])
            ([5, 8], [6, 7])
        """
        seqs = [tuple(int(t) for t in s) for s in seqs]
        if not seqs:
            raise DecodeError("TrieConstraint.from_sequences got no sequences; pass at least one")
        for i, s in enumerate(seqs):
            if not s:
                raise DecodeError(f"sequence {i} is empty; every candidate needs >= 1 token")
            if min(s) < 0:
                raise DecodeError(f"sequence {i} has a negative token id: {list(s)}")
            if eos_id is not None and eos_id in s:
                raise DecodeError(
                    f"sequence {i} contains eos_id={eos_id}; candidates must not include the "
                    "EOS token (it is appended by the constraint)"
                )
        children: list[dict[int, int]] = [{}]
        complete = [False]
        for s in seqs:
            node = 0
            for t in s:
                nxt = children[node].get(t)
                if nxt is None:
                    nxt = len(children)
                    children[node][t] = nxt
                    children.append({})
                    complete.append(False)
                node = nxt
            complete[node] = True
        if eos_id is not None:
            sink = len(children)
            for node in range(sink):
                if complete[node]:
                    children[node][int(eos_id)] = sink
            children.append({})
            complete.append(True)
            final = [False] * sink + [True]
        else:
            final = list(complete)
        width = max(1, max(len(c) for c in children))
        tokens = np.full((len(children), width), -1, np.int32)
        nodes = np.zeros((len(children), width), np.int32)
        for n, c in enumerate(children):
            for j, (t, child) in enumerate(sorted(c.items())):
                tokens[n, j], nodes[n, j] = t, child
        extra = 0 if eos_id is None else 1
        lengths = [len(s) + extra for s in seqs]
        return cls(
            children_tokens=tokens,
            children_nodes=nodes,
            final=np.asarray(final, bool),
            complete=np.asarray(complete, bool),
            eos_id=None if eos_id is None else int(eos_id),
            min_length=min(lengths),
            max_length=max(lengths),
        )

    @property
    def num_nodes(self) -> int:
        return self.children_tokens.shape[0]

    @property
    def max_branch(self) -> int:
        return self.children_tokens.shape[1]

    def node_of(self, prefix: Sequence[int]) -> int | None:
        """The node reached by `prefix`, or None if `prefix` leaves the trie."""
        node = 0
        for t in prefix:
            row = self.children_tokens[node]
            hit = np.flatnonzero(row == int(t))
            if hit.size == 0:
                return None
            node = int(self.children_nodes[node, hit[0]])
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Allowed next tokens after `prefix` (empty if `prefix` leaves the trie or finished).

        Usable as a host-side `prefix_allowed_tokens_fn` (e.g. for `transformers.generate`).
        """
        node = self.node_of(prefix)
        if node is None:
            return []
        row = self.children_tokens[node]
        return [int(t) for t in row[row >= 0]]

    def contains(self, seq: Sequence[int]) -> bool:
        """True if `seq` is a complete candidate (optionally followed by `eos_id`)."""
        node = self.node_of(seq)
        return node is not None and bool(self.complete[node])


class _TrieArrays(NamedTuple):
    tokens: Array  # [num_nodes, M]
    nodes: Array  # [num_nodes, M]
    final: Array  # [num_nodes]
    complete: Array  # [num_nodes]
    has_children: Array  # [num_nodes]

    has_eos: Array  # [] bool, the trie ends candidates with an EOS token

    @staticmethod
    def of(trie: TrieConstraint) -> _TrieArrays:
        """Device arrays, padded (nodes to a multiple of 64, branches of 8) to share compiles."""
        nodes, width = -(-trie.num_nodes // 64) * 64, -(-trie.max_branch // 8) * 8
        pad = ((0, nodes - trie.num_nodes), (0, width - trie.max_branch))
        tokens = np.pad(trie.children_tokens, pad, constant_values=-1)
        rows = (0, nodes - trie.num_nodes)
        return _TrieArrays(
            jnp.asarray(tokens),
            jnp.asarray(np.pad(trie.children_nodes, pad)),
            jnp.asarray(np.pad(trie.final, rows)),
            jnp.asarray(np.pad(trie.complete, rows)),
            jnp.asarray(tokens[:, 0] >= 0),
            jnp.asarray(trie.eos_id is not None),
        )


# ----------------------------------------------------------------------------------------------
# Input handling


def _check_id(name: str, value: int, limit: int) -> None:
    if not 0 <= int(value) < limit:
        raise DecodeError(f"{name}={value} is outside the model's table [0, {limit})")


def _left_pad(
    prompts: Prompts, *, pad_id: int, bucket: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to a multiple of `bucket`; returns int32 ids and mask `[B, T]`."""
    if bucket < 1:
        raise DecodeError(f"prompt_bucket={bucket} must be >= 1")
    _check_id("pad_id", pad_id, num_rows)
    if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], "ndim"):
        ids, mask = np.asarray(prompts[0]), np.asarray(prompts[1])
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise DecodeError(
                f"(ids, mask) prompts need two [B, T] arrays of one shape, got {ids.shape} and "
                f"{mask.shape}"
            )
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise DecodeError(f"empty prompt batch of shape {ids.shape}")
        mask = mask.astype(bool)
        if not mask[:, -1].all():
            raise DecodeError(
                "prompts must be left-padded (the last column of the mask must be all 1); pad "
                "on the left or pass a list of token lists"
            )
        ids = np.where(mask, ids, pad_id).astype(np.int64)
    else:
        rows = [list(p) for p in prompts]
        if not rows:
            raise DecodeError("no prompts given; pass a non-empty list of token-id lists")
        empty = [i for i, p in enumerate(rows) if len(p) == 0]
        if empty:
            raise DecodeError(f"prompts {empty[:5]} are empty; every prompt needs >= 1 token")
        width = max(len(p) for p in rows)
        ids = np.full((len(rows), width), pad_id, np.int64)
        mask = np.zeros((len(rows), width), bool)
        for i, p in enumerate(rows):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = True
    real = ids[mask]
    if real.size and (real.min() < 0 or real.max() >= num_rows):
        raise DecodeError(
            f"prompt token ids must be in [0, {num_rows}); got min {real.min()}, max {real.max()}"
        )
    width = -(-ids.shape[1] // bucket) * bucket
    extra = width - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id).astype(np.int32)
    mask = np.pad(mask, ((0, 0), (extra, 0))).astype(np.int32)
    return ids, mask


def _eos_array(eos_ids: int | Sequence[int] | None, num_rows: int) -> np.ndarray:
    """EOS ids as an int32 array padded with -1 to a multiple of 4 (traced, not static)."""
    if eos_ids is None:
        eos_ids = ()
    if isinstance(eos_ids, int | np.integer):
        eos_ids = (eos_ids,)
    ids = sorted({int(e) for e in eos_ids})
    for e in ids:
        _check_id("eos id", e, num_rows)
    out = np.full(max(4, -(-len(ids) // 4) * 4), -1, np.int32)
    out[: len(ids)] = ids
    return out


def _put_prompts(ids: np.ndarray, mask: np.ndarray, sharding) -> tuple[Any, Any]:
    """The padded prompts on `sharding` (rows over the batch shards); as they are without."""
    if sharding is None:
        return ids, mask
    try:
        sharding.shard_shape(ids.shape)
    except ValueError:
        raise DecodeError(
            f"{ids.shape[0]} prompts do not split evenly over the rows of batch_sharding "
            f"{sharding}; pass a multiple of its batch shards (pad with copies of a prompt)"
        ) from None
    return put_rows(ids, sharding), put_rows(mask, sharding)


def _check_common(model: LlamaForCausalLM, max_new_tokens: int, num_tokens: int | None) -> None:
    if not isinstance(model, LlamaForCausalLM):
        raise DecodeError(f"model must be a gti_jax LlamaForCausalLM, got {type(model).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if num_tokens is not None and not 0 < num_tokens <= model.num_rows:
        raise DecodeError(
            f"num_tokens={num_tokens} must be in [1, {model.num_rows}] (the table's rows)"
        )


# ----------------------------------------------------------------------------------------------
# Model pieces (run inside jit)


def _mask_vocab(logits: Array, num_tokens: Array) -> Array:
    """Sets logits of rows `>= num_tokens` (table padding; a traced scalar) to -inf."""
    return jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, _NEG_INF)


def _prefill(model: LlamaForCausalLM, ids: Array, mask: Array, max_len: int):
    """Fills a fresh cache with left-padded prompts; returns last-position logits `[B, V]`."""
    cache = model.init_cache(ids.shape[0], max_len)
    h, cache = model.hidden_states(model.embed(ids), attention_mask=mask, cache=cache)
    return model.logits(h[:, -1:])[:, 0], cache


def _prefill_beams(model: LlamaForCausalLM, ids: Array, mask: Array, num_beams: int, n: int):
    """Prefills each prompt once into a cache its `num_beams` rows share (`SharedPrefixKV`).

    The prompt's keys/values stay `[B, P, K, hd]`, broadcast to the beams inside attention;
    only the `n` slots of new tokens are per beam, so following beam parents each step moves
    `B x W x n` slots, not `B x W x (P + n)`. Returns last-position logits `[B, V]`.
    """
    logits, cache = _prefill(model, ids, mask, ids.shape[1])
    rows = ids.shape[0] * num_beams
    own = lambda x: SharedPrefixKV(x, jnp.zeros((rows, n, *x.shape[2:]), x.dtype))
    cache = KVCache(
        k=tuple(own(x) for x in cache.k),
        v=tuple(own(x) for x in cache.v),
        key_mask=jnp.pad(jnp.repeat(cache.key_mask, num_beams, axis=0), ((0, 0), (0, n))),
        positions=jnp.repeat(cache.positions, num_beams),
        index=cache.index,
    )
    return logits, cache


def _step(model: LlamaForCausalLM, tok: Array, cache: KVCache):
    """Feeds one token per row `[R]`; returns logits `[R, V]` and the cache."""
    h, cache = model.hidden_states(model.embed(tok[:, None]), cache=cache)
    return model.logits(h)[:, 0], cache


def _filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Keeps the `top_k` best logits, then the smallest of those holding `top_p` probability.

    Both are traced scalars (`top_k = V`, `top_p = 1` keep everything), so changing them does
    not recompile. Ties with the threshold logit are kept.
    """
    desc = -jnp.sort(-logits, axis=-1)
    in_k = jnp.arange(logits.shape[-1]) < top_k
    probs = jax.nn.softmax(jnp.where(in_k, desc, _NEG_INF), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better tokens
    keep = in_k & ((before < top_p) | (top_p >= 1.0))
    thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < thresh, _NEG_INF, logits)


# ----------------------------------------------------------------------------------------------
# generate


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "sample"),
)
def _generate_jit(graphdef, state, ids, mask, key, knobs, *, max_new_tokens, sample):
    model = nnx.merge(graphdef, state)
    b, n = ids.shape[0], max_new_tokens
    logits, cache = _prefill(model, ids, mask, ids.shape[1] + n)
    pad_id = knobs["pad_id"]

    def pick(logits, t):
        logits = _mask_vocab(logits, knobs["num_tokens"])
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = _filter_logits(logits / knobs["temperature"], knobs["top_k"], knobs["top_p"])
        return jax.random.categorical(jax.random.fold_in(key, t), logits).astype(jnp.int32)

    def record(t, tokens, lengths, done, tok):
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, t].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, knobs["eos"])
        return tokens, lengths, done, tok

    tokens = jnp.full((b, n), pad_id, jnp.int32)
    lengths = jnp.zeros((b,), jnp.int32)
    done = jnp.zeros((b,), bool)
    tokens, lengths, done, tok = record(0, tokens, lengths, done, pick(logits, 0))

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, tokens, lengths, done, tok, cache = carry
        logits, cache = _step(model, tok, cache)
        tokens, lengths, done, tok = record(t, tokens, lengths, done, pick(logits, t))
        return t + 1, tokens, lengths, done, tok, cache

    carry = (jnp.asarray(1, jnp.int32), tokens, lengths, done, tok, cache)
    _, tokens, lengths, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths


def generate(
    model: LlamaForCausalLM,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    eos_ids: int | Sequence[int] | None = (),
    num_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: Array | None = None,
    pad_id: int = 0,
    prompt_bucket: int = 16,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` per prompt with the KV cache (greedy by default).

    Prompts are left-padded to a length rounded up to `prompt_bucket`, so batches of similar
    length share one compiled function. The loop stops once every row has emitted an EOS.

    Args:
        model: the model.
        prompts: a list of token-id lists, or `(ids, mask)` `[B, T]` arrays left-padded.
        max_new_tokens: tokens to generate per row at most (`N`).
        eos_ids: token id(s) that end a row (included in its output).
        num_tokens: the tokenizer's size; table rows `>= num_tokens` are never chosen.
        temperature: 0 for greedy (argmax); > 0 to sample from `softmax(logits / T)`.
        top_k: sample only among the `k` most likely tokens.
        top_p: sample only from the smallest set of tokens with probability >= `top_p`.
        key: PRNG key, required when sampling; step `t` uses `fold_in(key, t)`.
        pad_id: id used for left padding and after EOS in `tokens`.
        prompt_bucket: prompt lengths are rounded up to a multiple of this.
        batch_sharding: where the `[B, T]` prompt rows go on a sharded model (over the data
            axes, `B` a multiple of their shards); every process gets all rows.

    Returns:
        A `GenerateOutput` (`sequences`, `tokens [B, N]`, `lengths [B]`).

    Raises:
        DecodeError: bad prompts, ids outside the table, or inconsistent settings.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> out = generate(model, [[1, 2, 3]], max_new_tokens=5, num_tokens=30)
        >>> len(out.sequences[0]), int(out.tokens.max()) < 30
        (5, True)
    """
    _check_common(model, max_new_tokens, num_tokens)
    if temperature < 0:
        raise DecodeError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if temperature > 0 and key is None:
        raise DecodeError("sampling (temperature > 0) needs a key, e.g. key=jax.random.key(0)")
    if top_k is not None and top_k < 1:
        raise DecodeError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise DecodeError(f"top_p={top_p} must be in (0, 1]")
    ids, mask = _left_pad(prompts, pad_id=pad_id, bucket=prompt_bucket, num_rows=model.num_rows)
    knobs = dict(
        eos=_eos_array(eos_ids, model.num_rows),
        num_tokens=np.int32(model.num_rows if num_tokens is None else num_tokens),
        temperature=np.float32(max(temperature, 1e-6)),
        top_k=np.int32(model.num_rows if top_k is None else min(top_k, model.num_rows)),
        top_p=np.float32(1.0 if top_p is None else top_p),
        pad_id=np.int32(pad_id),
    )
    ids, mask = _put_prompts(ids, mask, batch_sharding)
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate_jit(
        graphdef,
        state,
        ids,
        mask,
        jax.random.key(0) if key is None else key,
        knobs,
        max_new_tokens=max_new_tokens,
        sample=temperature > 0,
    )
    tokens, lengths = host_array(tokens), host_array(lengths)
    sequences = [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]
    return GenerateOutput(sequences=sequences, tokens=tokens, lengths=lengths)


# ----------------------------------------------------------------------------------------------
# beam search


class _Beams(NamedTuple):
    alive_tok: Array  # [B, W, N] int32
    alive_sum: Array  # [B, W] float32 sum of log-probs; -inf = no beam
    alive_node: Array  # [B, W] int32 trie node (0 without a trie)
    fin_tok: Array  # [B, W, N] int32
    fin_score: Array  # [B, W] float32 ranking score, sorted descending; -inf = empty
    fin_len: Array  # [B, W] int32
    done: Array  # [B] bool


def _init_beams(b: int, w: int, n: int, pad_id: Array) -> _Beams:
    first = jnp.where(jnp.arange(w) == 0, 0.0, _NEG_INF).astype(jnp.float32)
    return _Beams(
        alive_tok=jnp.full((b, w, n), pad_id, jnp.int32),
        alive_sum=jnp.broadcast_to(first, (b, w)),
        alive_node=jnp.zeros((b, w), jnp.int32),
        fin_tok=jnp.full((b, w, n), pad_id, jnp.int32),
        fin_score=jnp.full((b, w), _NEG_INF, jnp.float32),
        fin_len=jnp.zeros((b, w), jnp.int32),
        done=jnp.zeros((b,), bool),
    )


def _norm(total: Array, length: Array, length_penalty: Array) -> Array:
    """`total / length ** length_penalty` (exactly `total` when the penalty is 0)."""
    return total / jnp.asarray(length, jnp.float32) ** length_penalty


def _gather(x: Array, idx: Array) -> Array:
    """`x [B, W', ...]`, `idx [B, K]` -> `[B, K, ...]` along axis 1."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _select(
    beams: _Beams,
    logp: Array,
    t: Array,
    trie: _TrieArrays | None,
    eos: Array,
    length_penalty: Array,
    max_new_tokens: int,
) -> tuple[_Beams, Array, Array]:
    """One beam update; returns (beams, parents `[B, W]`, tokens).

    `logp` is `[B, W, V]` without a trie and `[B, W, M]` under one: each beam's log-probs at
    its node's allowed tokens `trie.tokens[node]` (`_trie_logp`).
    """
    b, w, v = logp.shape
    alive_sum = jnp.where(beams.done[:, None], _NEG_INF, beams.alive_sum)
    if trie is None:
        m = v
        total = alive_sum[..., None] + logp  # [B, W, V]
        final = jnp.isin(jnp.arange(v), eos)
        final = jnp.broadcast_to(final, total.shape)
        cont = ~final
        cand_tok = cand_node = None
    else:
        cand_tok = trie.tokens[beams.alive_node]  # [B, W, M]
        cand_node = trie.nodes[beams.alive_node]
        m = cand_tok.shape[-1]
        valid = cand_tok >= 0
        total = jnp.where(valid, alive_sum[..., None] + logp, _NEG_INF)
        final = valid & trie.final[cand_node]
        cont = valid & trie.has_children[cand_node]
        cand_tok, cand_node = cand_tok.reshape(b, w * m), cand_node.reshape(b, w * m)
    total = total.reshape(b, w * m)

    def expand(idx):
        parent = idx // m
        tok = idx % m if cand_tok is None else jnp.take_along_axis(cand_tok, idx, axis=1)
        node = jnp.zeros_like(idx) if cand_node is None else jnp.take_along_axis(cand_node, idx, 1)
        seqs = _gather(beams.alive_tok, parent)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[..., None].astype(jnp.int32), t, 2)
        return parent.astype(jnp.int32), tok.astype(jnp.int32), node.astype(jnp.int32), seqs

    # Live beams: the best W continuations that do not finish.
    alive_sum, idx = jax.lax.top_k(jnp.where(cont.reshape(b, w * m), total, _NEG_INF), w)
    parent, tok, node, alive_tok = expand(idx)

    # Finished pool: the best W of the old pool and this step's finishing candidates.
    k = min(w, w * m)
    f_sum, f_idx = jax.lax.top_k(jnp.where(final.reshape(b, w * m), total, _NEG_INF), k)
    _, _, _, f_tok = expand(f_idx)
    f_score = _norm(f_sum, t + 1, length_penalty)
    pool_score = jnp.concatenate([beams.fin_score, f_score], axis=1)
    pool_tok = jnp.concatenate([beams.fin_tok, f_tok], axis=1)
    pool_len = jnp.concatenate(
        [beams.fin_len, jnp.broadcast_to(t + 1, f_score.shape).astype(jnp.int32)], axis=1
    )
    fin_score, keep = jax.lax.top_k(pool_score, w)

    # A prompt is done when no live beam can still beat its worst pooled hypothesis.
    best = jnp.max(alive_sum, axis=1)
    # With a positive penalty a longer hypothesis may still score higher: bound by length N.
    longest = jnp.where(length_penalty > 0, max_new_tokens, t + 1)
    bound = _norm(best, longest, length_penalty)
    done = beams.done | (fin_score[:, -1] >= bound) | (best == _NEG_INF)
    new = _Beams(
        alive_tok=alive_tok,
        alive_sum=alive_sum,
        alive_node=node,
        fin_tok=_gather(pool_tok, keep),
        fin_score=fin_score,
        fin_len=_gather(pool_len, keep),
        done=done,
    )
    return new, parent, tok


def _finalize(
    beams: _Beams, t: Array, eligible: Array, length_penalty: Array
) -> tuple[Array, Array, Array]:
    """Merges eligible live beams (length `t`) into the pool; returns tokens, lengths, scores."""
    a_score = jnp.where(eligible, _norm(beams.alive_sum, t, length_penalty), _NEG_INF)
    w = beams.fin_score.shape[1]
    score = jnp.concatenate([beams.fin_score, a_score], axis=1)
    toks = jnp.concatenate([beams.fin_tok, beams.alive_tok], axis=1)
    lens = jnp.concatenate([beams.fin_len, jnp.broadcast_to(t, a_score.shape)], axis=1)
    score, keep = jax.lax.top_k(score, w)
    return _gather(toks, keep), _gather(lens, keep).astype(jnp.int32), score


def _logp(logits: Array, num_tokens: Array) -> Array:
    return jax.nn.log_softmax(_mask_vocab(logits, num_tokens), axis=-1)


def _trie_logp(logits: Array, tokens: Array, num_tokens: Array) -> Array:
    """`_logp(logits)` at `tokens [..., M]` only (-1 padding reads token 0; callers mask it).

    The normalizer is still the whole vocabulary's (rows `< num_tokens`), as in
    transformers' constrained beam search, which log-softmaxes all logits and then sets the
    disallowed ones to -inf: renormalizing over the allowed tokens would change every score
    and the ranking (beams at different nodes have different disallowed mass). So the head's
    full matmul stays (its logsumexp needs every column), but the `[R, V]` log-softmax is
    never materialized: `(x_c - max) - log(sum(exp(x - max)))`, the same expression
    `jax.nn.log_softmax` evaluates, at the `M` allowed columns.
    """
    x = _mask_vocab(logits, num_tokens)
    top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    norm = jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True))
    picked = jnp.take_along_axis(x, jnp.maximum(tokens, 0), axis=-1)
    return (picked - top) - norm


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "num_beams", "max_new_tokens", "use_trie"),
)
def _beam_jit(graphdef, state, ids, mask, trie, knobs, *, num_beams, max_new_tokens, use_trie):
    model = nnx.merge(graphdef, state)
    num_tokens, length_penalty = knobs["num_tokens"], knobs["length_penalty"]
    b, w, n = ids.shape[0], num_beams, max_new_tokens
    trie = trie if use_trie else None
    logits, cache = _prefill_beams(model, ids, mask, w, n)

    def logp_of(logits, beams):  # [B, W or 1, V] -> what `_select` ranks
        if trie is None:
            return _logp(logits, num_tokens)
        return _trie_logp(logits, trie.tokens[beams.alive_node[:, : logits.shape[1]]], num_tokens)

    select = functools.partial(
        _select,
        trie=trie,
        eos=knobs["eos"],
        length_penalty=length_penalty,
        max_new_tokens=n,
    )
    beams = _init_beams(b, w, n, knobs["pad_id"])
    # Right after the prefill every beam of a prompt is at the root: one row of log-probs.
    logp = logp_of(logits[:, None], beams)
    logp = jnp.broadcast_to(logp, (b, w, logp.shape[-1]))
    beams, _, tok = select(beams, logp, jnp.asarray(0, jnp.int32))
    rows = (jnp.arange(b) * w)[:, None]

    def cond(carry):
        t, beams, _, _ = carry
        return (t < n) & ~jnp.all(beams.done)

    def body(carry):
        t, beams, tok, cache = carry
        logits, cache = _step(model, tok.reshape(-1), cache)
        beams, parent, tok = select(beams, logp_of(logits.reshape(b, w, -1), beams), t)
        cache = cache.take((rows + parent).reshape(-1))
        return t + 1, beams, tok, cache

    carry = (jnp.asarray(1, jnp.int32), beams, tok, cache)
    t, beams, _, _ = jax.lax.while_loop(cond, body, carry)
    live = beams.alive_sum > _NEG_INF
    if trie is None:
        eligible = live
    else:
        # With EOS: out of length budget exactly at a complete candidate, return it without
        # EOS. Without: complete candidates already entered the pool when they completed.
        eligible = live & trie.complete[beams.alive_node] & trie.has_eos
    return _finalize(beams, t, eligible, length_penalty)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "max_new_tokens"))
def _host_prefill(graphdef, state, ids, mask, num_tokens, *, num_beams, max_new_tokens):
    model = nnx.merge(graphdef, state)
    logits, cache = _prefill_beams(model, ids, mask, num_beams, max_new_tokens)
    return _logp(logits, num_tokens), cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _host_step(graphdef, state, tok, cache, num_tokens):
    model = nnx.merge(graphdef, state)
    logits, cache = _step(model, tok, cache)
    return _logp(logits, num_tokens), cache


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _host_select(beams, logp, allowed, t, knobs, *, max_new_tokens):
    b, w = beams.alive_sum.shape
    logp = jnp.broadcast_to(logp.reshape(b, -1, logp.shape[-1]), (b, w, logp.shape[-1]))
    logp = jnp.where(allowed, logp, _NEG_INF)
    beams, parent, tok = _select(
        beams, logp, t, None, knobs["eos"], knobs["length_penalty"], max_new_tokens
    )
    flat = ((jnp.arange(b) * w)[:, None] + parent).reshape(-1)
    return beams, flat, tok


def _beam_host_loop(
    graphdef, state, ids, mask, fn, knobs, *, num_beams, max_new_tokens, num_rows
):  # fmt: skip
    """Beam search with a Python constraint: the model and beam update are jitted per step."""
    b, w, n = ids.shape[0], num_beams, max_new_tokens
    logp, cache = _host_prefill(
        graphdef, state, ids, mask, knobs["num_tokens"], num_beams=w, max_new_tokens=n
    )
    beams = _init_beams(b, w, n, knobs["pad_id"])
    v = logp.shape[-1]
    t, tok = 0, None
    while t < n:
        if t > 0:
            logp, cache = _host_step(graphdef, state, tok, cache, knobs["num_tokens"])
        alive_tok = np.asarray(beams.alive_tok)
        alive_sum = np.asarray(beams.alive_sum)
        done = np.asarray(beams.done)
        allowed = np.zeros((b, w, v), bool)
        for i in range(b):
            for j in range(w):
                if done[i] or alive_sum[i, j] == _NEG_INF:
                    continue
                ok = [int(x) for x in fn(alive_tok[i, j, :t].tolist())]
                if ok and (min(ok) < 0 or max(ok) >= num_rows):
                    raise DecodeError(
                        f"constraint returned token ids outside [0, {num_rows}): {ok[:5]}"
                    )
                allowed[i, j, ok] = True
        beams, flat, tok = _host_select(beams, logp, allowed, np.int32(t), knobs, max_new_tokens=n)
        tok = tok.reshape(-1)
        cache = cache.take(flat)
        t += 1
        if bool(np.all(np.asarray(beams.done))):
            break
    eligible = beams.alive_sum > _NEG_INF
    return _finalize(beams, jnp.asarray(t, jnp.int32), eligible, knobs["length_penalty"])


def _checked_trie_arrays(
    trie: TrieConstraint | None, limit: int, max_new_tokens: int
) -> _TrieArrays:
    """The trie's arrays for :func:`_beam_jit`, after checking its ids lie below ``limit``
    and its shortest candidate fits; an unused placeholder when there is no trie."""
    if trie is None:
        return _TrieArrays.of(TrieConstraint.from_sequences([[0]]))  # unused placeholder
    used = trie.children_tokens[trie.children_tokens >= 0]
    if used.size and used.max() >= limit:
        raise DecodeError(
            f"constraint token id {int(used.max())} is outside the vocabulary [0, "
            f"{limit}); build the trie with the extended tokenizer's ids"
        )
    if trie.min_length > max_new_tokens:
        raise DecodeError(
            f"max_new_tokens={max_new_tokens} is shorter than the shortest candidate "
            f"({trie.min_length} tokens with EOS); raise max_new_tokens"
        )
    return _TrieArrays.of(trie)


def beam_search(
    model: LlamaForCausalLM,
    prompts: Prompts,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: int | Sequence[int] | None = (),
    num_tokens: int | None = None,
    constraint: TrieConstraint | Callable[[list[int]], Sequence[int]] | None = None,
    length_penalty: float = 0.0,
    pad_id: int = 0,
    prompt_bucket: int = 16,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> BeamOutput:
    """Batched beam search returning `num_beams` distinct hypotheses per prompt, best first.

    Each prompt is prefilled once and its cache shared by its `num_beams` rows. A step
    keeps the `num_beams` best unfinished continuations over all beams x allowed tokens and
    moves finishing ones (an `eos_ids` token, or a complete candidate of a trie without EOS)
    into a pool of the `num_beams` best hypotheses; live beams still present after
    `max_new_tokens` compete with the pool (under a trie only if they spell a complete
    candidate). When `num_beams` is at least the number of candidates of a trie, the result
    is the exhaustive ranking of all candidates.

    Args:
        model: the model.
        prompts: a list of token-id lists, or `(ids, mask)` `[B, T]` arrays left-padded.
        num_beams: beams per prompt (`W`), also the number of hypotheses returned.
        max_new_tokens: the most tokens a hypothesis may have (`N`).
        eos_ids: token id(s) that finish a hypothesis (ignored under a `TrieConstraint`,
            which uses its own `eos_id`).
        num_tokens: the tokenizer's size; table rows `>= num_tokens` are never chosen.
        constraint: a `TrieConstraint` (fully jit-compiled), or a callable
            `fn(prefix) -> allowed ids` given the new tokens so far (runs on the host once per
            step; slower); None for unconstrained search.
        length_penalty: hypotheses are ranked by `sum_logprob / length ** length_penalty`.
        pad_id: id for left padding and unused positions.
        prompt_bucket: prompt lengths are rounded up to a multiple of this.
        batch_sharding: where the `[B, T]` prompt rows go on a sharded model (over the data
            axes, `B` a multiple of their shards; trie or none); every process gets all rows.

    Returns:
        A `BeamOutput` (`sequences` per prompt, best first; `scores [B, num_beams]`).

    Raises:
        DecodeError: bad prompts or settings, or a trie whose shortest candidate does not fit
            in `max_new_tokens`.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> trie = TrieConstraint.from_sequences([[5, 6, 7], [5, 9, 9], [8, 6, 7]])
        >>> out = beam_search(model, [[1, 2]], num_beams=3, max_new_tokens=3, constraint=trie)
        >>> sorted(map(tuple, out.sequences[0]))
        [(5, 6, 7), (5, 9, 9), (8, 6, 7)]
    """
    _check_common(model, max_new_tokens, num_tokens)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise DecodeError(f"num_beams={num_beams!r} must be a positive integer")
    ids, mask = _left_pad(prompts, pad_id=pad_id, bucket=prompt_bucket, num_rows=model.num_rows)
    trie = constraint if isinstance(constraint, TrieConstraint) else None
    knobs = dict(
        # Under a trie, EOS is part of the trie (its `eos_id`), not a free choice.
        eos=_eos_array(() if trie is not None else eos_ids, model.num_rows),
        num_tokens=np.int32(model.num_rows if num_tokens is None else num_tokens),
        length_penalty=np.float32(length_penalty),
        pad_id=np.int32(pad_id),
    )
    graphdef, state = nnx.split(model)
    size = dict(num_beams=num_beams, max_new_tokens=max_new_tokens)
    if constraint is None or trie is not None:
        limit = model.num_rows if num_tokens is None else num_tokens
        arrays = _checked_trie_arrays(trie, limit, max_new_tokens)
        ids, mask = _put_prompts(ids, mask, batch_sharding)
        toks, lens, scores = _beam_jit(
            graphdef,
            state,
            ids,
            mask,
            arrays,
            knobs,
            use_trie=trie is not None,
            **size,
        )
    elif callable(constraint):
        toks, lens, scores = _beam_host_loop(
            graphdef, state, ids, mask, constraint, knobs, num_rows=model.num_rows, **size
        )
    else:
        raise DecodeError(
            f"constraint must be a TrieConstraint, a callable or None, got {type(constraint)}"
        )
    toks, lens, scores = host_array(toks), host_array(lens), host_array(scores, dtype=np.float32)
    sequences = [
        [toks[i, j, : lens[i, j]].tolist() for j in range(num_beams) if scores[i, j] > _NEG_INF]
        for i in range(toks.shape[0])
    ]
    return BeamOutput(sequences=sequences, scores=scores)


# ----------------------------------------------------------------------------------------------
# scoring


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_jit(graphdef, state, ids, mask, target_mask, num_tokens):
    model = nnx.merge(graphdef, state)
    logp = _logp(model(ids, attention_mask=mask)[:, :-1], num_tokens)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_mask[:, 1:], picked, 0.0), axis=1)


def score_sequences(
    model: LlamaForCausalLM,
    prompt: Sequence[int],
    continuations: Sequence[Sequence[int]],
    *,
    num_tokens: int | None = None,
    batch_size: int = 64,
    bucket: int = 16,
) -> np.ndarray:
    """Sums of log-probs of each continuation after `prompt`, by teacher forcing (no cache).

    Args:
        model: the model.
        prompt: the prompt's token ids (non-empty).
        continuations: token-id sequences to score (an empty one scores 0).
        num_tokens: the tokenizer's size; rows `>= num_tokens` are excluded from the softmax,
            as in `generate` and `beam_search`.
        batch_size: continuations per forward pass.
        bucket: sequence lengths are rounded up to a multiple of this.

    Returns:
        `[C]` float32 `sum_i log p(c_i | prompt, c_<i)`.

    Example:
        >>> from gti_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> score_sequences(model, [1, 2], [[3], [3, 4], []]).shape
        (3,)
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise DecodeError("score_sequences needs a non-empty prompt")
    if num_tokens is not None and not 0 < num_tokens <= model.num_rows:
        raise DecodeError(f"num_tokens={num_tokens} must be in [1, {model.num_rows}]")
    conts = [[int(t) for t in c] for c in continuations]
    if not conts:
        return np.zeros((0,), np.float32)
    seqs = [prompt + c for c in conts]
    flat = [t for s in seqs for t in s]
    if min(flat) < 0 or max(flat) >= model.num_rows:
        raise DecodeError(f"token ids must be in [0, {model.num_rows})")
    width = -(-max(len(s) for s in seqs) // bucket) * bucket
    # Batch rounded up to a power of two (>= 8): few distinct compiled shapes.
    batch = min(batch_size, max(8, 1 << (len(seqs) - 1).bit_length()))
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        ids = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), np.int32)
        target = np.zeros((batch, width), bool)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
            target[i, len(prompt) : len(s)] = True
        mask[len(chunk) :, 0] = 1  # filler rows: one real token
        limit = np.int32(model.num_rows if num_tokens is None else num_tokens)
        res = _score_jit(graphdef, state, ids, mask, target, limit)
        out.append(np.asarray(res)[: len(chunk)])
    return np.concatenate(out).astype(np.float32)


def _cache_sizes() -> dict[str, int]:
    """Compiled-variant counts of the jitted entry points (for compile-once tests)."""
    return {
        "generate": _generate_jit._cache_size(),
        "beam": _beam_jit._cache_size(),
        "score": _score_jit._cache_size(),
    }
