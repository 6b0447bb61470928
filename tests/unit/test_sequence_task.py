"""The sequence task: chunked whole-history rows, the segment JSONL form, and its evaluation.

The rows must give exactly the targets of the sliding-window prompts (same item, same
context up to the chunking rule), the segment form must be refused in one line when it is
malformed, and evaluation must ask the model in the form it was trained on.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from gti_jax.rec.data import Item, RecDataset, leave_one_out
from gti_jax.rec.prompts import sequence_chunks, sequence_eval_rows, sequence_rows
from gti_jax.train.data import (
    DataError,
    encode_eval_prompt,
    encode_examples,
    read_examples,
    segment_example,
)
from gti_jax.train.evaluate import Evaluator, training_targets
from tests.helpers.tokenizers import tiny_tokenizer

# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 30, 31, 97])
@pytest.mark.parametrize(("items", "overlap"), [(2, 0), (2, 1), (4, 1), (8, 3), (30, 8)])
def test_chunks_cover_every_target_once_with_overlap_context(length, items, overlap):
    chunks = sequence_chunks(length, items, overlap)
    targets = [t for start, stop, first in chunks for t in range(first, stop)]
    assert targets == list(range(1, length))  # every item but the first, once, in order
    for i, (start, stop, first) in enumerate(chunks):
        assert stop - start <= items
        assert first - start == (1 if i == 0 else overlap)  # the context the rule promises
        assert start == 0 or first - start == overlap


def test_chunks_refuse_bad_sizes():
    with pytest.raises(ValueError, match="overlap < items"):
        sequence_chunks(10, 4, 4)


def _dataset(seqs):
    n = 1 + max(max(s) for s in seqs)
    return RecDataset(
        items=tuple(Item(str(i), f"t{i}") for i in range(n)),
        user_ids=tuple(f"u{u}" for u in range(len(seqs))),
        sequences=tuple(tuple(s) for s in seqs),
    )


@pytest.mark.parametrize(("items", "overlap"), [(3, 1), (5, 2), (40, 8)])
def test_sequence_rows_give_exactly_the_sliding_window_targets(items, overlap):
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 20, size=n)) for n in (3, 4, 5, 9, 17, 33)]
    split = leave_one_out(_dataset(seqs), max_history=1000)
    sids = [f"<a_{i}>" for i in range(20)]
    rows = sequence_rows(split.train_sequences, sids, items=items, overlap=overlap)

    # every loss segment of the rows, with the items before it in its row as context
    got = []
    for row in rows:
        segs = row["segments"]
        assert segs[0] == {"text": "History:", "loss": False}
        ids = [s["text"] for s in segs[1:]]
        for j, s in enumerate(segs[1:]):
            if s["loss"]:
                got.append((tuple(ids[:j]), ids[j]))
    # the sliding windows of the prompt task, in the same order (by user, then time)
    want = [(tuple(sids[i] for i in ex.history), sids[ex.target]) for ex in split.train]
    assert [t for _, t in got] == [t for _, t in want]
    for (ctx, _), (full, _) in zip(got, want, strict=True):
        # the context is the most recent part of the window's history: all of it, or at
        # least `overlap` items (the chunking rule), never anything else
        assert full[len(full) - len(ctx) :] == ctx
        assert len(ctx) == len(full) or len(ctx) >= overlap


def test_sequence_eval_rows_are_the_last_training_row_of_the_history():
    seqs = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    split = leave_one_out(_dataset(seqs), max_history=2)
    sids = [f"<a_{i}>" for i in range(11)]
    test = sequence_eval_rows(split, sids, "test", items=4)
    valid = sequence_eval_rows(split, sids, "valid", items=4)
    texts = lambda row: [s["text"] for s in row["segments"]]  # noqa: E731
    assert texts(test[0]) == ["History:", "<a_4>", "<a_5>", "<a_6>", "<a_7>"]
    assert texts(valid[0]) == ["History:", "<a_3>", "<a_4>", "<a_5>", "<a_6>"]
    assert texts(test[1]) == ["History:", "<a_8>", "<a_9>", "<a_10>"]
    for row in test + valid:  # only the target carries the loss
        assert [s["loss"] for s in row["segments"]] == [False] * (len(row["segments"]) - 1) + [True]


# --------------------------------------------------------------------------- the file form


def test_read_segment_rows(tmp_path):
    p = tmp_path / "seq.jsonl"
    row = {"segments": [{"text": "H:", "loss": False}, {"text": "x", "loss": True}]}
    p.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    seq, plain = read_examples(p)
    assert seq.segments == (("H:", False), ("x", True)) and seq.completion == "x"
    assert seq.num_targets == 1 and plain.segments is None


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"segments": []}, "non-empty list"),
        ({"segments": "x"}, "non-empty list"),
        ({"segments": [{"text": "a", "loss": False}]}, 'no segment has "loss": true'),
        ({"segments": [{"text": "a"}]}, 'exactly "text" and "loss"'),
        ({"segments": [{"text": "", "loss": True}]}, "non-empty string"),
        ({"segments": [{"text": 3, "loss": True}]}, "non-empty string"),
        ({"segments": [{"text": "a", "loss": "yes"}]}, "true or false"),
        ({"segments": [{"text": "a", "loss": True}], "prompt": "p"}, 'only "segments"'),
    ],
)
def test_segment_rows_refused_in_one_line(tmp_path, row, match):
    p = tmp_path / "bad.jsonl"
    good = {"segments": [{"text": "a", "loss": True}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=match) as e:
        read_examples(p)
    assert str(e.value).startswith(f"{p}:2: ") and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.add_tokens([f"<a_{i}>" for i in range(6)])
    return t


def test_segment_encoding_masks_the_flagged_segments(tok):
    ex = segment_example([("the fox", False), ("<a_1>", False), ("<a_2>", True), ("<a_3>", True)])
    [(ids, mask)] = encode_examples(tok, [ex], max_len=64)
    pieces = [tok.encode(t, add_special_tokens=False) for t, _ in ex.segments]
    assert ids.tolist() == [t for p in pieces for t in p]
    assert mask.tolist() == [0.0] * (len(pieces[0]) + 1) + [1.0, 1.0]
    with pytest.raises(DataError, match="more than max_len 3; raise data.max_len"):
        encode_examples(tok, [ex], max_len=3)


def test_eval_prompt_is_the_training_form(tok):
    ex = segment_example([("the fox", False), ("<a_1>", False), ("<a_2>", True)])
    [(ids, mask)] = encode_examples(tok, [ex], max_len=64)
    prompt = encode_eval_prompt(tok, ex, chat_template=True)
    n = int(np.flatnonzero(mask)[0])
    assert prompt.tolist() == ids[:n].tolist()  # no chat template, no end token
    target = tok.encode(ex.completion, add_special_tokens=False)
    assert ids[n:].tolist() == target


# --------------------------------------------------------------------------- evaluation


def test_training_targets_count_completions_and_loss_segments():
    rows = [
        segment_example([("H:", False), ("<a_1>", True), ("<a_2>", True)]),
        segment_example([("H:", False), ("<a_2>", False), ("<a_2>", True)]),
    ]
    assert training_targets(rows) == {"<a_1>": 1, "<a_2>": 2}


def _cfg(**eval_kw):
    ev = dict(
        beams=4, k=(1, 2, 4), max_examples=None, max_new_tokens=4, batch_size=4, exact_match=True
    )
    ev.update(eval_kw)
    return SimpleNamespace(
        eval=SimpleNamespace(**ev), data=SimpleNamespace(chat_template=True, max_len=64)
    )


def test_evaluator_sequence_form_and_popularity_on_the_same_users(tok):
    evals = [
        segment_example([("H:", False), ("<a_1>", False), ("<a_2>", True)]),
        segment_example([("H:", False), ("<a_3>", False), ("<a_4>", True)]),
        segment_example([("H:", False), ("<a_4>", False), ("<a_2>", True)]),
    ]
    train = [segment_example([("H:", False), ("<a_0>", False), ("<a_2>", True), ("<a_2>", True)])]
    cands = [f"<a_{i}>" for i in range(5)]
    ev = Evaluator(_cfg(), tok, evals, cands, train, num_tokens=len(tok))
    assert ev.sequence and ev.trie.eos_id is None
    pop = ev.popularity_baseline()
    # <a_2> (2 targets) first, then ties by name: <a_0>, <a_1>, <a_3>, <a_4>
    assert pop["num_eval"] == 3
    assert pop["recall@1"] == pytest.approx(2 / 3)  # users 1 and 3 want <a_2>
    assert pop["recall@4"] == pytest.approx(2 / 3)  # <a_4> is fifth
    ev1 = Evaluator(_cfg(max_examples=1), tok, evals, cands, train, num_tokens=len(tok))
    assert ev1.popularity_baseline()["num_eval"] == 1  # the same users as the model


def test_evaluator_refuses_mixed_and_unflagged_rows(tok):
    from gti_jax.train.data import Example

    mixed = [Example("p", "<a_1>"), segment_example([("H:", False), ("<a_1>", True)])]
    with pytest.raises(DataError, match="mixes prompt/completion rows and sequence rows"):
        Evaluator(_cfg(), tok, mixed, None, [], num_tokens=len(tok))
    bad = [segment_example([("H:", False), ("<a_1>", True), ("<a_2>", False)])]
    with pytest.raises(DataError, match='must have "loss": true'):
        Evaluator(_cfg(), tok, bad, None, [], num_tokens=len(tok))
