"""`gti_jax.vocab.tokenizer_dir`: extending a tokenizer with the `tokenizers` library alone
must give what the transformers path gives.

Each case opens one tokenizer directory both ways (`open_tokenizer_dir` and
`AutoTokenizer.from_pretrained`), runs the same checks and additions on each
(`extended_copy`), saves each, and loads both saved directories with `AutoTokenizer`: the two
must be the same tokenizer (size, vocabulary, added tokens, special tokens, the encoding and
decoding of a corpus that mixes text, special and new tokens, the chat template's output).
"""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from gti_jax.vocab.tokenizer_dir import TokenizerDir, open_tokenizer_dir
from gti_jax.vocab.tokens import TokenError, extended_copy
from tests.helpers.tokenizers import _CORPUS, save_tiny_tokenizer

NEW = [f"<a_{i}>" for i in range(40)] + [f"<|sid_{c}_{i}|>" for c in "xyz" for i in range(20)]


def _texts(new):
    return [
        *_CORPUS,
        "",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n and unicode: café, naïve, 日本語, emoji 🙂",
        "<|im_start|>user\nhello<|im_end|>",
        "digits 0123456789 and <|endoftext|> inside",
        f"{new[0]}{new[1]} {new[2]}  {new[-1]}",
        f"the movie {new[3]}{new[4]}{new[5]} is a comedy",
        f"half-tokens <a_ and _1> and {new[6][:-1]}",
    ]


@pytest.fixture(scope="module", params=["byte_level", "metaspace_bos"])
def tok_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        save_tiny_tokenizer(d)
    else:
        save_tiny_tokenizer(d, byte_level=False, add_bos=True)
    return d


def _same_tokenizer(a, b, new):
    """Asserts two transformers tokenizers behave alike on what gti_jax and users call."""
    assert len(a) == len(b)
    assert a.get_vocab() == b.get_vocab()
    assert {i: repr(t) for i, t in a.added_tokens_decoder.items()} == {
        i: repr(t) for i, t in b.added_tokens_decoder.items()
    }
    assert a.all_special_tokens == b.all_special_tokens
    for text in _texts(new):
        for special in (False, True):
            ids = a.encode(text, add_special_tokens=special)
            assert ids == b.encode(text, add_special_tokens=special), (text, special)
            for skip in (False, True):
                assert a.decode(ids, skip_special_tokens=skip) == b.decode(
                    ids, skip_special_tokens=skip
                )
    chat = [{"role": "user", "content": f"items {new[0]} {new[-1]}"}]
    assert a.apply_chat_template(chat, tokenize=False) == b.apply_chat_template(
        chat, tokenize=False
    )


def test_opens_as_transformers_loads_it(tok_dir):
    light, why = open_tokenizer_dir(tok_dir)
    assert why == ""
    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(light) == len(ref)
    assert light.get_vocab() == ref.get_vocab()
    for text in _texts(NEW):
        for special in (False, True):
            ids = ref.encode(text, add_special_tokens=special)
            assert light.encode(text, add_special_tokens=special) == ids
            assert light.decode(ids) == ref.decode(ids)


def test_extension_saves_the_tokenizer_transformers_saves(tok_dir, tmp_path):
    light, _ = open_tokenizer_dir(tok_dir)
    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    n = len(ref)
    ext_light, added, ids = extended_copy(light, NEW)
    ext_ref, added_ref, ids_ref = extended_copy(ref, NEW)
    assert (added, ids) == (added_ref, ids_ref) == (NEW, list(range(n, n + len(NEW))))
    assert len(light) == n  # the opened tokenizer is unchanged; the copy was extended
    # the light copy is saved into a copy of the source directory (gti_jax.extend carries
    # every non-weight file over, then saves the tokenizer on top); transformers saves anew
    shutil.copytree(tok_dir, tmp_path / "light")
    ext_light.save_pretrained(tmp_path / "light")
    ext_ref.save_pretrained(tmp_path / "ref")
    a = AutoTokenizer.from_pretrained(str(tmp_path / "light"))
    b = AutoTokenizer.from_pretrained(str(tmp_path / "ref"))
    _same_tokenizer(a, b, NEW)
    for i, t in enumerate(NEW):
        assert a.encode(t, add_special_tokens=False) == [n + i]


@pytest.mark.parametrize("bad", [["<ok_1>", "Ġx"], ["é"], ["<ok_2>", "<ok_2>"], ["<|im_end|>"]])
def test_rejects_what_the_transformers_path_rejects(tok_dir, bad):
    light, _ = open_tokenizer_dir(tok_dir)
    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    outcomes = []
    for tok in (light, ref):
        try:
            outcomes.append(("ok", extended_copy(tok, bad)[1:]))
        except TokenError as e:
            outcomes.append(("error", str(e)))
    assert outcomes[0] == outcomes[1]
    # 'Ġ' and 'é' are rewritten by byte-level BPE's decoder only; a Metaspace tokenizer keeps
    # them whole. The repeated and the existing token are errors everywhere.
    byte_level = tok_dir.name.startswith("byte_level")
    assert outcomes[0][0] == ("error" if byte_level or bad[0] in ("<ok_2>", "<|im_end|>") else "ok")


def _edit(src, dst, config=None, backend=None):
    shutil.copytree(src, dst)
    if config is not None:
        path = dst / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        config(cfg)
        path.write_text(json.dumps(cfg))
    if backend is not None:
        path = dst / "tokenizer.json"
        data = json.loads(path.read_text())
        backend(data)
        path.write_text(json.dumps(data))
    return dst


_TRUNCATION = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}


@pytest.mark.parametrize(
    "config, backend, reason",
    [
        (lambda c: c.update(tokenizer_class="GPT2Tokenizer"), None, "has its own pipeline"),
        (lambda c: c.update(auto_map={"AutoTokenizer": ["x.T", None]}), None, "auto_map"),
        (lambda c: c.update(clean_up_tokenization_spaces=True), None, "clean_up"),
        (lambda c: c.update(eos_token="<|not_there|>"), None, "'<|not_there|>' is not in"),
        (
            lambda c: c.update(added_tokens_decoder={"5": {"content": "<|im_end|>"}}),
            None,
            "added_tokens_decoder entry 5",
        ),
        (
            lambda c: c.update(extra_special_tokens={"image_token": "<image>"}),
            None,
            "'<image>' is not in",
        ),
        (None, lambda d: d.update(truncation=_TRUNCATION), "truncation or padding"),
        (None, lambda d: d.update(model={"type": "nonsense"}), "cannot read it"),
    ],
)
def test_declines_directories_it_cannot_mirror(tok_dir, tmp_path, config, backend, reason):
    d = _edit(tok_dir, tmp_path / "t", config, backend)
    tok, why = open_tokenizer_dir(d)
    assert tok is None and reason in why


def test_declines_a_directory_without_the_two_files(tmp_path):
    assert open_tokenizer_dir(tmp_path) == (None, "no tokenizer.json or tokenizer_config.json")


def test_a_copy_is_independent(tok_dir):
    import copy

    light, _ = open_tokenizer_dir(tok_dir)
    twin = copy.deepcopy(light)
    assert isinstance(twin, TokenizerDir)
    twin.add_tokens(["<only_in_twin>"])
    assert len(twin) == len(light) + 1 and "<only_in_twin>" not in light.get_vocab()


@pytest.mark.slow
def test_smollm2_extension_saves_the_tokenizer_transformers_saves(smollm2_gguf, tmp_path):
    """The real tokenizer the extend benchmark uses (SmolLM2's byte-level BPE, 49,152 tokens,
    saved as gti_jax.models.export_hf_dir saves it)."""
    src = tmp_path / "src"
    smollm2_gguf[2].save_pretrained(str(src))
    light, why = open_tokenizer_dir(src)
    assert why == ""
    ref = AutoTokenizer.from_pretrained(str(src))
    new = NEW + [f"<x_{i}>" for i in range(2000)]
    ext_light, added, ids = extended_copy(light, new)
    ext_ref, added_ref, ids_ref = extended_copy(ref, new)
    assert (added, ids) == (added_ref, ids_ref)
    shutil.copytree(src, tmp_path / "light")
    ext_light.save_pretrained(tmp_path / "light")
    ext_ref.save_pretrained(tmp_path / "ref")
    _same_tokenizer(
        AutoTokenizer.from_pretrained(str(tmp_path / "light")),
        AutoTokenizer.from_pretrained(str(tmp_path / "ref")),
        new,
    )


def test_named_extra_special_tokens_are_looked_up_by_value(tok_dir, tmp_path):
    d = _edit(tok_dir, tmp_path / "t", lambda c: c.update(extra_special_tokens={"x": "<|im_end|>"}))
    assert open_tokenizer_dir(d)[1] == ""


def test_special_tokens_are_left_to_transformers(tok_dir):
    light, _ = open_tokenizer_dir(tok_dir)
    with pytest.raises(TokenError, match="load it with transformers.AutoTokenizer"):
        extended_copy(light, ["<s_1>"], special=True)
    assert "<s_1>" not in light.get_vocab()
