"""Reading, encoding and batching prompt/completion data (gti_jax.train.data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gti_jax.train.data import (
    Batcher,
    DataError,
    DataFileNotFoundError,
    Example,
    default_buckets,
    encode_example,
    encode_examples,
    encode_prompt,
    end_of_turn_id,
    read_candidates,
    read_examples,
    target_positions,
    target_width,
)
from tests.helpers.tokenizers import IM_END, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------------------- files


def test_read_examples(tmp_path):
    p = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "a?", "completion": "b"}, {"prompt": "", "completion": "c d"}]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_examples(p) == [Example("a?", "b"), Example("", "c d")]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", ', r"pairs.jsonl:2: malformed JSON"),
        ('{"prompt": "a"}\n', r'pairs.jsonl:1: missing "completion" key'),
        ('{"prompt": 3, "completion": "b"}\n', r'pairs.jsonl:1: "prompt" must be a string'),
        ('["a", "b"]\n', r"pairs.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "a", "completion": ""}\n', r'pairs.jsonl:1: "completion" is empty'),
        ("\n  \n", r"pairs.jsonl: examples file is empty"),
    ],
)
def test_read_examples_errors(tmp_path, text, match):
    p = tmp_path / "pairs.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_examples(p)


def test_read_examples_missing_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="examples file not found"):
        read_examples(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "nope.jsonl")


def test_read_candidates(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("<a_1><b_2>\n\n<a_3> x\n<a_1><b_2>\n")
    assert read_candidates(txt) == ["<a_1><b_2>", "<a_3> x"]
    js = tmp_path / "c.jsonl"
    js.write_text('{"completion": "x"}\n{"completion": "y"}\n{"completion": "x"}\n')
    assert read_candidates(js) == ["x", "y"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"completion": "x"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r'c.jsonl:2: missing "completion" key'):
        read_candidates(bad)
    with pytest.raises(DataError, match="unknown candidates file extension '.csv'"):
        read_candidates(tmp_path / "c.csv")
    with pytest.raises(DataFileNotFoundError):
        read_candidates(tmp_path / "none.txt")


# ---------------------------------------------------------------------------- encoding


def test_encode_example_chat_template(tok):
    ex = Example("Which movie has the title: The Matrix?", "the red bicycle")
    ids, mask = encode_example(tok, ex, max_len=128)
    prompt = encode_prompt(tok, ex.prompt)
    completion = tok.encode(ex.completion, add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert end_of_turn_id(tok) == im_end != tok.eos_token_id
    # The prompt is the user turn of the template followed by the assistant header.
    rendered = tok.decode(prompt)
    assert rendered.startswith("<|im_start|>user\nWhich movie")
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    np.testing.assert_array_equal(ids, np.concatenate([prompt, completion, [im_end]]))
    assert ids.dtype == np.int32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask[: len(prompt)], 0)
    np.testing.assert_array_equal(mask[len(prompt) :], 1)
    # A system message comes first, and training and generation share the prefix.
    ids_s, _ = encode_example(tok, ex, max_len=128, system="Be brief.")
    prompt_s = encode_prompt(tok, ex.prompt, system="Be brief.")
    assert tok.decode(prompt_s).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    np.testing.assert_array_equal(ids_s[: len(prompt_s)], prompt_s)


def test_encode_example_plain(tok):
    ex = Example("hello world", " again")
    for tokenizer, flag in ((tok, False), (tiny_tokenizer(with_chat_template=False), True)):
        ids, mask = encode_example(tokenizer, ex, max_len=64, chat_template=flag)
        p = tokenizer.encode("hello world")
        c = tokenizer.encode(" again", add_special_tokens=False)
        np.testing.assert_array_equal(ids, p + c + [tokenizer.eos_token_id])
        np.testing.assert_array_equal(mask, [0] * len(p) + [1] * (len(c) + 1))


def test_encode_example_truncates_prompt_from_left(tok):
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    ex = Example(long_prompt, "hello again")
    full_prompt = encode_prompt(tok, long_prompt)
    c = tok.encode(ex.completion, add_special_tokens=False) + [end_of_turn_id(tok)]
    ids, mask = encode_example(tok, ex, max_len=20)
    assert len(ids) == 20 and len(full_prompt) + len(c) > 20
    keep = 20 - len(c)
    np.testing.assert_array_equal(ids[:keep], full_prompt[-keep:])
    np.testing.assert_array_equal(ids[keep:], c)
    assert mask.sum() == len(c) and mask[:keep].sum() == 0
    # encode_prompt truncates the same way for generation.
    np.testing.assert_array_equal(encode_prompt(tok, long_prompt, max_len=keep), ids[:keep])


def test_encode_example_completion_too_long(tok):
    ex = Example("hi", "the quick brown fox jumps over the lazy dog")
    n = len(tok.encode(ex.completion, add_special_tokens=False)) + 1
    with pytest.raises(DataError, match=f"completion has {n} tokens.*raise max_len"):
        encode_example(tok, ex, max_len=n)
    assert len(encode_example(tok, ex, max_len=n + 1)[0]) == n + 1
    with pytest.raises(DataError, match="pairs.jsonl example 2"):
        encode_examples(tok, [Example("a", "b"), ex], max_len=n, source="pairs.jsonl")


# ---------------------------------------------------------------------------- batching


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(1, 100, size=n).astype(np.int32)
        mask = (np.arange(n) >= n // 2).astype(np.float32)
        out.append((ids, mask))
    return out


def test_default_buckets():
    assert default_buckets(256) == (64, 96, 128, 192, 256)
    assert default_buckets(300) == (64, 96, 128, 192, 256, 300)
    assert default_buckets(128) == (64, 96, 128) and default_buckets(100) == (64, 96, 100)
    assert default_buckets(10) == (10,)


def test_batcher_is_pure_and_resumable():
    ex = _examples([3, 9, 17, 5, 30, 2, 8, 11, 4, 7])
    a = Batcher(ex, batch_size=4, seed=7, buckets=(8, 16, 32))
    b = Batcher(ex, batch_size=4, seed=7, buckets=(8, 16, 32))
    forward = [a.batch_at(s) for s in range(12)]
    backward = [b.batch_at(s) for s in reversed(range(12))][::-1]
    for x, y in zip(forward, backward, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)
    c = Batcher(ex, batch_size=4, seed=8, buckets=(8, 16, 32))
    assert any(not np.array_equal(a.indices_at(s), c.indices_at(s)) for s in range(3)), (
        "another seed gives another order"
    )


def test_batcher_epochs_cover_every_example():
    ex = _examples(range(1, 13))  # 12 examples, batch 4: 3 steps an epoch
    batcher = Batcher(ex, batch_size=4, seed=1)
    for epoch in range(3):
        seen = np.concatenate([batcher.indices_at(3 * epoch + s) for s in range(3)])
        assert sorted(seen.tolist()) == list(range(12))
    # With 10 examples and batch 4, the stream crosses epochs inside a batch.
    batcher = Batcher(ex[:10], batch_size=4, seed=1)
    stream = np.concatenate([batcher.indices_at(s) for s in range(5)])
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))


def test_batcher_pads_to_smallest_bucket():
    ex = _examples([3, 9, 17, 5])
    batcher = Batcher(ex, batch_size=2, seed=0, buckets=(4, 8, 16, 32))
    for step in range(6):
        idx = batcher.indices_at(step)
        batch = batcher.batch_at(step)
        longest = max(len(ex[i][0]) for i in idx)
        t = batch.input_ids.shape[1]
        assert t == min(b for b in (4, 8, 16, 32) if b >= longest)
        assert batch.input_ids.dtype == np.int32 and batch.loss_mask.dtype == np.float32
        assert batch.attention_mask.dtype == np.int32
        for row, i in enumerate(idx):
            ids, mask = ex[i]
            n = len(ids)
            np.testing.assert_array_equal(batch.input_ids[row, :n], ids)
            np.testing.assert_array_equal(batch.input_ids[row, n:], 0)
            np.testing.assert_array_equal(batch.loss_mask[row, :n], mask)
            np.testing.assert_array_equal(batch.loss_mask[row, n:], 0)
            np.testing.assert_array_equal(batch.attention_mask[row], np.arange(t) < n)
    default = Batcher(ex, batch_size=2, seed=0)
    assert default.buckets == (17,)


def test_batcher_process_slices_cover_global_batch():
    ex = _examples([3, 9, 17, 5, 30, 2, 8, 11, 4, 7, 12, 6])
    glob = Batcher(ex, batch_size=8, seed=3, buckets=(8, 16, 32))
    parts = [
        Batcher(ex, batch_size=8, seed=3, buckets=(8, 16, 32), process_index=i, process_count=4)
        for i in range(4)
    ]
    for step in range(5):
        whole = glob.batch_at(step)
        pieces = [p.batch_at(step) for p in parts]
        assert all(p.input_ids.shape == (2, whole.input_ids.shape[1]) for p in pieces)
        for field in range(4):
            np.testing.assert_array_equal(np.concatenate([p[field] for p in pieces]), whole[field])


def test_batcher_errors():
    ex = _examples([3, 40])
    with pytest.raises(DataError, match="example 1 has 40 tokens, more than the largest bucket 32"):
        Batcher(ex, batch_size=2, seed=0, buckets=(8, 32))
    with pytest.raises(DataError, match="divisible by the number of processes"):
        Batcher(ex, batch_size=3, seed=0, process_count=2)
    with pytest.raises(DataError, match="no examples"):
        Batcher([], batch_size=2, seed=0)
    with pytest.raises(DataError, match="ascending"):
        Batcher(ex, batch_size=2, seed=0, buckets=(64, 32))


def test_batcher_targets_list_every_loss_position_once():
    rng = np.random.default_rng(0)
    ex = []
    for n in (3, 9, 17, 5, 12, 2):
        mask = np.zeros(n, np.float32)
        mask[rng.integers(0, n, size=n // 2 + 1)] = rng.uniform(0.5, 1.0)
        ex.append((np.arange(1, n + 1, dtype=np.int32), mask))
    batcher = Batcher(ex, batch_size=3, seed=0, buckets=(8, 16, 32))
    widths = {}
    for step in range(8):
        batch = batcher.batch_at(step)
        t = batch.input_ids.shape[1]
        width = widths.setdefault(t, batch.targets.shape[1])
        assert batch.targets.shape == (3, width) and batch.targets.dtype == np.int32
        assert width == target_width(batcher.max_targets, t)  # one width per bucket
        for row in range(3):
            want = np.flatnonzero(batch.loss_mask[row, 1:] > 0)
            got = batch.targets[row]
            np.testing.assert_array_equal(got[: len(want)], want)
            assert (got[len(want) :] == -1).all()


def test_target_width_and_errors():
    assert target_width(9, 64) == 16 and target_width(9, 12) == 11 and target_width(3, 2) == 1
    with pytest.raises(DataError, match="row 0 has 3 target tokens, more than the target width 2"):
        target_positions([np.array([0, 1, 1, 1.0])], 4, 2)
    with pytest.raises(DataError, match="row 0: 5 tokens do not fit a batch of length 4"):
        target_positions([np.ones(5)], 4, 8)
