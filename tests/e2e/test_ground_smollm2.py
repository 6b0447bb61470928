"""GTI on the real SmolLM2-135M: grounding spreads mean-initialized new tokens apart.

Sixteen entity tokens (capitals and famous people) are added with mean initialization, so
their embedding matrix has rank one; a short grounding run on paired prompts in both
directions (description -> token, token -> description) must lower the paired-prompt loss and
raise the effective rank of the new-token matrix far above one, touching no other parameter.
"""

from __future__ import annotations

import copy
import time

import jax
import numpy as np
import pytest
from flax import nnx

from gti_jax.geometry import effective_rank
from gti_jax.train.config import GroundConfig
from gti_jax.train.data import Batcher, Example, encode_examples
from gti_jax.train.ground import (
    eval_loss,
    ground_optimizer,
    join_new_rows,
    make_ground_step,
    split_new_rows,
)
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab
from gti_jax.vocab.tokens import extend_tokenizer

# 16 grounding steps of the real 135M model
pytestmark = pytest.mark.slow

ENTITIES = {
    "<paris>": "Paris, the capital of France",
    "<tokyo>": "Tokyo, the capital of Japan",
    "<cairo>": "Cairo, the capital of Egypt",
    "<lima>": "Lima, the capital of Peru",
    "<ottawa>": "Ottawa, the capital of Canada",
    "<madrid>": "Madrid, the capital of Spain",
    "<nairobi>": "Nairobi, the capital of Kenya",
    "<canberra>": "Canberra, the capital of Australia",
    "<einstein>": "Albert Einstein, the physicist",
    "<curie>": "Marie Curie, the chemist",
    "<mozart>": "Wolfgang Amadeus Mozart, the composer",
    "<picasso>": "Pablo Picasso, the painter",
    "<shakespeare>": "William Shakespeare, the playwright",
    "<darwin>": "Charles Darwin, the naturalist",
    "<gandhi>": "Mahatma Gandhi, the leader of Indian independence",
    "<newton>": "Isaac Newton, the mathematician",
}
SYSTEM = "Answer briefly."
STEPS = 16  # 2 epochs of the 32 pairs at batch 4 (~1 s a step on 2 CPU cores)


def _pairs() -> list[Example]:
    out = []
    for token, text in ENTITIES.items():
        out.append(Example(f"Which token stands for {text}?", token))
        out.append(Example(f"What does {token} stand for?", text))
    return out


def test_grounding_smollm2_spreads_new_tokens(smollm2):
    t0 = time.perf_counter()
    model, tok = smollm2
    tok = copy.deepcopy(tok)  # the session's tokenizer: new tokens go to a copy
    n_old = len(tok)
    ids = extend_tokenizer(tok, list(ENTITIES))
    new_ids = range(ids[0], ids[-1] + 1)
    assert list(new_ids) == ids and ids[0] == n_old

    graphdef, state = nnx.split(model)
    state = resize_vocab(
        state, EmbeddingSpec.nnx_llama(tied=True), len(tok), "mean", pad_to_multiple_of=64
    )
    model = nnx.merge(graphdef, state)
    graphdef, state = nnx.split(model)
    table_before = np.asarray(state["embed"]["embedding"].get_value())

    encoded = encode_examples(tok, _pairs(), max_len=40, system=SYSTEM)
    # One bucket: one compile of the step and one of the evaluation.
    batcher = Batcher(encoded, batch_size=4, seed=0, buckets=(40,), pad_id=tok.pad_token_id)
    eval_batches = [batcher.batch_at(s) for s in range(4)]  # 16 of the 32 pairs

    params = split_new_rows(state, new_ids, tied=True)
    rank_init = effective_rank(np.asarray(params.embed))
    loss_init = eval_loss(graphdef, state, params, eval_batches, new_ids)
    assert all(b.input_ids.shape == (4, 40) for b in eval_batches)

    cfg = GroundConfig(steps=STEPS, lr=1e-2, batch_size=4, warmup_steps=2)
    step = make_ground_step(graphdef, state, new_ids, ground_optimizer(cfg), tied=True)
    params, opt_state = step.init(params)
    losses = []
    for s in range(STEPS):
        params, opt_state, metrics = step(params, opt_state, batcher.batch_at(s))
        losses.append(float(metrics["loss"]))
    assert step.traces == 1

    rank_after = effective_rank(np.asarray(params.embed))
    loss_after = eval_loss(graphdef, state, params, eval_batches, new_ids)
    print(
        f"\nSmolLM2 GTI: eff. rank {rank_init:.3f} -> {rank_after:.2f}, paired loss "
        f"{loss_init:.3f} -> {loss_after:.3f}, train loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    assert rank_init < 1.05
    assert rank_after > 5.0  # measured: 7.0 (9.0 after 32 steps)
    assert loss_after < 0.75 * loss_init  # measured: 7.90 -> 5.62 (4.0 after 32 steps)
    assert np.isfinite(losses).all()

    # Only the new rows moved; folding them back gives the grounded model.
    table_after = np.asarray(
        join_new_rows(state, params, new_ids, tied=True)["embed"]["embedding"].get_value()
    )
    old = np.r_[0 : new_ids.start, new_ids.stop : table_before.shape[0]]
    assert np.array_equal(table_after[old], table_before[old])
    np.testing.assert_array_equal(table_after[new_ids.start : new_ids.stop], params.embed)
    assert jax.tree.structure(step.frozen_state) == jax.tree.structure(state)
