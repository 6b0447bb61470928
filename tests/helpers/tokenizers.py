"""A tiny, deterministic Hugging Face tokenizer built offline for tests.

The tokenizer is a small BPE trained in memory on a few English sentences with the
`tokenizers` library, wrapped in `transformers.PreTrainedTokenizerFast`. It needs no network
and no files, takes a few milliseconds after the first call, and is the same on every call, so
tests can pin ids. Tiny HF models built in tests use `vocab_size = len(tokenizer)` (or more).

Special tokens: `<|endoftext|>` (bos, eos and pad; id 0), `<|im_start|>` (id 1) and
`<|im_end|>` (id 2). With `with_chat_template=True` the tokenizer carries a ChatML template.

Example:
    >>> tok = tiny_tokenizer()
    >>> tok.decode(tok.encode("the quick brown fox"))
    'the quick brown fox'
"""

from __future__ import annotations

import functools
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)

# The target size of the trained vocabulary (specials + alphabet + merges); the trainer stops
# early when the corpus has no more pairs to merge.
_VOCAB_SIZE = 420

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A language model reads text one token at a time and predicts the next token.",
    "New tokens start with embeddings that the model has never seen before.",
    "Which movie has the title: The Matrix? It is a science fiction film from 1999.",
    "What is item number twelve called? It is called the red bicycle.",
    "Hello world, hello again, and hello to everyone reading this sentence.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
    "Users who watched this film also enjoyed comedies, dramas and thrillers.",
    "The weather today is sunny with a light breeze from the west.",
    "Grounded token initialization trains only the new rows of the embedding table.",
    "Recommendation systems suggest items that a person is likely to enjoy.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text too.",
)


@functools.cache
def _backend_json(byte_level: bool) -> str:
    """Trains the backend tokenizer once per flavour and returns its JSON serialization."""
    if byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        # SentencePiece-like (Llama-2 style): spaces become "▁", unknown characters fall back
        # to byte tokens "<0x00>".."<0xFF>".
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted({c for line in _CORPUS for c in line.replace(" ", "▁")} | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    if not byte_level:
        trained = json.loads(backend.to_str())["model"]
        vocab = dict(trained["vocab"])
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        merges = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]
        ]
        backend.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True)
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    return backend.to_str()


def tiny_tokenizer(
    *, byte_level: bool = True, with_chat_template: bool = True, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """Builds a fresh tiny tokenizer (about 400 tokens for `byte_level`, 600 otherwise).

    Args:
        byte_level: True for a GPT-2/Qwen/SmolLM2-style byte-level BPE; False for a
            SentencePiece-like (Llama-2 style) BPE with "▁" word starts and byte fallback.
        with_chat_template: attach a ChatML chat template.
        add_bos: prepend `<|endoftext|>` when encoding with `add_special_tokens=True`
            (Llama-style); off by default (SmolLM2/Qwen-style).

    Returns:
        A new `PreTrainedTokenizerFast` each call (callers may mutate it freely).

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        [0, 1, 2]
    """
    backend = Tokenizer.from_str(_backend_json(byte_level))
    kwargs = {}
    if add_bos:
        kwargs["add_bos_token"] = True
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        **kwargs,
    )
    if with_chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def save_tiny_tokenizer(
    directory: str | os.PathLike[str],
    *,
    byte_level: bool = True,
    with_chat_template: bool = True,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """Saves a tiny tokenizer with `save_pretrained` and returns it.

    `AutoTokenizer.from_pretrained(directory)` reloads it offline.

    Args:
        directory: where to write (created if missing).
        byte_level: see `tiny_tokenizer`.
        with_chat_template: see `tiny_tokenizer`.
        add_bos: see `tiny_tokenizer`.

    Returns:
        The saved tokenizer.

    Example:
        >>> import tempfile
        >>> from transformers import AutoTokenizer
        >>> d = tempfile.mkdtemp()
        >>> tok = save_tiny_tokenizer(d)
        >>> len(AutoTokenizer.from_pretrained(d)) == len(tok)
        True
    """
    tok = tiny_tokenizer(
        byte_level=byte_level, with_chat_template=with_chat_template, add_bos=add_bos
    )
    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(directory)
    return tok
