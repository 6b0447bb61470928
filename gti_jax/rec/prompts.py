"""Semantic-ID tokens, their descriptions, and the prompt files the generic trainer reads.

An item's semantic ID is a tuple of codes, one per level (from RQ-KMeans / RQ-VAE, computed
elsewhere); level ``l`` uses the letter ``"abcd..."[l]``, so codes ``(12, 7, 201)`` become the
string ``<a_12><b_7><c_201>``. This module turns a dataset, its split and the ``[N, L]`` code
array into the generic files of the trainer (see the README's file formats):

* ``tokens.jsonl``: ``{"token", "description"}`` for every code token of every level.
* ``pairs.jsonl``: the six paired text <-> ID templates of GTI (the grounding stage).
* ``sft.jsonl`` / ``valid.jsonl`` / ``test.jsonl``: next-item prompts of the leave-one-out
  split, ``{"prompt", "completion"}``; the completion is the target's ID string. With
  ``task="sequence"`` they are sequence rows instead (:func:`sequence_rows`,
  :func:`sequence_eval_rows`): ``{"segments": [...]}``, one row per user chunk for training,
  the whole history before the target (its last chunk) as the evaluation prompt.
* ``aux.jsonl``: LC-Rec-style alignment tasks (item -> ID, ID -> item, titles -> next ID)
  that the LC-Rec baseline mixes into fine-tuning.
* ``candidates.txt``: every item's ID string, one a line (the beam-search constraint).
* ``items.jsonl``: item index -> source id, ID string, title.

History rendering: by default the history is the list of ID strings, as in TIGER and LC-Rec
(the model reads and writes only IDs); ``history_with_titles=True`` adds each title after
its ID, which makes prompts longer but lets the model use its text knowledge. Prompts are
plain text; the trainer applies the chat template.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from gti_jax.io.atomic import atomic_write
from gti_jax.rec.codes import LEVEL_LETTERS, code_token
from gti_jax.rec.data import Example, Item, RecDataError, RecDataset, Split, item_text

__all__ = [
    "LEVEL_LETTERS",
    "PAIR_TEMPLATES",
    "UNUSED_CODE_DESCRIPTION",
    "code_token",
    "item_id_string",
    "all_code_tokens",
    "code_descriptions",
    "pair_prompts",
    "next_item_prompt",
    "sequence_chunks",
    "sequence_rows",
    "sequence_eval_rows",
    "aux_prompts",
    "write_jsonl",
    "write_lines",
    "write_task_files",
]

UNUSED_CODE_DESCRIPTION = "an unused item code"

# The paper's six paired templates (text -> ID and ID -> text), two phrasings each; one
# phrasing is drawn per (item, template) from the seeded generator.
PAIR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "title_to_id": (
        "Which item has the title: {title}?",
        'What is the ID of the item titled "{title}"?',
    ),
    "description_to_id": (
        "Which item has the following description: {description}",
        "Which item is described as follows? {description}",
    ),
    "title_description_to_id": (
        'Which item is titled "{title}" and described as follows? {description}',
        "Which item has the title {title} and the description: {description}",
    ),
    "id_to_title": (
        "What is item {sid} called?",
        "What is the title of item {sid}?",
    ),
    "id_to_description": (
        "Describe item {sid}.",
        "What is the description of item {sid}?",
    ),
    "id_to_title_description": (
        "What are the title and description of item {sid}?",
        "Give the title and a description of item {sid}.",
    ),
}
_NEEDS = {
    "title_to_id": ("title",),
    "description_to_id": ("description",),
    "title_description_to_id": ("title", "description"),
    "id_to_title": ("title",),
    "id_to_description": ("description",),
    "id_to_title_description": ("title", "description"),
}


def item_id_string(codes: Sequence[int]) -> str:
    """Returns an item's ID string: the concatenated tokens of its codes, level by level.

    Args:
      codes: ``[L]`` codes of one item.

    Returns:
      The ID string.

    >>> item_id_string((12, 7, 201))
    '<a_12><b_7><c_201>'
    """
    return "".join(code_token(level, int(c)) for level, c in enumerate(codes))


def all_code_tokens(num_levels: int, codebook_size: int) -> list[str]:
    """Returns every code token, level-major: ``<a_0> .. <a_{K-1}>, <b_0>, ...``.

    Args:
      num_levels: L.
      codebook_size: K, codes per level.

    Returns:
      ``L * K`` token strings.

    >>> all_code_tokens(2, 2)
    ['<a_0>', '<a_1>', '<b_0>', '<b_1>']
    """
    if num_levels < 1 or codebook_size < 1:
        raise RecDataError(
            f"need num_levels >= 1 and codebook_size >= 1, got {num_levels}, {codebook_size}"
        )
    return [code_token(level, c) for level in range(num_levels) for c in range(codebook_size)]


def _check_codes(codes, num_items: int, codebook_size: int | None = None) -> tuple[np.ndarray, int]:
    """Validates an ``[N, L]`` integer code array; returns it and the codebook size."""
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise RecDataError(f"codes must be a [num_items, num_levels] array, got shape {arr.shape}")
    if arr.shape[0] != num_items:
        raise RecDataError(
            f"codes has {arr.shape[0]} rows but there are {num_items} items; "
            "compute semantic IDs on the same (filtered) dataset"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise RecDataError(f"codes must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise RecDataError("codes must be >= 0")
    top = int(arr.max()) + 1 if arr.size else 1
    if codebook_size is None:
        codebook_size = top
    elif top > codebook_size:
        raise RecDataError(f"codes reach {top - 1}, beyond codebook_size {codebook_size}")
    return arr, codebook_size


_STOP = frozenset(
    """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each few
    for from further had has have having he her here hers him his how i if in into is it its
    itself just me more most my no nor not now of off on once only or other our out over own
    same she should so some such than that the their them then there these they this those
    through to too under until up very was we were what when where which while who whom why
    will with would you your yours one two new also includes including use used""".split()
)
_WORD = re.compile(r"[a-z][a-z'\-]*[a-z]")


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in _STOP]


def _top(counter: Counter, k: int) -> list[str]:
    # Counter.most_common is stable: ties keep first-seen order, which follows item order.
    return [w for w, _ in counter.most_common(k)]


def code_descriptions(
    items: Sequence[Item],
    codes,
    *,
    codebook_size: int | None = None,
    max_titles: int = 3,
    max_words: int = 8,
    max_categories: int = 3,
    popularity: np.ndarray | None = None,
) -> dict[str, str]:
    """Describes each code token by the items that carry that code at that level.

    The description of ``<b_7>`` is built from every item whose level-b code is 7: its most
    common categories, its most distinctive words (count within the group times the inverse
    document frequency over the whole catalogue, so words present in every item, such as a
    loader's boilerplate, get zero weight), and a few example titles (the most popular when
    ``popularity`` is given, else the first in item order). Tokens no item uses get
    :data:`UNUSED_CODE_DESCRIPTION`. The text is content only, so that a description-based
    initializer is not dominated by shared boilerplate.

    Args:
      items: the catalogue, ``N`` items.
      codes: ``[N, L]`` integer semantic-ID codes.
      codebook_size: K; default ``max(codes) + 1``.
      max_titles: example titles per token.
      max_words: keywords per token.
      max_categories: categories per token.
      popularity: optional ``[N]`` counts used to pick example titles.

    Returns:
      ``token -> description`` for every token of :func:`all_code_tokens` (same order).

    >>> items = [Item("1", "Toy Story (1995)", categories=("Animation",)),
    ...          Item("2", "Heat (1995)", categories=("Crime",))]
    >>> d = code_descriptions(items, [[0, 0], [0, 1]], codebook_size=2)
    >>> d["<b_1>"]
    'Crime items such as Heat (1995). Keywords: heat.'
    """
    arr, k = _check_codes(codes, len(items), codebook_size)
    n, num_levels = arr.shape
    if popularity is not None:
        popularity = np.asarray(popularity)
        if popularity.shape != (n,):
            raise RecDataError(f"popularity must have shape [{n}], got {popularity.shape}")
    # Per item, its distinct words in order of appearance (dicts keep insertion order).
    item_words = [dict.fromkeys(_words(f"{it.title} {it.description}")) for it in items]
    df = Counter(w for ws in item_words for w in ws)
    idf = {w: math.log((n + 1) / (c + 1)) for w, c in df.items()}

    out: dict[str, str] = {}
    for level in range(num_levels):
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(arr[:, level].tolist()):
            groups.setdefault(c, []).append(i)
        for c in range(k):
            token = code_token(level, c)
            members = groups.get(c)
            if not members:
                out[token] = UNUSED_CODE_DESCRIPTION
                continue
            cats = Counter(cat for i in members for cat in items[i].categories)
            top_cats = _top(cats, max_categories)
            cat_words = {w for cat in cats for w in _words(cat)}
            # Counter keeps first-seen order, so equal scores fall back to item order.
            counts = Counter(w for i in members for w in item_words[i])
            rank = {w: j for j, w in enumerate(counts)}
            scored = sorted(
                (w for w in counts if w not in cat_words and idf[w] > 0),
                key=lambda w: (-counts[w] * idf[w], rank[w]),
            )
            words = scored[:max_words]
            order = members
            if popularity is not None:
                order = sorted(members, key=lambda i: (-popularity[i], i))
            titles = [items[i].title for i in order if items[i].title][:max_titles]
            text = "Items"
            if top_cats:
                text = f"{', '.join(top_cats)} items"
            if titles:
                text += f" such as {'; '.join(titles)}"
            text += "."
            if words:
                text += f" Keywords: {', '.join(words)}."
            out[token] = text
    return out


def _truncate_words(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    words = text.split()
    if len(words) <= max_words:
        return text
    return " ".join(words[:max_words]) + " ..."


def _title_description(title: str, description: str) -> str:
    return item_text(Item("", title, description))


def pair_prompts(
    items: Sequence[Item],
    codes,
    *,
    rng_seed: int,
    templates: Sequence[str] | None = None,
    max_description_words: int | None = 64,
    shuffle: bool = True,
) -> list[dict[str, str]]:
    """Builds the paired text <-> ID prompts of the grounding stage (GTI).

    For every item, one row per template of :data:`PAIR_TEMPLATES` (title -> ID,
    description -> ID, title + description -> ID, ID -> title, ID -> description,
    ID -> title + description); templates that need a description are skipped for items
    without one, and templates that need a title for items without one.

    Args:
      items: the catalogue, ``N`` items.
      codes: ``[N, L]`` integer semantic-ID codes.
      rng_seed: seeds the choice of phrasing and the shuffle.
      templates: names of templates to use; default all six.
      max_description_words: descriptions are cut to this many words (``None``: no cut).
      shuffle: shuffle the rows (else item-major, template order).

    Returns:
      ``[{"prompt": ..., "completion": ...}, ...]``.

    >>> rows = pair_prompts([Item("1", "Heat (1995)")], [[3, 4]], rng_seed=0, shuffle=False)
    >>> [r["completion"] for r in rows]
    ['<a_3><b_4>', 'Heat (1995)']
    """
    arr, _ = _check_codes(codes, len(items))
    names = list(PAIR_TEMPLATES) if templates is None else list(templates)
    unknown = [t for t in names if t not in PAIR_TEMPLATES]
    if unknown:
        raise RecDataError(
            f"unknown pair template(s) {', '.join(unknown)}; choose from {', '.join(PAIR_TEMPLATES)}"
        )
    rng = np.random.default_rng(rng_seed)
    rows = []
    for it, code in zip(items, arr, strict=True):
        sid = item_id_string(code)
        fields = {
            "title": it.title.strip(),
            "description": _truncate_words(it.description.strip(), max_description_words),
            "sid": sid,
        }
        for name in names:
            if not all(fields[f] for f in _NEEDS[name]):
                continue
            variants = PAIR_TEMPLATES[name]
            prompt = variants[int(rng.integers(len(variants)))].format(**fields)
            if name.endswith("_to_id"):
                completion = sid
            elif name == "id_to_title":
                completion = fields["title"]
            elif name == "id_to_description":
                completion = fields["description"]
            else:
                completion = _title_description(fields["title"], fields["description"])
            rows.append({"prompt": prompt, "completion": completion})
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


def next_item_prompt(
    history_ids: Sequence[str],
    *,
    history_titles: Sequence[str] | None = None,
    action: str = "watched",
) -> str:
    """Returns the next-item prompt for one history (oldest first).

    Args:
      history_ids: ID strings of the history items.
      history_titles: if given, each ID is followed by its quoted title.
      action: the verb for the domain (``"watched"``, ``"purchased"``, ...).

    Returns:
      The prompt; its completion is the target's ID string.

    >>> next_item_prompt(["<a_1><b_2>", "<a_0><b_5>"])
    'The user has watched the following items in order: <a_1><b_2>, <a_0><b_5>. What is the next item?'
    """
    if not history_ids:
        raise RecDataError("next_item_prompt needs a non-empty history")
    if history_titles is not None:
        if len(history_titles) != len(history_ids):
            raise RecDataError("history_titles must have one title per history ID")
        parts = [f'{i} "{t}"' if t else i for i, t in zip(history_ids, history_titles, strict=True)]
    else:
        parts = list(history_ids)
    return (
        f"The user has {action} the following items in order: {', '.join(parts)}. "
        "What is the next item?"
    )


def _example_rows(
    examples: Iterable[Example],
    sids: Sequence[str],
    items: Sequence[Item],
    *,
    history_with_titles: bool,
    action: str,
) -> list[dict[str, str]]:
    rows = []
    for ex in examples:
        ids = [sids[i] for i in ex.history]
        titles = [items[i].title for i in ex.history] if history_with_titles else None
        rows.append(
            {
                "prompt": next_item_prompt(ids, history_titles=titles, action=action),
                "completion": sids[ex.target],
            }
        )
    return rows


def sequence_chunks(length: int, items: int, overlap: int) -> list[tuple[int, int, int]]:
    """How a history of `length` items is cut into rows: ``(start, stop, first_target)``.

    Every item but the first is a target exactly once. A row holds items ``[start, stop)``
    (at most `items`); the loss is on items ``first_target .. stop - 1``, and a row after the
    first repeats the `overlap` items before its first target as context only, so every
    target is predicted from at least ``min(position, overlap)`` preceding items, and from all
    of them in the first row.

    >>> sequence_chunks(10, 4, 1)
    [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    >>> sequence_chunks(1, 4, 1), sequence_chunks(3, 4, 1)
    ([], [(0, 3, 1)])
    """
    if items < 2 or not 0 <= overlap < items:
        raise RecDataError(f"need items >= 2 and 0 <= overlap < items, got {items}, {overlap}")
    if length < 2:
        return []
    out = [(0, min(items, length), 1)]
    while out[-1][1] < length:
        first = out[-1][1]
        start = first - overlap
        out.append((start, min(start + items, length), first))
    return out


def _segments(prefix: str, ids: Sequence[str], first_target: int) -> dict:
    segs = [{"text": prefix, "loss": False}] if prefix else []
    segs += [{"text": sid, "loss": j >= first_target} for j, sid in enumerate(ids)]
    return {"segments": segs}


def sequence_rows(
    sequences: Mapping[int, Sequence[int]],
    sids: Sequence[str],
    *,
    items: int,
    overlap: int,
    prefix: str = "History:",
) -> list[dict]:
    """Training rows of the sequence task: each user's items as ID segments, chunked.

    Args:
      sequences: user -> the training part of their sequence, oldest first
        (:attr:`Split.train_sequences`).
      sids: item index -> ID string.
      items: most items in one row.
      overlap: items a chunk repeats as context (:func:`sequence_chunks`).
      prefix: text before the first item of every row.

    Returns:
      ``{"segments": [...]}`` rows by user, then by time: the prefix and each item's ID, the
      loss on the items of :func:`sequence_chunks`. Together they have exactly the targets of
      the sliding-window prompts of the same split (each item after a user's first).

    >>> sequence_rows({0: (2, 0, 1)}, ["<a_0>", "<a_1>", "<a_2>"], items=4, overlap=1)
    [{'segments': [{'text': 'History:', 'loss': False}, {'text': '<a_2>', 'loss': False}, {'text': '<a_0>', 'loss': True}, {'text': '<a_1>', 'loss': True}]}]
    """
    rows = []
    for u in sorted(sequences):
        seq = [sids[i] for i in sequences[u]]
        for start, stop, first in sequence_chunks(len(seq), items, overlap):
            rows.append(_segments(prefix, seq[start:stop], first - start))
    return rows


def sequence_eval_rows(
    split: Split,
    sids: Sequence[str],
    which: str,
    *,
    items: int,
    prefix: str = "History:",
) -> list[dict]:
    """Evaluation rows of the sequence task, in the training form.

    The prompt is the prefix and the user's most recent ``items - 1`` items before the target
    (for ``which="valid"`` the training part; for ``"test"`` the training part and the
    validation item), and the last segment, with the loss, is the target's ID: exactly the
    last row training would make of that longer history.

    >>> from gti_jax.rec.data import Item, RecDataset, leave_one_out
    >>> ds = RecDataset(items=tuple(Item(str(i), str(i)) for i in range(5)),
    ...                 user_ids=("u",), sequences=((0, 1, 2, 3, 4),))
    >>> rows = sequence_eval_rows(leave_one_out(ds), [f"<a_{i}>" for i in range(5)], "test", items=3)
    >>> [s["text"] for s in rows[0]["segments"]]
    ['History:', '<a_2>', '<a_3>', '<a_4>']
    """
    if which not in ("valid", "test"):
        raise RecDataError(f"which must be 'valid' or 'test', got {which!r}")
    valid_target = {ex.user: ex.target for ex in split.valid}
    rows = []
    for ex in split.valid if which == "valid" else split.test:
        hist = list(split.train_sequences[ex.user])
        if which == "test":
            hist.append(valid_target[ex.user])
        seq = [sids[i] for i in hist[-(items - 1) :]] + [sids[ex.target]]
        rows.append(_segments(prefix, seq, len(seq) - 1))
    return rows


def aux_prompts(
    items: Sequence[Item],
    codes,
    examples: Sequence[Example] = (),
    *,
    rng_seed: int,
    max_sequence_rows: int | None = None,
    max_description_words: int | None = 64,
    action: str = "watched",
) -> list[dict[str, str]]:
    """Builds LC-Rec-style auxiliary alignment prompts, mixed into fine-tuning by that baseline.

    Three tasks: item -> ID (title and description given, the ID asked), ID -> item (the
    ID given, the title asked), and sequence -> next ID (the history as quoted titles, the
    next item's ID asked). Pass only training examples, so no evaluation target leaks.

    Args:
      items: the catalogue, ``N`` items.
      codes: ``[N, L]`` integer semantic-ID codes.
      examples: training :class:`Example` s for the sequence task.
      rng_seed: seeds the subsample of sequence rows and the shuffle.
      max_sequence_rows: keep at most this many sequence rows (random subset).
      max_description_words: descriptions are cut to this many words.
      action: the verb for the domain.

    Returns:
      Shuffled ``[{"prompt": ..., "completion": ...}, ...]``.

    >>> rows = aux_prompts([Item("1", "Heat (1995)")], [[3, 4]], rng_seed=0)
    >>> sorted(r["completion"] for r in rows)
    ['<a_3><b_4>', 'Heat (1995)']
    """
    arr, _ = _check_codes(codes, len(items))
    sids = [item_id_string(c) for c in arr]
    rng = np.random.default_rng(rng_seed)
    rows = []
    for it, sid in zip(items, sids, strict=True):
        title = it.title.strip()
        if not title:
            continue
        desc = _truncate_words(it.description.strip(), max_description_words)
        about = f' "{title}"' + (f" ({desc})" if desc else "")
        rows.append({"prompt": f"Here is an item:{about}. What is its item ID?", "completion": sid})
        rows.append({"prompt": f"Which item does the ID {sid} stand for?", "completion": title})
    chosen = list(range(len(examples)))
    if max_sequence_rows is not None and len(chosen) > max_sequence_rows:
        chosen = sorted(rng.choice(len(chosen), size=max_sequence_rows, replace=False).tolist())
    for j in chosen:
        ex = examples[j]
        titles = ", ".join(f'"{items[i].title}"' for i in ex.history)
        rows.append(
            {
                "prompt": f"The user has {action} these items in order: {titles}. "
                "Which item ID comes next?",
                "completion": sids[ex.target],
            }
        )
    return [rows[i] for i in rng.permutation(len(rows))]


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Writes one JSON object a line, atomically (a temporary file renamed into place).

    Args:
      path: the output file; parent directories are created.
      rows: JSON-serializable mappings.

    Returns:
      The path written.

    >>> write_jsonl("/tmp/x.jsonl", [{"prompt": "p", "completion": "c"}])  # doctest: +SKIP
    """

    def write(f):
        for row in rows:
            if not isinstance(row, Mapping):
                raise RecDataError(f"write_jsonl: rows must be mappings, got {type(row).__name__}")
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Writes one string a line, atomically; lines must not contain newlines.

    Args:
      path: the output file; parent directories are created.
      lines: the strings.

    Returns:
      The path written.
    """

    def write(f):
        for line in lines:
            if "\n" in line or "\r" in line:
                raise RecDataError(f"write_lines: line {line!r} contains a newline")
            f.write(line + "\n")

    return atomic_write(path, write)


def _item_ids(arr: np.ndarray, allow_collisions: bool) -> list[str]:
    """Each item's semantic-ID string; two items sharing one is an error unless allowed."""
    sids = [item_id_string(c) for c in arr]
    if not allow_collisions:
        first: dict[str, int] = {}
        for i, s in enumerate(sids):
            if s in first:
                raise RecDataError(
                    f"items {first[s]} and {i} share the ID {s}; semantic IDs must be unique "
                    "(add a de-duplication level) or pass allow_collisions=True"
                )
            first[s] = i
    return sids


def _sequence_task_rows(
    split: Split,
    sids: Sequence[str],
    *,
    rng_seed: int,
    items: int,
    overlap: int,
    prefix: str,
    max_rows: int | None,
) -> tuple[list, list, list]:
    """The sequence task's train rows (a seeded subset of ``max_rows``), valid and test rows."""
    train_rows = sequence_rows(
        split.train_sequences, sids, items=items, overlap=overlap, prefix=prefix
    )
    if max_rows is not None and len(train_rows) > max_rows:
        rng = np.random.default_rng([rng_seed, 1])
        keep = np.sort(rng.choice(len(train_rows), max_rows, replace=False))
        train_rows = [train_rows[i] for i in keep]
    ev = {"items": items, "prefix": prefix}
    valid_rows = sequence_eval_rows(split, sids, "valid", **ev)
    test_rows = sequence_eval_rows(split, sids, "test", **ev)
    return train_rows, valid_rows, test_rows


def _popularity(split: Split) -> np.ndarray:
    """Each item's number of interactions in the training sequences."""
    pop = np.zeros(split.num_items, dtype=np.int64)
    for seq in split.train_sequences.values():
        np.add.at(pop, np.asarray(seq, dtype=np.int64), 1)
    return pop


def _write_task_outputs(
    out: Path,
    ds: RecDataset,
    split: Split,
    arr: np.ndarray,
    sids: Sequence[str],
    desc: Mapping[str, str],
    rows: tuple[list, list, list],
    *,
    rng_seed: int,
    max_description_words: int | None,
    max_aux_sequence_rows: int | None,
    action: str,
) -> dict[str, Path]:
    """Writes :func:`write_task_files`' files from the rows it built; returns name -> path."""
    train_rows, valid_rows, test_rows = rows
    return {
        "tokens": write_jsonl(
            out / "tokens.jsonl", ({"token": t, "description": d} for t, d in desc.items())
        ),
        "pairs": write_jsonl(
            out / "pairs.jsonl",
            pair_prompts(
                ds.items, arr, rng_seed=rng_seed, max_description_words=max_description_words
            ),
        ),
        "sft": write_jsonl(out / "sft.jsonl", train_rows),
        "valid": write_jsonl(out / "valid.jsonl", valid_rows),
        "test": write_jsonl(out / "test.jsonl", test_rows),
        "aux": write_jsonl(
            out / "aux.jsonl",
            aux_prompts(
                ds.items,
                arr,
                split.train,
                rng_seed=rng_seed,
                max_sequence_rows=max_aux_sequence_rows,
                max_description_words=max_description_words,
                action=action,
            ),
        ),
        "candidates": write_lines(out / "candidates.txt", dict.fromkeys(sids)),
        "items": write_jsonl(
            out / "items.jsonl",
            (
                {"index": i, "item_id": it.item_id, "semantic_id": sids[i], "title": it.title}
                for i, it in enumerate(ds.items)
            ),
        ),
    }


def write_task_files(
    out_dir: str | os.PathLike,
    ds: RecDataset,
    split: Split,
    codes,
    *,
    rng_seed: int = 0,
    codebook_size: int | None = None,
    history_with_titles: bool = False,
    action: str = "watched",
    max_description_words: int | None = 64,
    max_aux_sequence_rows: int | None = None,
    allow_collisions: bool = False,
    task: str = "prompt",
    sequence_items: int = 30,
    sequence_overlap: int = 8,
    sequence_prefix: str = "History:",
    max_sequence_rows: int | None = None,
) -> dict[str, Path]:
    """Writes every file the generic trainer needs for a recommendation task.

    Files (all UTF-8, each written atomically): ``tokens.jsonl``, ``pairs.jsonl``,
    ``sft.jsonl`` (train examples), ``valid.jsonl``, ``test.jsonl``, ``aux.jsonl``,
    ``candidates.txt`` and ``items.jsonl`` (``{"index", "item_id", "semantic_id",
    "title"}``). Inputs are validated before anything is written.

    Args:
      out_dir: output directory (created).
      ds: the filtered dataset the split and codes were computed on.
      split: its leave-one-out split.
      codes: ``[N, L]`` integer semantic-ID codes, one row per item of ``ds``.
      rng_seed: seeds phrasing choice and shuffles.
      codebook_size: K; default ``max(codes) + 1``.
      history_with_titles: render histories as ID plus title instead of IDs only.
      action: the verb for the domain (``"watched"``, ``"purchased"``, ...).
      max_description_words: descriptions in prompts are cut to this many words.
      max_aux_sequence_rows: cap on the auxiliary sequence rows.
      allow_collisions: allow two items to share an ID (then evaluation cannot tell them
        apart; by default this is an error).
      task: ``"prompt"`` (next-item prompts) or ``"sequence"`` (sequence rows in sft, valid
        and test: :func:`sequence_rows`, :func:`sequence_eval_rows`).
      sequence_items, sequence_overlap, sequence_prefix: the sequence rows' chunking and
        prefix.
      max_sequence_rows: keep this many training sequence rows (a seeded subset, in order).

    Returns:
      ``{"tokens", "pairs", "sft", "valid", "test", "aux", "candidates", "items"}`` -> path.

    >>> paths = write_task_files("out/ml", ds, split, codes)  # doctest: +SKIP
    """
    arr, k = _check_codes(codes, len(ds.items), codebook_size)
    if split.num_items != len(ds.items):
        raise RecDataError(
            f"split was made on {split.num_items} items but ds has {len(ds.items)}; "
            "split the same dataset"
        )
    sids = _item_ids(arr, allow_collisions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    desc = code_descriptions(ds.items, arr, codebook_size=k, popularity=_popularity(split))
    if task == "sequence":
        train_rows, valid_rows, test_rows = _sequence_task_rows(
            split,
            sids,
            rng_seed=rng_seed,
            items=sequence_items,
            overlap=sequence_overlap,
            prefix=sequence_prefix,
            max_rows=max_sequence_rows,
        )
    elif task == "prompt":
        kw = {"history_with_titles": history_with_titles, "action": action}
        train_rows = _example_rows(split.train, sids, ds.items, **kw)
        valid_rows = _example_rows(split.valid, sids, ds.items, **kw)
        test_rows = _example_rows(split.test, sids, ds.items, **kw)
    else:
        raise RecDataError(f"task must be 'prompt' or 'sequence', got {task!r}")
    return _write_task_outputs(
        out,
        ds,
        split,
        arr,
        sids,
        desc,
        (train_rows, valid_rows, test_rows),
        rng_seed=rng_seed,
        max_description_words=max_description_words,
        max_aux_sequence_rows=max_aux_sequence_rows,
        action=action,
    )
