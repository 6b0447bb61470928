"""transformers' constrained beam search, the reference for `gti_jax.models.decode.beam_search`.

:func:`hf_constrained_beams` runs ``generate(num_beams=W, num_return_sequences=W,
prefix_allowed_tokens_fn=trie.allowed, length_penalty=0)`` on left-padded prompts and returns
what `beam_search` returns: per prompt the new tokens of each hypothesis up to and including
its EOS, best first, and their scores (``sequences_scores``: the sum of the tokens'
log-probabilities, normalized over the whole vocabulary, since the length penalty is 0).

:func:`assert_like_transformers` states how the two searches relate. Their live beams are
the same at every step (the best `W` continuations that do not end; transformers takes them
from its best `2W` candidates, which hold at least `W` of them as at most `W` end with the one
EOS). They differ in what may enter the pool of finished hypotheses: transformers admits an
EOS candidate only if it is among the step's best `2W`, gti_jax any of the step's best `W`
EOS candidates. So gti_jax's pool is the best `W` of a superset: its `k`-th score is never
below transformers', any transformers hypothesis scoring above gti_jax's `W`-th is in
gti_jax's list, and with as many beams as candidates both rank every candidate (equal).
"""

from __future__ import annotations

import numpy as np
import torch

# Candidates of different lengths (1 to 3 tokens, one a prefix of others) within the tiny
# test tokenizer's 375 ids; EOS (0 in the tiny models) is appended by the trie.
CANDIDATES = [[7], [7, 9], [7, 11, 5], [12, 9, 5], [12, 9, 6], [12, 13], [20, 21, 22], [20, 23]]


def hf_constrained_beams(hf, prompts, trie, *, num_beams: int, max_new_tokens: int, pad: int):
    """`(sequences, scores [B, W])` of transformers' beam search under `trie` (see above).

    `trie` must end candidates with its `eos_id` (transformers finishes a beam on EOS only).
    """
    eos = trie.eos_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            length_penalty=0.0,
            # beams past an EOS (kept by transformers at -1e9) may continue with EOS only
            prefix_allowed_tokens_fn=lambda _, x: trie.allowed(x[width:].tolist()) or [eos],
            eos_token_id=eos,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seqs = []
    for row in out.sequences[:, width:].tolist():
        seqs.append(row[: row.index(eos) + 1] if eos in row else row)
    scores = out.sequences_scores.numpy().reshape(len(prompts), num_beams).astype(np.float32)
    grouped = [seqs[i * num_beams : (i + 1) * num_beams] for i in range(len(prompts))]
    return grouped, scores


def assert_like_transformers(ours, seqs, scores, *, atol: float, exhaustive: bool) -> None:
    """Checks `beam_search`'s `ours` against transformers' `(seqs, scores)` (see above):
    equal when `exhaustive` (as many beams as candidates), else the superset relation."""
    if exhaustive:
        assert ours.sequences == seqs
        np.testing.assert_allclose(ours.scores, scores, atol=atol)
        return
    for mine, my_scores, theirs, their_scores in zip(
        ours.sequences, ours.scores, seqs, scores, strict=True
    ):
        assert np.all(my_scores >= their_scores - atol)
        for s, score in zip(theirs, their_scores, strict=True):
            if score > my_scores[-1] + atol:
                assert s in mine
                np.testing.assert_allclose(my_scores[mine.index(s)], score, atol=atol)
