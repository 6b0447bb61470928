"""Tests of gti_jax.models.decode: generate, beam search, trie constraints, scoring."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gti_jax.models import LlamaForCausalLM, load_hf_dir
from gti_jax.models import decode as dec
from gti_jax.models.decode import (
    DecodeError,
    TrieConstraint,
    beam_search,
    generate,
    score_sequences,
)
from gti_jax.models.llama import SharedPrefixKV
from tests.helpers.beams import CANDIDATES as HF_CANDIDATES
from tests.helpers.beams import assert_like_transformers, hf_constrained_beams
from tests.helpers.hf_models import make_tiny_hf_model, tiny_llama

V = 48
PROMPTS = [[5, 9, 2, 7, 11], [3], [8, 8, 1]]
N = 4  # new tokens: one value everywhere, so tests share compiled functions


def _model(seed: int = 0, head_scale: float = 40.0) -> LlamaForCausalLM:
    """A tiny random model whose head is scaled so next-token distributions are peaked."""
    model = tiny_llama(
        V, hidden_size=32, intermediate_size=64, layers=2, heads=4, kv_heads=2, seed=seed
    )
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * head_scale
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def flat_model():
    """Less peaked distributions: beam search and greedy genuinely differ."""
    return _model(seed=1, head_scale=8.0)


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, state, ids, length):
    model = nnx.merge(graphdef, state)
    return model(ids[None], attention_mask=(jnp.arange(ids.shape[0]) < length)[None])[0, length - 1]


def _uncached_logits(model, ids: list[int]) -> np.ndarray:
    """Next-token logits after `ids`, recomputed from scratch (no cache; right-padded to 32)."""
    padded = np.zeros(32, np.int32)
    padded[: len(ids)] = ids
    return np.asarray(_last_logits(*nnx.split(model), jnp.asarray(padded), len(ids)))


def _greedy_reference(model, prompt, n, eos=()):
    """Step-by-step argmax, recomputing the whole sequence each step (no cache)."""
    seq, out = list(prompt), []
    for _ in range(n):
        tok = int(np.argmax(_uncached_logits(model, seq)))
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_greedy_equals_uncached_argmax_and_batch_equals_single(model):
    out = generate(model, PROMPTS, max_new_tokens=N)
    assert out.tokens.shape == (3, N)
    assert out.lengths.tolist() == [N] * 3
    for i, p in enumerate(PROMPTS):
        assert out.sequences[i] == _greedy_reference(model, p, N)
        assert generate(model, [p], max_new_tokens=N).sequences[0] == out.sequences[i]
    # (ids, mask) arrays, left-padded, give the same result.
    ids = np.zeros((3, 5), np.int32)
    mask = np.zeros((3, 5), np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, 5 - len(p) :], mask[i, 5 - len(p) :] = p, 1
    assert generate(model, (ids, mask), max_new_tokens=N).sequences == out.sequences


def test_greedy_matches_transformers(tmp_path):
    path = make_tiny_hf_model(tmp_path, "llama")
    model, tok = load_hf_dir(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eos = tok.eos_token_id
    for text in ("the quick brown fox", "Hello world, hello"):
        prompt = tok.encode(text)
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(prompt) :].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        ours = generate(model, [prompt], max_new_tokens=10, eos_ids=eos, pad_id=eos)
        assert ours.sequences[0] == ref


def test_sampling_deterministic_top_k_and_top_p(flat_model):
    kw = dict(max_new_tokens=N, temperature=1.0)
    a = generate(flat_model, PROMPTS, key=jax.random.key(3), top_k=3, **kw)
    b = generate(flat_model, PROMPTS, key=jax.random.key(3), top_k=3, **kw)
    c = generate(flat_model, PROMPTS, key=jax.random.key(4), top_k=3, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    for p, seq in zip(PROMPTS, a.sequences, strict=True):
        for t, tok in enumerate(seq):
            top3 = np.argsort(_uncached_logits(flat_model, p + seq[:t]))[-3:]
            assert tok in top3
    greedy = generate(flat_model, PROMPTS, max_new_tokens=N)
    tiny_p = generate(flat_model, PROMPTS, key=jax.random.key(5), top_p=1e-6, **kw)
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)
    with pytest.raises(DecodeError, match="needs a key"):
        generate(flat_model, PROMPTS, max_new_tokens=N, temperature=1.0)


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_padding_rows_never_chosen():
    model = _model(seed=2)
    num_tokens = 40
    # Make the padding rows win every argmax unless they are masked.
    kernel = np.array(model.lm_head.kernel[...])
    kernel[:, num_tokens:] = 5.0 * np.abs(kernel).max() * np.sign(kernel[:, num_tokens:] + 1e-9)
    model.lm_head.kernel[...] = jnp.asarray(kernel)
    model.embed.embedding[...] = model.embed.embedding[...].at[num_tokens:].set(5.0)
    unmasked = generate(model, PROMPTS, max_new_tokens=N)
    assert (unmasked.tokens >= num_tokens).any()  # the test can fail
    greedy = generate(model, PROMPTS, max_new_tokens=N, num_tokens=num_tokens)
    sampled = generate(
        model,
        PROMPTS,
        max_new_tokens=N,
        num_tokens=num_tokens,
        temperature=2.0,
        key=jax.random.key(0),
    )
    beams = beam_search(model, PROMPTS, num_beams=4, max_new_tokens=N, num_tokens=num_tokens)
    assert (greedy.tokens < num_tokens).all() and (sampled.tokens < num_tokens).all()
    assert all(t < num_tokens for seqs in beams.sequences for s in seqs for t in s)


def test_eos_stops_rows(model):
    free = generate(model, PROMPTS, max_new_tokens=N)
    eos = free.sequences[0][1]
    out = generate(model, PROMPTS, max_new_tokens=N, eos_ids=[eos], pad_id=1)
    for i, seq in enumerate(free.sequences):
        cut = seq[: seq.index(eos) + 1] if eos in seq else seq
        assert out.sequences[i] == cut
        assert out.lengths[i] == len(cut)
        assert (out.tokens[i, len(cut) :] == 1).all()
    assert out.lengths[0] <= 2


def _check_beams(model, prompts, out, num_beams, atol=1e-4):
    for p, seqs, scores in zip(prompts, out.sequences, out.scores, strict=True):
        assert len(seqs) == num_beams
        assert len({tuple(s) for s in seqs}) == num_beams  # distinct
        assert np.all(np.diff(scores) <= 1e-6)  # best first
        np.testing.assert_allclose(score_sequences(model, p, seqs), scores, atol=atol)


def test_beam_distinct_sorted_scores_match(flat_model):
    out = beam_search(flat_model, PROMPTS, num_beams=4, max_new_tokens=N)
    _check_beams(flat_model, PROMPTS, out, 4)
    assert all(len(s) == N for seqs in out.sequences for s in seqs)
    # With an EOS, hypotheses of different lengths compete and keep their EOS.
    eos = out.sequences[0][1][1]
    out = beam_search(flat_model, PROMPTS, num_beams=4, max_new_tokens=N, eos_ids=eos)
    _check_beams(flat_model, PROMPTS, out, 4)
    ended = [s for seqs in out.sequences for s in seqs if s[-1] == eos]
    assert ended and all(eos not in s[:-1] for seqs in out.sequences for s in seqs)


def test_beam_one_equals_greedy_and_top1_equals_greedy_when_dominant(flat_model):
    greedy = generate(flat_model, PROMPTS, max_new_tokens=N)
    one = beam_search(flat_model, PROMPTS, num_beams=1, max_new_tokens=N)
    assert [s[0] for s in one.sequences] == greedy.sequences
    # A very peaked model: the greedy path has probability > 1/2, so no other sequence can
    # beat it and beam search must rank it first.
    peaked = _model(seed=3, head_scale=400.0)
    greedy = generate(peaked, PROMPTS, max_new_tokens=N)
    for p, g in zip(PROMPTS, greedy.sequences, strict=True):
        assert score_sequences(peaked, p, [g])[0] > np.log(0.5)
    beams = beam_search(peaked, PROMPTS, num_beams=4, max_new_tokens=N)
    assert [s[0] for s in beams.sequences] == greedy.sequences


def _candidates():
    """12 semantic-ID-like candidates of 3 tokens with shared prefixes."""
    combos = itertools.product([10, 11, 12], [20, 21], [30, 31, 32])
    return [list(c) for i, c in enumerate(combos) if i % 3 != 1][:12]


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
@pytest.mark.parametrize("eos", [None, 4])
def test_constrained_valid_and_exhaustive(flat_model, eos):
    cands = _candidates()
    trie = TrieConstraint.from_sequences(cands, eos_id=eos)
    full = beam_search(flat_model, PROMPTS, num_beams=12, max_new_tokens=N, constraint=trie)
    suffix = [] if eos is None else [eos]
    for i, p in enumerate(PROMPTS):
        ref = score_sequences(flat_model, p, [c + suffix for c in cands])
        order = np.argsort(-ref, kind="stable")
        assert full.sequences[i] == [cands[j] + suffix for j in order]
        np.testing.assert_allclose(full.scores[i, :12], ref[order], atol=1e-4)
    # More beams than candidates: only the 12 exist; the rest of the scores are -inf.
    more = beam_search(flat_model, PROMPTS[:1], num_beams=16, max_new_tokens=N, constraint=trie)
    assert more.sequences[0] == full.sequences[0] and np.isneginf(more.scores[0, 12:]).all()


@pytest.mark.slow  # tens of seconds of compiling on 2 cores
def test_callable_constraint_matches_trie(flat_model):
    eos = 4
    trie = TrieConstraint.from_sequences(_candidates(), eos_id=eos)
    kw = dict(num_beams=4, max_new_tokens=N)
    a = beam_search(flat_model, PROMPTS, constraint=trie, **kw)
    for seqs in a.sequences:  # fewer beams than candidates: only valid, distinct candidates
        assert len({tuple(s) for s in seqs}) == 4
        assert all(trie.contains(s) and s[-1] == eos and s[:-1] in _candidates() for s in seqs)
    b = beam_search(flat_model, PROMPTS, constraint=trie.allowed, eos_ids=eos, **kw)
    assert a.sequences == b.sequences
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_compiles_once_per_bucket(model):
    trie = TrieConstraint.from_sequences(_candidates())
    generate(model, [[1, 2, 3], [4, 5], [6]], max_new_tokens=N)
    beam_search(model, [[1, 2], [3], [4]], num_beams=4, max_new_tokens=N, constraint=trie)
    before = dec._cache_sizes()
    # Other prompts in the same length bucket, other EOS / num_tokens / sampling values.
    generate(model, [[7] * 9, [6, 6, 6, 6], [1]], max_new_tokens=N, eos_ids=5, num_tokens=40)
    beam_search(
        model, [[9, 9, 9], [3, 1, 4, 1], [2]], num_beams=4, max_new_tokens=N, constraint=trie
    )
    assert dec._cache_sizes() == before


def test_trie_arrays_and_errors(model):
    trie = TrieConstraint.from_sequences([[5, 6], [5, 7], [8], [5, 6]], eos_id=2)
    assert trie.allowed([]) == [5, 8] and trie.allowed([5]) == [6, 7] and trie.allowed([8]) == [2]
    assert trie.allowed([9]) == [] and trie.contains([5, 6, 2]) and not trie.contains([5])
    assert trie.max_branch == 2 and (trie.min_length, trie.max_length) == (2, 3)
    assert trie.final.sum() == 1 and trie.final[-1]
    with pytest.raises(DecodeError, match="contains eos_id"):
        TrieConstraint.from_sequences([[1, 2]], eos_id=2)
    with pytest.raises(DecodeError, match="empty"):
        TrieConstraint.from_sequences([[1], []])
    bad = TrieConstraint.from_sequences([[1, 47]])
    with pytest.raises(DecodeError, match="outside the vocabulary"):
        beam_search(model, [[1]], num_beams=2, max_new_tokens=N, constraint=bad, num_tokens=40)
    with pytest.raises(DecodeError, match="shorter than the shortest"):
        beam_search(model, [[1]], num_beams=2, max_new_tokens=1, constraint=trie)
    with pytest.raises(DecodeError, match="left-padded"):
        generate(model, (np.ones((1, 3)), np.array([[1, 1, 0]])), max_new_tokens=N)
    with pytest.raises(DecodeError, match="empty"):
        generate(model, [[1], []], max_new_tokens=N)
    with pytest.raises(DecodeError, match="must be in"):
        generate(model, [[1, V]], max_new_tokens=N)


HF_PROMPTS = [[86, 260, 223, 83, 87, 277, 77, 280, 354], [42, 299, 81, 272], [67]]


def test_constrained_beams_match_transformers_and_exhaustive(tmp_path):
    """Ranked candidates and scores as transformers' constrained beam search (tied Llama):
    equal with as many beams as candidates, a pool at least as good with fewer (see
    `tests.helpers.beams`; here the two differ at `W = 3`, the test can fail either way).

    Scores on both sides are sums of log-probs normalized over the whole vocabulary; float32
    forwards of two frameworks agree to ~1e-6 per logit, so 1e-4 bounds a sum of <= 4.
    """
    model, tok = load_hf_dir(make_tiny_hf_model(tmp_path, "llama"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "llama-0"), dtype=torch.float32
    ).eval()
    eos = tok.eos_token_id
    trie = TrieConstraint.from_sequences(HF_CANDIDATES, eos_id=eos)
    n = trie.max_length
    for w in (3, len(HF_CANDIDATES)):  # fewer beams than candidates, and exactly as many
        ours = beam_search(
            model, HF_PROMPTS, num_beams=w, max_new_tokens=n, constraint=trie, pad_id=eos
        )
        seqs, scores = hf_constrained_beams(
            hf, HF_PROMPTS, trie, num_beams=w, max_new_tokens=n, pad=eos
        )
        exhaustive = w == len(HF_CANDIDATES)
        assert_like_transformers(ours, seqs, scores, atol=1e-4, exhaustive=exhaustive)
        if w == 3:  # transformers' pool misses an EOS candidate outside its best 2W
            assert ours.sequences != seqs
    # As many beams as candidates is exhaustive: every candidate, ranked by its full score.
    # More beams than candidates (transformers then returns copies at -1e9): the same list,
    # and -inf scores for the beams no candidate fills.
    more = beam_search(model, HF_PROMPTS, num_beams=10, max_new_tokens=n, constraint=trie)
    for i, p in enumerate(HF_PROMPTS):
        ref = score_sequences(model, p, [c + [eos] for c in HF_CANDIDATES])
        order = np.argsort(-ref, kind="stable")
        assert ours.sequences[i] == [HF_CANDIDATES[j] + [eos] for j in order]
        np.testing.assert_allclose(ours.scores[i], ref[order], atol=1e-4)
        assert more.sequences[i] == ours.sequences[i]
        assert np.isneginf(more.scores[i, len(HF_CANDIDATES) :]).all()


def test_shared_prompt_cache_equals_repeated_cache(flat_model):
    """Beams reading their prompt's keys/values once (`SharedPrefixKV`) get the logits of a
    cache holding a copy per beam: the same products, summed over the prompt's slots and the
    beam's own in two parts, so float32 agrees to ~1e-6 (not bitwise)."""
    w, n = 3, N
    graphdef, state = nnx.split(flat_model)
    ids, mask = dec._left_pad(PROMPTS, pad_id=0, bucket=8, num_rows=V)

    @jax.jit
    def run(state, ids, mask, toks, parents):
        model = nnx.merge(graphdef, state)
        _, plain = dec._prefill(model, ids, mask, ids.shape[1] + n)
        plain = plain.take(jnp.repeat(jnp.arange(ids.shape[0]), w))
        _, shared = dec._prefill_beams(model, ids, mask, w, n)
        assert isinstance(shared.k[0], SharedPrefixKV)
        out = []
        for tok, parent in zip(toks, parents, strict=True):
            a, plain = dec._step(model, tok, plain)
            b, shared = dec._step(model, tok, shared)
            out.append((a, b))
            plain, shared = plain.take(parent), shared.take(parent)
        return out

    b = len(PROMPTS)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, V, (n - 1, b * w)).astype(np.int32)
    # parents stay within each prompt's rows, as beam search's do
    parents = (np.arange(b)[:, None] * w + rng.integers(0, w, (n - 1, b, w))).reshape(n - 1, -1)
    for a, b_ in run(state, ids, mask, toks, parents):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5)


def test_trie_logp_is_log_softmax_at_the_allowed_tokens():
    """`_trie_logp` evaluates `jax.nn.log_softmax`'s own expression at M columns (padding
    rows masked by `num_tokens`), so it equals gathering the full log-softmax exactly."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, V)) * 5
    tokens = jnp.asarray(np.random.default_rng(1).integers(-1, 40, (2, 3, 6)), jnp.int32)
    num_tokens = jnp.int32(40)
    full = jax.jit(lambda x, t, n: jnp.take_along_axis(dec._logp(x, n), jnp.maximum(t, 0), axis=-1))
    part = jax.jit(dec._trie_logp)(logits, tokens, num_tokens)
    np.testing.assert_array_equal(np.asarray(part), np.asarray(full(logits, tokens, num_tokens)))
