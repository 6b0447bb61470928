"""Prompt/completion data for grounding and fine-tuning: reading, encoding, batching.

Files (user-facing formats, see the README):

* examples (pairs, sft, eval): JSONL, one ``{"prompt": "...", "completion": "..."}`` a line,
  or one ``{"segments": [{"text": "...", "loss": false}, {"text": "...", "loss": true}, ...]}``
  a line (a sequence row: the texts are concatenated as they are, no chat template, and the
  loss is on the segments flagged ``true``; one forward pass trains every flagged segment);
* or one ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant",
  "content": "..."}, ...]}`` a line (a chat row: rendered whole with the tokenizer's chat
  template, the loss on every assistant turn's content and its end-of-turn token; evaluation
  asks for the last assistant turn);
* candidates (valid completions for constrained decoding): ``.txt`` with one completion a line,
  or JSONL with one ``{"completion": "..."}`` a line.

Encoding (:func:`encode_example`) renders the prompt as a user turn of the tokenizer's chat
template (ending with the assistant header, exactly as :func:`encode_prompt` does for
generation) and appends the completion and the end-of-turn token. The loss mask is 1 on the
completion tokens and the end token only, so the model learns to produce the completion and to
stop, never to reproduce the prompt.

Batching (:class:`Batcher`) is a pure function of ``(seed, step)``: resuming a run needs only
the step number. Each batch is right-padded to the smallest length bucket that fits its longest
example, so a jitted step compiles once per bucket, not once per length.

Example:
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> ex = Example("Which city is the capital of France?", "<paris>")
    >>> ids, mask = encode_example(tokenizer, ex, max_len=64)  # doctest: +SKIP
    >>> batcher = Batcher([(ids, mask)] * 8, batch_size=4, seed=0)  # doctest: +SKIP
    >>> batcher.batch_at(0).input_ids.shape  # doctest: +SKIP
    (4, 64)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from gti_jax.errors import BadInput
from gti_jax.io.text import read_utf8_lines

__all__ = [
    "Batch",
    "Batcher",
    "DataError",
    "DataFileNotFoundError",
    "Example",
    "default_buckets",
    "encode_example",
    "encode_examples",
    "encode_eval_prompt",
    "encode_prompt",
    "end_of_turn_id",
    "read_candidates",
    "read_examples",
    "segment_example",
    "special_prefix",
    "target_positions",
    "target_width",
]

Encoded = tuple[np.ndarray, np.ndarray]


class DataError(BadInput):
    """A bad data file or example; the message names the file/line, the problem and the fix."""


class DataFileNotFoundError(FileNotFoundError, DataError):
    """A data file does not exist."""


class Example(NamedTuple):
    """One training or evaluation example.

    Attributes:
        prompt: the input text (may contain new tokens, e.g. ``"What is <a_1><b_7>?"``).
        completion: the target text the model learns to produce.
        segments: for a sequence row (:func:`segment_example`), its ``(text, loss)`` pairs;
            then `prompt` is the text of every segment but the last and `completion` the last
            one (what evaluation asks the model to produce). None for a prompt/completion row.
        messages: for a chat row, its ``(role, content)`` turns, the last one the
            assistant's; then `prompt` is the turn before it and `completion` its content.
    """

    prompt: str
    completion: str
    segments: tuple[tuple[str, bool], ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def num_targets(self) -> int:
        """How many targets one pass over the example trains: 1, or its loss segments."""
        return 1 if self.segments is None else sum(1 for _, loss in self.segments if loss)


def segment_example(segments: Sequence[tuple[str, bool]]) -> Example:
    """A sequence row from ``(text, loss)`` pairs (at least one with ``loss`` true).

    Example:
        >>> ex = segment_example([("History:", False), ("<a_1>", False), ("<a_2>", True)])
        >>> ex.prompt, ex.completion, ex.num_targets
        ('History:<a_1>', '<a_2>', 1)
    """
    segs = tuple((str(t), bool(loss)) for t, loss in segments)
    if not any(loss for _, loss in segs):
        raise DataError("a sequence row needs at least one segment with loss true")
    return Example("".join(t for t, _ in segs[:-1]), segs[-1][0], segs)


class Batch(NamedTuple):
    """A padded batch (a pytree of arrays, usable as a jit argument).

    Attributes:
        input_ids: ``[B, T]`` int32 token ids, right-padded.
        loss_mask: ``[B, T]`` float32; 1 where the token is a target (a completion token or
            the end token). Position ``t`` is predicted from positions ``< t``.
        attention_mask: ``[B, T]`` int32; 1 for real tokens, 0 for padding.
        targets: optional ``[B, L]`` int32: in each row, the positions ``t`` whose next token
            ``t + 1`` is a target, padded with -1 (:func:`target_positions`). With it the
            loss computes logits at those ``L`` positions only instead of all ``T`` (the
            vocabulary projection is the largest matmul of a small model); without it, at
            every position. The loss is the same either way.
    """

    input_ids: Any
    loss_mask: Any
    attention_mask: Any
    targets: Any = None


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def _read_lines(path: str | os.PathLike[str], what: str) -> tuple[str, list[str]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"{path}: {what} file not found; check the path")
    lines = read_utf8_lines(path, what)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: {what} file is empty; add one example a line")
    return path, lines


def _json_object(path: str, lineno: int, line: str, fix: str) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}); write one {fix} a line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; write {fix}")
    return obj


def _string_field(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f'{where}: missing "{key}" key; add "{key}": "..."')
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(
            f'{where}: "{key}" must be a string, got {type(value).__name__}; write it as text'
        )
    return value


def _segment_row(obj: dict[str, Any], where: str) -> Example:
    fix = '{"segments": [{"text": "...", "loss": false}, {"text": "...", "loss": true}]}'
    extra = sorted(set(obj) - {"segments"})
    if extra:
        raise DataError(
            f'{where}: a sequence row has only "segments", got also {", ".join(extra)}; '
            f"write {fix}, or a prompt/completion row without segments"
        )
    segs = obj["segments"]
    if not isinstance(segs, list) or not segs:
        raise DataError(f'{where}: "segments" must be a non-empty list; write {fix}')
    out = []
    for i, seg in enumerate(segs):
        at = f"{where}: segment {i + 1}"
        if not isinstance(seg, dict) or set(seg) != {"text", "loss"}:
            raise DataError(f'{at} must be an object with exactly "text" and "loss"; write {fix}')
        if not isinstance(seg["text"], str) or not seg["text"]:
            raise DataError(f'{at}: "text" must be a non-empty string')
        if not isinstance(seg["loss"], bool):
            raise DataError(f'{at}: "loss" must be true or false, got {seg["loss"]!r}')
        out.append((seg["text"], seg["loss"]))
    if not any(loss for _, loss in out):
        raise DataError(f'{where}: no segment has "loss": true; flag the segments to learn')
    return segment_example(out)


def _messages_row(obj: dict[str, Any], where: str) -> Example:
    fix = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}'
    extra = sorted(set(obj) - {"messages"})
    if extra:
        raise DataError(f'{where}: a chat row has only "messages", got also {", ".join(extra)}')
    msgs = obj["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(f'{where}: "messages" must list at least two turns; write {fix}')
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f'{where}: message {i + 1} must have exactly "role" and "content"')
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise DataError(f'{where}: message {i + 1}: "role" and "content" must be strings')
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant" or not turns[-1][1]:
        raise DataError(
            f"{where}: the last message must be a non-empty assistant turn (what is learned and "
            "what evaluation asks for)"
        )
    return Example(turns[-2][1], turns[-1][1], messages=tuple(turns))


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Reads a JSONL file of prompt/completion or sequence rows (blank lines skipped).

    A line is ``{"prompt": ..., "completion": ...}``, ``{"segments": [{"text": ...,
    "loss": ...}, ...]}`` with at least one ``"loss": true`` (:func:`segment_example`), or
    ``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with an assistant turn.

    Args:
        path: the file.

    Returns:
        The examples in file order.

    Raises:
        DataFileNotFoundError: no file at `path`.
        DataError: an empty file or a malformed line (``file:line: problem; fix``), or an
            empty completion.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
        >>> _ = p.write_text('{"prompt": "Capital of France?", "completion": "<paris>"}\\n')
        >>> read_examples(p)
        [Example(prompt='Capital of France?', completion='<paris>', segments=None, messages=None)]
        >>> _ = p.write_text('{"segments": [{"text": "Seen:", "loss": false}, '
        ...                  '{"text": "<a_1>", "loss": false}, {"text": "<a_2>", "loss": true}]}\\n')
        >>> read_examples(p)[0].completion, read_examples(p)[0].num_targets
        ('<a_2>', 1)
    """
    path, lines = _read_lines(path, "examples")
    fix = '{"prompt": "...", "completion": "..."} or {"segments": [...]} object'
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        obj = _json_object(path, lineno, line, fix)
        where = f"{path}:{lineno}"
        if "segments" in obj:
            out.append(_segment_row(obj, where))
            continue
        if "messages" in obj:
            out.append(_messages_row(obj, where))
            continue
        prompt = _string_field(obj, "prompt", where)
        completion = _string_field(obj, "completion", where)
        if not completion:
            raise DataError(f'{where}: "completion" is empty; give the text to learn')
        out.append(Example(prompt, completion))
    return out


def read_candidates(path: str | os.PathLike[str]) -> list[str]:
    """Reads valid completions: ``.txt`` one a line, or ``.jsonl`` with ``{"completion": ...}``.

    Blank lines are skipped; ``.txt`` lines are taken as written (only the line break is
    removed). Duplicates are dropped, first occurrence kept.

    Args:
        path: the file.

    Returns:
        The distinct completions in file order.

    Raises:
        DataFileNotFoundError: no file at `path`.
        DataError: unknown extension, empty file, or a malformed line.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "candidates.txt"
        >>> _ = p.write_text("<a_1><b_2>\\n<a_3><b_4>\\n<a_1><b_2>\\n")
        >>> read_candidates(p)
        ['<a_1><b_2>', '<a_3><b_4>']
    """
    text_path = os.fspath(path)
    ext = os.path.splitext(text_path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise DataError(
            f"{text_path}: unknown candidates file extension {ext!r}; use .txt (one completion "
            'a line) or .jsonl (one {"completion": ...} a line)'
        )
    path, lines = _read_lines(path, "candidates")
    seen: dict[str, None] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if ext == ".txt":
            seen.setdefault(line)
        else:
            obj = _json_object(path, lineno, line, '{"completion": "..."} object')
            seen.setdefault(_string_field(obj, "completion", f"{path}:{lineno}"))
    return list(seen)


# --------------------------------------------------------------------------------------------
# Encoding.
# --------------------------------------------------------------------------------------------


def _use_template(tokenizer: Any, chat_template: bool) -> bool:
    return bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return [*msgs, {"role": "user", "content": prompt}]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            "the tokenizer has no eos token; set tokenizer.eos_token so completions can end"
        )
    return int(eos)


def end_of_turn_id(tokenizer: Any, *, chat_template: bool = True) -> int:
    """The token that ends an assistant turn: what a completion is followed by in training.

    With a chat template, it is the first special token the template writes after the
    assistant's text (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3); without one, or
    when the template writes none, the tokenizer's eos.

    Args:
        tokenizer: a Hugging Face tokenizer.
        chat_template: whether prompts are rendered with the chat template.

    Returns:
        The token id.

    Example:
        >>> end_of_turn_id(tokenizer)  # doctest: +SKIP
        2
    """
    if not _use_template(tokenizer, chat_template):
        return _eos_id(tokenizer)
    sentinel = "GTIJAXSENTINEL"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}],
        tokenize=False,
    )
    tail = text.split(sentinel, 1)[1] if sentinel in text else ""
    special = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    tail = tail.lstrip()
    for tok in special:
        if tok and tail.startswith(tok):
            return int(tokenizer.convert_tokens_to_ids(tok))
    return _eos_id(tokenizer)


def encode_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    chat_template: bool = True,
    system: str | None = None,
    max_len: int | None = None,
) -> np.ndarray:
    """Token ids of a prompt as the model sees it before the completion (for generation).

    With a chat template (and `chat_template`), the prompt is a user turn (after an optional
    system turn) followed by the assistant header (``add_generation_prompt=True``); otherwise
    it is the prompt encoded with the tokenizer's special tokens (e.g. bos). The result is
    exactly the prefix :func:`encode_example` trains on.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the prompt text.
        chat_template: use the tokenizer's chat template when it has one.
        system: an optional system message.
        max_len: keep at most the last `max_len` tokens (left truncation).

    Returns:
        ``[T]`` int32 ids.

    Example:
        >>> encode_prompt(tokenizer, "Capital of France?").dtype  # doctest: +SKIP
        dtype('int32')
    """
    if _use_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template(
            _messages(prompt, system), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        if system is not None:
            prompt = f"{system}\n{prompt}"
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    ids = np.asarray(ids, np.int32)
    if max_len is not None and len(ids) > max_len:
        ids = ids[len(ids) - max_len :]
    return ids


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. ``[bos]``; often none).

    Sequence rows start with them, as text encoded with ``add_special_tokens=True`` would.
    """
    plain = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return [int(t) for t in full[:i]]
    return []


def _encode_segments(
    tokenizer: Any,
    segments: Sequence[tuple[str, bool]],
    *,
    max_len: int | None,
    prefix: Sequence[int],
    where: str,
) -> Encoded:
    ids, mask = [int(t) for t in prefix], [0.0] * len(prefix)
    for text, loss in segments:
        part = tokenizer.encode(text, add_special_tokens=False)
        ids += part
        mask += [1.0 if loss else 0.0] * len(part)
    if max_len is not None and len(ids) > max_len:
        raise DataError(
            f"{where}: the sequence row has {len(ids)} tokens, more than max_len {max_len}; "
            f"raise data.max_len to at least {len(ids)} or split the row into shorter ones "
            "(for the built-in task: rec.sequence_items)"
        )
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def encode_eval_prompt(
    tokenizer: Any,
    ex: Example,
    *,
    chat_template: bool = True,
    system: str | None = None,
    max_len: int | None = None,
) -> np.ndarray:
    """The ids a model continues to answer `ex`: its prompt exactly as training renders it.

    A prompt/completion row gives :func:`encode_prompt`; a sequence row gives its segments
    but the last, concatenated as in training (no chat template), so evaluation asks for the
    next segment in the form the model was trained on.
    """
    if ex.messages is not None:
        _need_template(tokenizer, chat_template, "an eval row")
        text = tokenizer.apply_chat_template(
            _turns(ex.messages[:-1]), tokenize=False, add_generation_prompt=True
        )
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
        return ids[max(0, len(ids) - max_len) :] if max_len is not None else ids
    if ex.segments is None:
        return encode_prompt(
            tokenizer, ex.prompt, chat_template=chat_template, system=system, max_len=max_len
        )
    ids, _ = _encode_segments(
        tokenizer, ex.segments[:-1], max_len=None, prefix=special_prefix(tokenizer), where=""
    )
    if max_len is not None and len(ids) > max_len:
        ids = ids[len(ids) - max_len :]
    return ids


def _turns(messages) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in messages]


def _need_template(tokenizer: Any, chat_template: bool, where: str) -> None:
    if not _use_template(tokenizer, chat_template):
        raise DataError(
            f"{where}: a chat row (messages) is rendered with the tokenizer's chat template; "
            "set data.chat_template=true and use a tokenizer that has one, or write "
            "prompt/completion rows"
        )


def _message_pieces(tokenizer: Any, messages, end_text: str, where: str):
    """``(text, loss)`` pieces of a rendered chat row: each assistant turn's content and the
    end-of-turn token right after it are loss pieces; everything before is context (so a
    user + assistant row encodes exactly as the prompt/completion row it is).

    Each assistant turn is found where the template puts it: right after the rendering of
    the turns before it with the generation prompt (what evaluation and inference feed)."""
    full = tokenizer.apply_chat_template(_turns(messages), tokenize=False)
    pieces, pos = [], 0
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        head = tokenizer.apply_chat_template(
            _turns(messages[:i]), tokenize=False, add_generation_prompt=True
        )
        start = len(head)
        if start < pos or not full.startswith(head) or not full.startswith(content, start):
            raise DataError(
                f"{where}: the chat template does not render assistant turn {i + 1} right "
                "after the turns before it (a template that rewrites earlier turns); write "
                "one assistant turn per row, or prompt/completion rows"
            )
        pieces += [(full[pos:start], False), (content, True)]
        pos = start + len(content)
        if end_text and full.startswith(end_text, pos):
            pieces.append((None, True))  # the end-of-turn token: learned, to stop
            pos += len(end_text)
    return pieces  # what follows the last assistant turn is never attended to: left out


def _encode_messages(tokenizer: Any, ex: Example, *, max_len: int, end_id: int, where: str):
    end_text = tokenizer.convert_ids_to_tokens(end_id)
    ids: list[int] = []
    mask: list[float] = []
    for text, loss in _message_pieces(tokenizer, ex.messages, end_text, where):
        part = [end_id] if text is None else tokenizer.encode(text, add_special_tokens=False)
        ids += part
        mask += [1.0 if loss else 0.0] * len(part)
    if len(ids) > max_len:
        raise DataError(
            f"{where}: the chat row has {len(ids)} tokens, more than max_len {max_len}; raise "
            f"data.max_len to at least {len(ids)} or shorten the conversation"
        )
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def _encode(
    tokenizer: Any,
    ex: Example,
    *,
    max_len: int,
    chat_template: bool,
    system: str | None,
    end_id: int,
    where: str,
    prefix: Sequence[int] = (),
) -> Encoded:
    if ex.segments is not None:
        return _encode_segments(tokenizer, ex.segments, max_len=max_len, prefix=prefix, where=where)
    if ex.messages is not None:
        _need_template(tokenizer, chat_template, where)
        return _encode_messages(tokenizer, ex, max_len=max_len, end_id=end_id, where=where)
    prompt = encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system=system)
    completion = tokenizer.encode(ex.completion, add_special_tokens=False) + [end_id]
    n_c = len(completion)
    if n_c + 1 > max_len:
        raise DataError(
            f"{where}: the completion has {n_c} tokens (with the end token) but max_len is "
            f"{max_len}, which must leave room for at least one prompt token; raise max_len "
            f"(data.max_len) to at least {n_c + 1} or shorten the completion"
        )
    keep = max_len - n_c
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep :]
    ids = np.concatenate([prompt, np.asarray(completion, np.int32)]).astype(np.int32)
    mask = np.zeros(len(ids), np.float32)
    mask[len(prompt) :] = 1.0
    return ids, mask


def encode_example(
    tokenizer: Any,
    ex: Example,
    *,
    max_len: int,
    chat_template: bool = True,
    system: str | None = None,
) -> Encoded:
    """Encodes one example into token ids and a loss mask.

    The ids are ``encode_prompt(prompt) + encode(completion) + [end]``, where `end` is
    :func:`end_of_turn_id` (``<|im_end|>`` for ChatML templates, the eos otherwise). The
    loss mask is 1 on the completion tokens and the end token, 0 on the prompt. When the
    total exceeds `max_len`, the prompt is cut from the left; the completion never is.

    A sequence row (``ex.segments``) is ``special_prefix + encode(text)`` of each segment in
    order, no chat template and no end token, with the loss on the flagged segments' tokens;
    one longer than `max_len` is refused (cutting it would drop targets or their context).

    Args:
        tokenizer: a Hugging Face tokenizer.
        ex: the example.
        max_len: the longest allowed sequence.
        chat_template: render the prompt with the tokenizer's chat template when it has one.
        system: an optional system message.

    Returns:
        ``(ids [T] int32, loss_mask [T] float32)`` with ``T <= max_len``.

    Raises:
        DataError: the completion alone (plus one prompt token) does not fit in `max_len`.

    Example:
        >>> ids, mask = encode_example(tokenizer, Example("Hi?", "Hello"), max_len=32)  # doctest: +SKIP
        >>> int(mask.sum()) == len(tokenizer.encode("Hello", add_special_tokens=False)) + 1  # doctest: +SKIP
        True
    """
    end = end_of_turn_id(tokenizer, chat_template=chat_template)
    return _encode(
        tokenizer,
        Example(*ex),
        max_len=max_len,
        chat_template=chat_template,
        system=system,
        end_id=end,
        where="example",
        prefix=special_prefix(tokenizer),
    )


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_len: int,
    chat_template: bool = True,
    system: str | None = None,
    source: str = "examples",
) -> list[Encoded]:
    """Encodes many examples (:func:`encode_example` on each, the end token looked up once).

    Args:
        tokenizer: a Hugging Face tokenizer.
        examples: the examples.
        max_len: the longest allowed sequence.
        chat_template: see :func:`encode_example`.
        system: an optional system message.
        source: a name used in error messages (e.g. the file path).

    Returns:
        One ``(ids, loss_mask)`` pair per example.

    Raises:
        DataError: an example's completion does not fit (the message names its index).

    Example:
        >>> encoded = encode_examples(tok, read_examples("pairs.jsonl"), max_len=128)  # doctest: +SKIP
    """
    end = end_of_turn_id(tokenizer, chat_template=chat_template)
    prefix = special_prefix(tokenizer)
    return [
        _encode(
            tokenizer,
            Example(*ex),
            max_len=max_len,
            chat_template=chat_template,
            system=system,
            end_id=end,
            where=f"{source} example {i + 1}",
            prefix=prefix,
        )
        for i, ex in enumerate(examples)
    ]


# --------------------------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------------------------


def default_buckets(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Sequence-length buckets: `smallest` times 1, 1.5, 2, 3, 4, 6, ... below `max_len`, then it.

    Two lengths per doubling: a batch pads at most a third of its positions (powers of two
    alone waste up to half: 81-token prompts in 128 slots), for at most two compiled steps
    per doubling.

    Example:
        >>> default_buckets(300)
        (64, 96, 128, 192, 256, 300)
        >>> default_buckets(40)
        (40,)
    """
    out = []
    b = smallest
    while b < max_len:
        out.append(b)
        if b * 3 // 2 < max_len:
            out.append(b * 3 // 2)
        b *= 2
    out.append(int(max_len))
    return tuple(out)


def target_width(max_targets: int, length: int, multiple: int = 8) -> int:
    """The static width ``L`` of :attr:`Batch.targets` for batches of length `length`.

    `max_targets` (the most targets any example of the data set has) rounded up to
    `multiple`, so that one width serves the whole run (no recompilation per batch), and at
    most ``length - 1`` (there are only that many predicting positions).

    Example:
        >>> target_width(5, 64), target_width(5, 4), target_width(0, 64)
        (8, 3, 8)
    """
    width = -(-max(int(max_targets), 1) // multiple) * multiple
    return max(1, min(width, int(length) - 1))


def target_positions(loss_masks: Sequence[np.ndarray], length: int, width: int) -> np.ndarray:
    """``[B, width]`` int32 :attr:`Batch.targets` for right-padded rows with these masks.

    Row ``b`` lists the positions ``t`` with ``loss_mask[b][t + 1] > 0`` in order, then -1.

    Raises:
        DataError: a row has more targets than `width` or a mask longer than `length`.

    Example:
        >>> target_positions([np.array([0, 0, 1, 1.]), np.array([0, 1.])], 4, 3)
        array([[ 1,  2, -1],
               [ 0, -1, -1]], dtype=int32)
    """
    out = np.full((len(loss_masks), width), -1, np.int32)
    for row, m in enumerate(loss_masks):
        if len(m) > length:
            raise DataError(f"row {row}: {len(m)} tokens do not fit a batch of length {length}")
        pos = np.flatnonzero(np.asarray(m)[1:] > 0)
        if len(pos) > width:
            raise DataError(
                f"row {row} has {len(pos)} target tokens, more than the target width {width}; "
                "pass a larger width"
            )
        out[row, : len(pos)] = pos
    return out


class Batcher:
    """Deterministic, resumable batches of encoded examples, bucketed by length.

    Example order: the global example stream is epoch after epoch, each epoch a permutation of
    all examples drawn from ``(seed, epoch)``. Global step `s` takes stream positions
    ``[s * B, (s + 1) * B)`` (crossing epoch boundaries seamlessly), so :meth:`batch_at` is a
    pure function of `(seed, step)` and resuming needs only the step number.

    Shapes: the batch length ``T`` is the smallest bucket that fits the longest example of the
    *global* batch (every process agrees on it); rows are right-padded with `pad_id`.
    :attr:`Batch.targets` has one width per ``T`` for the whole data set
    (:func:`target_width`), so a run compiles its step once per bucket.

    Multi-process: process `i` of `n` gets rows ``[i * B/n, (i + 1) * B/n)`` of the global
    batch; together the processes cover it exactly.

    Args:
        examples: encoded examples, ``(ids [T_i], loss_mask [T_i])`` pairs.
        batch_size: the global batch size ``B``.
        seed: the seed of the permutations.
        buckets: ascending allowed lengths; default :func:`default_buckets` of `max_len`.
        max_len: the longest allowed example; default: the longest given.
        pad_id: id used for padding (masked out everywhere).
        process_index: this process's index.
        process_count: the number of processes; must divide `batch_size`.

    Raises:
        DataError: no examples, a bad batch size, or an example longer than the largest bucket.

    Example:
        >>> ex = [(np.arange(1, n + 1, dtype=np.int32), np.ones(n, np.float32)) for n in (3, 5, 9)]
        >>> b = Batcher(ex, batch_size=2, seed=0, buckets=(4, 8, 16))
        >>> b.batch_at(7).input_ids.shape[0], b.batch_at(7).input_ids.shape[1] in (4, 8, 16)
        (2, True)
    """

    def __init__(
        self,
        examples: Sequence[Encoded],
        *,
        batch_size: int,
        seed: int,
        buckets: Sequence[int] | None = None,
        max_len: int | None = None,
        pad_id: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(examples) == 0:
            raise DataError("no examples to batch; check the data file")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(
                f"process_index {process_index} must be in [0, process_count={process_count})"
            )
        if batch_size % process_count:
            raise DataError(
                f"batch_size {batch_size} must be divisible by the number of processes "
                f"({process_count}); pick a multiple of {process_count}"
            )
        self._ids = [np.asarray(ids, np.int32) for ids, _ in examples]
        self._masks = [np.asarray(m, np.float32) for _, m in examples]
        for i, (ids, m) in enumerate(zip(self._ids, self._masks, strict=True)):
            if ids.ndim != 1 or ids.shape != m.shape:
                raise DataError(
                    f"example {i}: ids and loss_mask must be 1-D of the same length, got "
                    f"{ids.shape} and {m.shape}"
                )
        self._lengths = np.asarray([len(x) for x in self._ids], np.int64)
        self.max_targets = max(int(np.count_nonzero(m[1:] > 0)) for m in self._masks)
        longest = int(self._lengths.max())
        max_len = longest if max_len is None else int(max_len)
        self.buckets = tuple(int(b) for b in (buckets or default_buckets(max_len)))
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise DataError(f"buckets must be ascending positive lengths, got {self.buckets}")
        if longest > self.buckets[-1]:
            i = int(self._lengths.argmax())
            raise DataError(
                f"example {i} has {longest} tokens, more than the largest bucket "
                f"{self.buckets[-1]}; raise max_len or encode with a smaller max_len"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_examples(self) -> int:
        return len(self._ids)

    @property
    def local_batch_size(self) -> int:
        """Rows this process gets per batch (``batch_size / process_count``)."""
        return self.batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over the data (may be fractional)."""
        return self.num_examples / self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:  # a small cache of pure results: recent epochs only
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def indices_at(self, step: int) -> np.ndarray:
        """The example indices of the global batch at `step` (``[B]``)."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        n = self.num_examples
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, n)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[offsets[sel]]
        return out

    def bucket_for(self, length: int) -> int:
        """The smallest bucket that holds `length` tokens."""
        for b in self.buckets:
            if length <= b:
                return b
        raise DataError(f"length {length} exceeds the largest bucket {self.buckets[-1]}")

    def batch_at(self, step: int) -> Batch:
        """This process's slice of the global batch at `step` (numpy arrays).

        Args:
            step: the global step (0-based).

        Returns:
            A :class:`Batch` with ``[B / process_count, T]`` arrays.
        """
        idx = self.indices_at(step)
        t = self.bucket_for(int(self._lengths[idx].max()))
        lo = self.process_index * self.local_batch_size
        local = idx[lo : lo + self.local_batch_size]
        ids = np.full((len(local), t), self.pad_id, np.int32)
        mask = np.zeros((len(local), t), np.float32)
        attn = np.zeros((len(local), t), np.int32)
        for row, i in enumerate(local):
            n = self._lengths[i]
            ids[row, :n] = self._ids[i]
            mask[row, :n] = self._masks[i]
            attn[row, :n] = 1
        width = target_width(self.max_targets, t)
        targets = target_positions([self._masks[i] for i in local], t, width)
        return Batch(ids, mask, attn, targets)
