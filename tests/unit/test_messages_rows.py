"""Chat rows ({"messages": [...]}) in the trainer's JSONL: read, rendered with the
tokenizer's chat template, the loss on exactly the assistant turns (tiny ChatML tokenizer)."""

import json

import numpy as np
import pytest

from gti_jax.train.data import (
    DataError,
    Example,
    encode_eval_prompt,
    encode_example,
    encode_examples,
    read_examples,
)
from tests.helpers.tokenizers import IM_END, tiny_tokenizer

TURNS = [
    {"role": "system", "content": "You recommend fruit."},
    {"role": "user", "content": "the red apple"},
    {"role": "assistant", "content": "the green pear"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "the blue berry"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rows(tmp_path, *rows):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_read(tmp_path):
    (ex,) = read_examples(_rows(tmp_path, {"messages": TURNS}))
    assert ex.completion == "the blue berry" and ex.prompt == "and then"
    assert ex.messages[0] == ("system", "You recommend fruit.") and ex.segments is None


def test_mask_is_exactly_the_assistant_turns(tok, tmp_path):
    (ex,) = read_examples(_rows(tmp_path, {"messages": TURNS}))
    ids, mask = encode_example(tok, ex, max_len=200)
    end = tok.convert_tokens_to_ids(IM_END)
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    # the learned tokens, in order: each assistant content and its end-of-turn token
    assert ids[mask == 1].tolist() == enc("the green pear") + [end] + enc("the blue berry") + [end]
    # every token is the template's rendering (nothing added, nothing lost but the last "\n")
    full = tok.apply_chat_template(TURNS, tokenize=False)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == full.rstrip("\n")
    # the learned tokens are where the assistant turns are: two runs, each right after its
    # turn's header "<|im_start|>assistant\n"
    head1 = tok.apply_chat_template(TURNS[:2], tokenize=False, add_generation_prompt=True)
    n1 = len(tok.encode(head1, add_special_tokens=False))
    k1 = len(enc("the green pear")) + 1
    assert mask[:n1].sum() == 0 and mask[n1 : n1 + k1].all()
    head2 = tok.apply_chat_template(TURNS[:4], tokenize=False, add_generation_prompt=True)
    n2 = len(tok.encode(head2, add_special_tokens=False))
    assert mask[n1 + k1 : n2].sum() == 0 and mask[n2:].all() and n2 > n1 + k1
    assert ids.dtype == np.int32 and mask.dtype == np.float32


def test_one_turn_equals_prompt_completion(tok):
    chat = Example(
        "the red apple",
        "the green pear",
        messages=(("user", "the red apple"), ("assistant", "the green pear")),
    )
    plain = Example("the red apple", "the green pear")
    (a_ids, a_mask), (b_ids, b_mask) = encode_examples(tok, [chat, plain], max_len=64)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_mask, b_mask)
    np.testing.assert_array_equal(encode_eval_prompt(tok, chat), encode_eval_prompt(tok, plain))


def test_eval_prompt_asks_for_the_last_assistant_turn(tok):
    chat = Example(
        "and then", "the blue berry", messages=tuple((m["role"], m["content"]) for m in TURNS)
    )
    want = tok.apply_chat_template(TURNS[:-1], tokenize=False, add_generation_prompt=True)
    assert encode_eval_prompt(tok, chat).tolist() == tok.encode(want, add_special_tokens=False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": TURNS[:-1]}, "last message must be a non-empty assistant turn"),
        ({"messages": [TURNS[1]]}, "at least two turns"),
        ({"messages": [TURNS[1], {"role": "assistant"}]}, 'message 2 must have exactly "role"'),
        ({"messages": TURNS, "prompt": "x"}, 'only "messages", got also prompt'),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    p = _rows(tmp_path, {"prompt": "a", "completion": "b"}, row)
    with pytest.raises(DataError, match=message) as e:
        read_examples(p)
    assert str(e.value).startswith(f"{p}:2: ")


def test_needs_a_template(tmp_path):
    (ex,) = read_examples(_rows(tmp_path, {"messages": TURNS}))
    with pytest.raises(DataError, match="rendered with the tokenizer's chat template"):
        encode_example(tiny_tokenizer(with_chat_template=False), ex, max_len=200)
    with pytest.raises(DataError, match="more than max_len 8"):
        encode_example(tiny_tokenizer(), ex, max_len=8)
