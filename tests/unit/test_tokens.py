"""Tests for gti_jax.vocab.tokens: reading, validating and adding new tokens."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gti_jax.vocab.tokens import (
    TokenEntry,
    TokenError,
    description_token_ids,
    extend_tokenizer,
    num_tokens,
    read_tokens_file,
    validate_new_tokens,
)
from tests.helpers.tokenizers import save_tiny_tokenizer, tiny_tokenizer

SEMANTIC_IDS = [f"<{level}_{i}>" for level in "abc" for i in range(256)]
SAMPLE_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhich item is <a_1><b_2>?<|im_end|>",
    "héllo wörld 日本 <a_12> <a_1>",
]


def _snapshot(tok):
    """Everything a failing call must leave unchanged."""
    return (
        len(tok),
        tok.get_vocab(),
        [tok.encode(t, add_special_tokens=False) for t in SAMPLE_TEXTS],
        tok.backend_tokenizer.to_str(),
    )


@pytest.fixture(params=[True, False], ids=["byte_level", "metaspace"])
def tok(request):
    return tiny_tokenizer(byte_level=request.param)


# ---------------------------------------------------------------- the test tokenizer itself


def test_tiny_tokenizer_is_deterministic_and_small():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert 300 <= len(a) <= 500
    assert a.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert a.eos_token == a.bos_token == a.pad_token == "<|endoftext|>"
    a.add_tokens(["<zz>"])  # a fresh object each call: mutating one leaves the next alone
    assert len(tiny_tokenizer()) == len(b)


def test_tiny_tokenizer_chat_template_and_bos():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer(with_chat_template=False).chat_template is None
    bos = tiny_tokenizer(add_bos=True)
    assert bos.encode("hi") == [0] + bos.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_tiny_tokenizer_roundtrips_text(tok):
    for text in ["the quick brown fox", "héllo wörld 日本", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# ---------------------------------------------------------------- extend_tokenizer


def test_extend_semantic_ids_one_id_each(tok):
    n = len(tok)
    ids = extend_tokenizer(tok, SEMANTIC_IDS)
    assert ids == list(range(n, n + len(SEMANTIC_IDS)))
    assert num_tokens(tok) == len(tok) == n + len(SEMANTIC_IDS)
    for t, i in zip(SEMANTIC_IDS, ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.decode([i]) == t
    # A whole semantic ID in a sentence: its three tokens appear in order, text around intact.
    text = "What is item <a_12><b_7><c_201> called?"
    enc = tok.encode(text, add_special_tokens=False)
    a, b, c = tok.convert_tokens_to_ids(["<a_12>", "<b_7>", "<c_201>"])
    k = enc.index(a)
    assert enc[k : k + 3] == [a, b, c]
    assert tok.decode(enc) == text


def test_extend_prefix_tokens_are_not_confused(tok):
    ids = extend_tokenizer(tok, ["<a_1>", "<a_12>", "<a_123>", "ab", "abc"])
    one, twelve, onetwothree, ab, abc = ids
    assert tok.encode("<a_12>", add_special_tokens=False) == [twelve]
    assert tok.encode("<a_1><a_12><a_123>", add_special_tokens=False) == [one, twelve, onetwothree]
    assert tok.encode("abc", add_special_tokens=False) == [abc]
    assert tok.encode("ab", add_special_tokens=False) == [ab]


def test_extend_unicode_tokens(tok):
    new = ["<日本_1>", "⟨α⟩", "emoji🙂", "<анна>", "<🙂_3>"]
    ids = extend_tokenizer(tok, new)
    for t, i in zip(new, ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.decode([i]) == t
        assert i in tok.encode(f"hello {t} world", add_special_tokens=False)


def test_extend_special_tokens_are_skipped_on_decode(tok):
    (i,) = extend_tokenizer(tok, ["<tool_call>"], special=True)
    assert tok.encode("<tool_call>", add_special_tokens=False) == [i]
    assert "<tool_call>" in tok.all_special_tokens
    enc = tok.encode("hello <tool_call> world", add_special_tokens=False)
    assert "<tool_call>" not in tok.decode(enc, skip_special_tokens=True)
    (j,) = extend_tokenizer(tok, ["<plain>"])
    assert "<plain>" in tok.decode([j], skip_special_tokens=True)


def test_extend_returns_request_order_not_sorted(tok):
    n = len(tok)
    ids = extend_tokenizer(tok, ["<z>", "<a>", "<m>"])
    assert ids == [n, n + 1, n + 2]
    assert tok.convert_ids_to_tokens(ids) == ["<z>", "<a>", "<m>"]


def test_extend_twice_continues_contiguously(tok):
    n = len(tok)
    first = extend_tokenizer(tok, ["<a_0>", "<a_1>"])
    second = extend_tokenizer(tok, ["<b_0>"])
    assert first + second == [n, n + 1, n + 2]


def test_existing_token_rejected_with_hint(tok):
    before = _snapshot(tok)
    with pytest.raises(
        TokenError, match=r"already in the vocabulary.*<\|im_end\|>.*--skip-existing"
    ):
        extend_tokenizer(tok, ["<a_1>", "<|im_end|>"])
    assert _snapshot(tok) == before


def test_existing_base_vocab_token_rejected(tok):
    base = next(t for t, i in tok.get_vocab().items() if i == 10)  # a plain BPE vocab entry
    with pytest.raises(TokenError, match="already in the vocabulary"):
        validate_new_tokens(tok, [base])


def test_skip_existing_drops_known_tokens(tok):
    n = len(tok)
    ids = extend_tokenizer(tok, ["<a_1>", "<|im_end|>", "<a_2>"], skip_existing=True)
    assert ids == [n, n + 1]
    assert tok.convert_tokens_to_ids(["<a_1>", "<a_2>", "<|im_end|>"]) == [n, n + 1, 2]
    # Running again with the same list adds nothing and succeeds.
    assert extend_tokenizer(tok, ["<a_1>", "<a_2>"], skip_existing=True) == []
    assert len(tok) == n + 2


def test_duplicates_rejected(tok):
    before = _snapshot(tok)
    with pytest.raises(TokenError, match=r"more than once: '<a_1>'"):
        extend_tokenizer(tok, ["<a_1>", "<a_2>", "<a_1>"])
    with pytest.raises(TokenError, match="more than once"):
        extend_tokenizer(tok, ["<a_1>", "<a_1>"], skip_existing=True)
    assert _snapshot(tok) == before


@pytest.mark.parametrize("bad", ["", " ", "\t\n", "\u3000"])
def test_empty_or_whitespace_rejected(tok, bad):
    before = _snapshot(tok)
    with pytest.raises(TokenError, match="empty or whitespace-only"):
        extend_tokenizer(tok, ["<a_1>", bad])
    assert _snapshot(tok) == before


@pytest.mark.parametrize("bad", [" <a_1>", "<a_1> ", "<a_1>\n", "\t<a_1>"])
def test_leading_trailing_whitespace_rejected(tok, bad):
    before = _snapshot(tok)
    with pytest.raises(TokenError, match="leading or trailing whitespace"):
        extend_tokenizer(tok, [bad])
    assert _snapshot(tok) == before


def test_inner_whitespace_is_allowed(tok):
    (i,) = extend_tokenizer(tok, ["new york"])
    assert tok.encode("new york", add_special_tokens=False) == [i]
    assert tok.decode([i]) == "new york"


def test_non_string_and_empty_request_rejected(tok):
    with pytest.raises(TokenError, match="must be strings"):
        extend_tokenizer(tok, ["<a_1>", 12])
    with pytest.raises(TokenError, match="no tokens given"):
        extend_tokenizer(tok, [])


def test_token_the_tokenizer_cannot_keep_whole():
    # Each tokenizer's decoder rewrites its own word-boundary marker, so a token containing it
    # does not decode back to itself.
    for byte_level, marker in [(True, "Ġ"), (False, "▁")]:
        tok = tiny_tokenizer(byte_level=byte_level)
        before = _snapshot(tok)
        with pytest.raises(TokenError, match=f"cannot be kept whole.*'{marker}x'"):
            extend_tokenizer(tok, ["<a_1>", f"{marker}x", "<a_2>"])
        assert _snapshot(tok) == before
        with pytest.raises(TokenError, match="cannot be kept whole"):
            validate_new_tokens(tok, [f"{marker}x"])
        assert _snapshot(tok) == before


def test_error_lists_five_then_counts(tok):
    tokens = [f"<a_{i}>" for i in range(8)]
    with pytest.raises(TokenError) as info:
        extend_tokenizer(tok, tokens + tokens)
    msg = str(info.value)
    assert "\n" not in msg
    assert "8 token(s) requested more than once" in msg
    assert "'<a_4>' and 3 more" in msg
    assert "<a_5>" not in msg


def test_atomic_on_late_failure(tok):
    """A bad token at the very end must leave the first 500 good ones un-added."""
    before = _snapshot(tok)
    marker = "Ġ" if "Ġ" in "".join(tok.get_vocab()) else "▁"
    with pytest.raises(TokenError):
        extend_tokenizer(tok, SEMANTIC_IDS[:500] + [f"{marker}bad"])
    assert _snapshot(tok) == before
    assert "<a_1>" not in tok.get_vocab()
    # And it still extends normally afterwards.
    n = len(tok)
    assert extend_tokenizer(tok, ["<a_1>"]) == [n]


def test_validate_does_not_modify(tok):
    before = _snapshot(tok)
    assert validate_new_tokens(tok, SEMANTIC_IDS[:20]) == SEMANTIC_IDS[:20]
    assert _snapshot(tok) == before


def _tokenizer_with_hole() -> PreTrainedTokenizerFast:
    """A tokenizer whose largest id (len + 44) is beyond len(tokenizer): ids have a hole."""
    data = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab[last] = vocab[last] + 45
    backend = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_tokenizer_with_holes_is_rejected():
    tok = _tokenizer_with_hole()
    before = _snapshot(tok)
    with pytest.raises(TokenError, match=r"holes.*largest id is \d+"):
        extend_tokenizer(tok, ["<a_1>"])
    assert _snapshot(tok) == before


def test_roundtrip_after_save_and_reload(tmp_path):
    tok = save_tiny_tokenizer(tmp_path / "base")
    ids = extend_tokenizer(tok, SEMANTIC_IDS[:300] + ["<日本>"])
    tok.save_pretrained(tmp_path / "extended")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "extended")
    assert len(reloaded) == len(tok)
    assert reloaded.convert_tokens_to_ids(SEMANTIC_IDS[:300] + ["<日本>"]) == ids
    for t, i in zip(SEMANTIC_IDS[:300:37] + ["<日本>"], ids[:300:37] + ids[-1:], strict=True):
        assert reloaded.encode(t, add_special_tokens=False) == [i]
        assert reloaded.decode([i]) == t
    for text in SAMPLE_TEXTS:
        assert reloaded.encode(text) == tok.encode(text)
    assert reloaded.chat_template == tok.chat_template
    # Extending the reloaded tokenizer continues the id sequence.
    assert extend_tokenizer(reloaded, ["<d_0>"]) == [len(tok)]


_NAME_CHARS = string.ascii_letters + string.digits + "_-:./#=" + "日本語αβγ🙂"


@settings(max_examples=30, deadline=None)
@given(
    names=st.lists(
        st.text(alphabet=_NAME_CHARS, min_size=1, max_size=8), min_size=1, max_size=12, unique=True
    ),
    byte_level=st.booleans(),
)
def test_property_bracketed_tokens_roundtrip(names, byte_level):
    tok = tiny_tokenizer(byte_level=byte_level)
    new = [f"<{name}>" for name in names]
    assume(not set(new) & set(tok.get_vocab()))  # e.g. "<0x41>" is a byte-fallback token
    n = len(tok)
    ids = extend_tokenizer(tok, new)
    assert ids == list(range(n, n + len(new)))
    for t, i in zip(new, ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.decode([i]) == t
    joined = "x" + " ".join(new) + "."
    enc = tok.encode(joined, add_special_tokens=False)
    assert [i for i in enc if i >= n] == ids
    assert tok.decode(enc) == joined


@settings(max_examples=40, deadline=None)
@given(
    token=st.text(min_size=0, max_size=6),
    byte_level=st.booleans(),
)
def test_property_any_token_is_rejected_or_kept_whole(token, byte_level):
    tok = tiny_tokenizer(byte_level=byte_level)
    before = _snapshot(tok)
    try:
        ids = extend_tokenizer(tok, ["<a_1>", token])
    except TokenError as e:
        assert "\n" not in str(e)
        assert _snapshot(tok) == before
        return
    for t, i in zip(["<a_1>", token], ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.decode([i]) == t


def test_latin1_letters_rejected_by_byte_level_only():
    with pytest.raises(TokenError, match=r"cannot be kept whole.*'<café>'.*Latin-1"):
        extend_tokenizer(tiny_tokenizer(byte_level=True), ["<café>"])
    tok = tiny_tokenizer(byte_level=False)
    (i,) = extend_tokenizer(tok, ["<café>"])
    assert tok.decode([i]) == "<café>"


# ---------------------------------------------------------------- read_tokens_file


def test_read_jsonl(tmp_path):
    p = tmp_path / "tokens.jsonl"
    p.write_text(
        '{"token": "<a_1>", "description": "a red bicycle"}\n'
        "\n"
        '{"token": "<a_12>"}\n'
        '{"token": "<日本>", "description": null, "extra": 3}\n'
        "   \n",
        encoding="utf-8",
    )
    assert read_tokens_file(p) == [
        TokenEntry("<a_1>", "a red bicycle"),
        TokenEntry("<a_12>"),
        TokenEntry("<日本>", None),
    ]
    assert read_tokens_file(str(p))[0].token == "<a_1>"


def test_read_txt(tmp_path):
    p = tmp_path / "tokens.txt"
    p.write_text("<a_1>\r\n<a_12>\n\n<日本>", encoding="utf-8")
    assert read_tokens_file(p) == [TokenEntry("<a_1>"), TokenEntry("<a_12>"), TokenEntry("<日本>")]


def test_read_then_extend(tmp_path):
    p = tmp_path / "tokens.jsonl"
    p.write_text("\n".join(json.dumps({"token": t}) for t in SEMANTIC_IDS[:10]))
    tok = tiny_tokenizer()
    n = len(tok)
    entries = read_tokens_file(p)
    assert extend_tokenizer(tok, [e.token for e in entries]) == list(range(n, n + 10))


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: tokens file not found"):
        read_tokens_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"token": "<a_1>"}\n{"token": "<a_2>"\n', r":2: malformed JSON"),
        ('{"token": "<a_1>"}\n\n{"description": "x"}\n', r':3: missing "token" key'),
        ('{"token": 12}\n', r':1: "token" must be a string, got int'),
        ('{"token": null}\n', r':1: "token" must be a string, got NoneType'),
        ('["<a_1>"]\n', r":1: expected a JSON object, got list"),
        ('{"token": "<a_1>", "description": 5}\n', r':1: "description" must be a string'),
        ("", r"no tokens found"),
        ("\n  \n\n", r"no tokens found"),
    ],
)
def test_read_malformed_jsonl(tmp_path, content, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(TokenError, match=pattern) as info:
        read_tokens_file(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(p) in msg
    assert ";" in msg  # problem; fix


def test_read_txt_whitespace_and_empty(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("<a_1>\n<a_2> \n", encoding="utf-8")
    with pytest.raises(TokenError, match=r"bad\.txt:2: token '<a_2> ' has leading or trailing"):
        read_tokens_file(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(TokenError, match="no tokens found"):
        read_tokens_file(p)


def test_read_unknown_extension(tmp_path):
    p = tmp_path / "tokens.csv"
    p.write_text("<a_1>\n")
    with pytest.raises(TokenError, match=r"unknown tokens file extension '\.csv'.*\.jsonl.*\.txt"):
        read_tokens_file(p)


# ---------------------------------------------------------------- description_token_ids


def test_description_ids_have_no_special_tokens():
    tok = tiny_tokenizer(add_bos=True)
    assert tok.encode("a red bicycle")[0] == tok.bos_token_id  # the tokenizer does add BOS
    out = description_token_ids(tok, ["a red bicycle", "The Matrix (1999)"])
    assert out == [
        tok.encode("a red bicycle", add_special_tokens=False),
        tok.encode("The Matrix (1999)", add_special_tokens=False),
    ]
    assert all(tok.bos_token_id not in ids for ids in out)
    assert tok.decode(out[1]) == "The Matrix (1999)"
    assert all(isinstance(i, int) for ids in out for i in ids)


def test_description_ids_see_new_tokens():
    tok = tiny_tokenizer()
    (i,) = extend_tokenizer(tok, ["<a_1>"])
    (ids,) = description_token_ids(tok, ["like <a_1> but blue"])
    assert i in ids


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_description_missing_names_tokens(bad):
    tok = tiny_tokenizer()
    with pytest.raises(TokenError, match=r"'<a_2>'.*`description` initializer needs a desc"):
        description_token_ids(tok, ["ok", bad, "fine"], tokens=["<a_1>", "<a_2>", "<a_3>"])
    with pytest.raises(TokenError, match=r"1 token\(s\).*'#1'"):
        description_token_ids(tok, ["ok", bad])


def test_description_length_mismatch():
    with pytest.raises(TokenError, match="2 tokens but 1 descriptions"):
        description_token_ids(tiny_tokenizer(), ["x"], tokens=["<a>", "<b>"])


# ---------------------------------------------------------------- batched checks


def _broken_one_by_one(tok, tokens, ids):
    """The per-token checks the batched `_broken_tokens` replaced (one call per token)."""
    broken = []
    for t, i in zip(tokens, ids, strict=True):
        whole = tok.encode(t, add_special_tokens=False) == [i]
        back = tok.decode([i]) == t
        in_context = i in tok.encode(f"hello {t} world", add_special_tokens=False)
        if not (whole and back and in_context):
            broken.append(t)
    return broken


@pytest.mark.parametrize("backend", [True, False], ids=["backend_calls", "transformers_calls"])
def test_batched_checks_find_what_per_token_checks_find(tok, backend):
    """A mixed list (good names, word-boundary markers, Latin-1, CJK, inner spaces and
    punctuation, a token that is a prefix of another): the batched check flags exactly the
    tokens the per-token check flags. With clean_up_tokenization_spaces set and truncation
    configured on the backend, the batched check must take transformers' own calls
    (`tokenizer(list)`, per-id `decode`), and the same must hold there."""
    from gti_jax.vocab.tokens import _add, _broken_tokens

    if not backend:
        tok.clean_up_tokenization_spaces = True
        tok.backend_tokenizer.enable_truncation(64)
    mixed = SEMANTIC_IDS[:40] + ["<a_1", "Ġx", "▁y", "<café>", "<日本>", "a .", "x's", "<a_1>>"]
    mixed += ["hello", "Ġ", "é", "<b>ĠGood", "z ▁ z", "<c_9>!"]
    mixed = [t for t in dict.fromkeys(mixed) if t not in tok.get_vocab()]
    _add(tok, mixed, special=False)
    ids = tok.convert_tokens_to_ids(mixed)
    batched = _broken_tokens(tok, mixed, ids)  # first: transformers' encode resets truncation
    expected = _broken_one_by_one(tok, mixed, ids)
    assert 0 < len(expected) < len(mixed)  # the list really is mixed for both tokenizers
    assert batched == expected


def test_extended_copy_leaves_the_original_and_matches_extend_tokenizer(tok):
    from gti_jax.vocab.tokens import extended_copy

    before = _snapshot(tok)
    new, added, ids = extended_copy(tok, ["<|im_end|>", *SEMANTIC_IDS[:50]], skip_existing=True)
    assert _snapshot(tok) == before
    assert added == SEMANTIC_IDS[:50]
    assert extend_tokenizer(tok, SEMANTIC_IDS[:50]) == ids
    assert _snapshot(new) == _snapshot(tok)
    assert extended_copy(tok, ["<a_1>"], skip_existing=True) == (None, [], [])
    with pytest.raises(TokenError, match="cannot be kept whole"):
        extended_copy(tok, ["<z_1>", "<café>", "Ġx", "▁x"])
