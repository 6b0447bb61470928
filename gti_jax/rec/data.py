"""Recommendation data: loaders, filtering and the leave-one-out split, in one internal form.

Every source (MovieLens-100k as shipped by ``recbole``, Amazon Reviews 2014, 2018 and 2023, a plain
CSV + JSONL pair) is read into a :class:`RecDataset`: a tuple of :class:`Item` (index ``i`` is
the item's integer index everywhere downstream) and, per user, the time-ordered tuple of item
indices the user interacted with. Nothing here knows about tokens or models.

Conventions, the same for every loader:

* Interactions are sorted per user by timestamp; equal timestamps keep the order of the
  input file (a stable sort), so a given file always yields the same sequences.
* Repeated interactions (the same item twice, consecutive or not) are kept: they are part
  of the behaviour being modelled, and k-core counts count each of them.
* Loaders return the data unfiltered. :func:`filter_dataset` then drops items without a
  title, keeps each user's last ``max_history`` interactions, and applies iterative k-core
  filtering; what it dropped is recorded in :attr:`RecDataset.notes` and logged.
* Input files are untrusted: a missing file, a missing column or key, or a malformed line is
  reported in one line naming the file (and line) and the fix, before any heavy work that
  depends on it. Nothing is ever ``eval``-ed or unpickled (the 2014 Python-literal lines go
  through ``ast.literal_eval``, which reads literals only).
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import importlib.util
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gti_jax.errors import BadInput

__all__ = [
    "RecDataError",
    "RecFileNotFoundError",
    "Item",
    "RecDataset",
    "Example",
    "Split",
    "item_text",
    "load_movielens_100k",
    "load_amazon_2014",
    "load_amazon_2018",
    "load_amazon_2023",
    "load_csv",
    "filter_dataset",
    "leave_one_out",
    "dataset_stats",
    "item_popularity",
]

_LOG = logging.getLogger(__name__)

RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"


class RecDataError(BadInput):
    """A recommendation data file is malformed or does not fit the expected format."""


class RecFileNotFoundError(FileNotFoundError, RecDataError):
    """A recommendation data file does not exist."""


# --------------------------------------------------------------------------------------------
# The internal form.


@dataclass(frozen=True)
class Item:
    """One item of the catalogue.

    Attributes:
      item_id: the item's identifier in the source data (MovieLens id, ASIN, ...).
      title: human-readable title; empty when the source has none (such items are dropped
        by :func:`filter_dataset`).
      description: free text (HTML removed); may be empty.
      categories: genres or category path, most general first where the source orders them.
      extra: source-specific fields kept for reference (e.g. ``{"release_year": "1995"}``).
    """

    item_id: str
    title: str
    description: str = ""
    categories: tuple[str, ...] = ()
    extra: dict | None = None


@dataclass(frozen=True)
class RecDataset:
    """Items and per-user, time-ordered interaction sequences.

    Attributes:
      items: the catalogue; ``items[i]`` is the item with integer index ``i``.
      user_ids: source identifier of each user, aligned with ``sequences``.
      sequences: per user, the item indices interacted with, oldest first.
      name: a short name of the source (``"ml-100k"``, ``"amazon-2018"``, ...).
      notes: one line per processing step that changed the data (what was dropped and why).
    """

    items: tuple[Item, ...]
    user_ids: tuple[str, ...]
    sequences: tuple[tuple[int, ...], ...]
    name: str = "dataset"
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.user_ids) != len(self.sequences):
            raise RecDataError(
                f"RecDataset {self.name!r}: {len(self.user_ids)} user ids but "
                f"{len(self.sequences)} sequences; give one sequence per user"
            )
        n = len(self.items)
        for u, seq in enumerate(self.sequences):
            if seq and (min(seq) < 0 or max(seq) >= n):
                raise RecDataError(
                    f"RecDataset {self.name!r}: user {self.user_ids[u]!r} refers to item index "
                    f"outside [0, {n}); sequences must index into items"
                )

    @property
    def num_items(self) -> int:
        """Number of items in the catalogue."""
        return len(self.items)

    @property
    def num_users(self) -> int:
        """Number of users."""
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        """Total number of interactions (repeats included)."""
        return sum(len(s) for s in self.sequences)


@dataclass(frozen=True)
class Example:
    """One next-item example: the user, the items before the target (oldest first), the target.

    Attributes:
      user: user index into :attr:`RecDataset.sequences`.
      history: item indices before the target, truncated to the most recent ``max_history``.
      target: the item index to predict.
    """

    user: int
    history: tuple[int, ...]
    target: int


@dataclass(frozen=True)
class Split:
    """A leave-one-out split.

    Attributes:
      train: sliding-window examples over each user's training part.
      valid: one example per user, predicting the second-to-last item.
      test: one example per user, predicting the last item.
      num_items: catalogue size (for popularity counts and candidate sets).
      train_sequences: per kept user, the training part of the sequence (everything before
        the validation target), untruncated; keys are user indices.
    """

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    num_items: int
    train_sequences: dict[int, tuple[int, ...]] = field(default_factory=dict)


def item_text(item: Item, *, max_chars: int | None = None) -> str:
    """Returns the item's text as ``"title. description"`` (for embeddings and descriptions).

    Args:
      item: the item.
      max_chars: if given, the text is cut to at most this many characters (at a word
        boundary where possible).

    Returns:
      The title, followed by the description when there is one.

    >>> item_text(Item("1", "Toy Story (1995)", "Genres: Animation, Comedy."))
    'Toy Story (1995). Genres: Animation, Comedy.'
    """
    title = item.title.strip()
    desc = item.description.strip()
    if title and desc:
        text = f"{title} {desc}" if title[-1] in ".!?" else f"{title}. {desc}"
    else:
        text = title or desc
    if max_chars is not None and len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars // 2 else cut
    return text


# --------------------------------------------------------------------------------------------
# File helpers.


def _check_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise RecFileNotFoundError(f"{path}: no such {what} file; check the path")
    return path


def _open_text(path: Path) -> io.TextIOBase:
    """Opens a text file, transparently gunzipping it when it starts with the gzip magic."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _python_literal(line: str, path: Path, lineno: int, what: str):
    """One Amazon 2014 line: a Python dict literal, read by ``ast.literal_eval`` (literals
    only: a name, call or attribute, e.g. ``__import__('os')``, is refused, never run)."""
    try:
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        why = " ".join(str(e).split())[:80] or type(e).__name__
        raise RecDataError(
            f"{path}:{lineno}: not a JSON object or Python dict literal in {what} file ({why}); "
            "each line must be one record of literals (strings, numbers, lists, dicts, "
            "True/False/None)"
        ) from None


def _json_lines(path: Path, what: str, *, literals: bool = False) -> Iterator[tuple[int, dict]]:
    """Yields ``(line_number, object)`` for each non-empty line of a JSON-lines file.

    With `literals`, a line that is not JSON is read as a Python literal (Amazon 2014)."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    if literals:
                        obj = _python_literal(line, path, lineno, what)
                    elif line.startswith("{'"):
                        raise RecDataError(
                            f"{path}:{lineno}: this {what} file is in the 2014 'loose JSON' "
                            "format (Python dict literals); use rec.dataset=amazon-2014 (or "
                            "load_amazon_2014) for it"
                        ) from None
                    else:
                        raise RecDataError(
                            f"{path}:{lineno}: invalid JSON in {what} file ({e.msg}); "
                            "expected one JSON object per line"
                        ) from None
                if not isinstance(obj, dict):
                    raise RecDataError(
                        f"{path}:{lineno}: expected a JSON object per line in {what} file, "
                        f"got {type(obj).__name__}"
                    )
                yield lineno, obj
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise RecDataError(
            f"{path}: unreadable {what} file ({e}); expected UTF-8 JSON lines, optionally gzip"
        ) from None


def _require(obj: dict, keys: Sequence[str], path: Path, lineno: int, what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RecDataError(
            f"{path}:{lineno}: {what} record lacks key(s) {', '.join(missing)}; "
            f"each line needs {', '.join(keys)}"
        )


_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def _clean(value) -> str:
    """Turns a str / list of str / None into one line of plain text (HTML removed)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = html.unescape(_TAG.sub(" ", str(value)))
    return _SPACE.sub(" ", text).strip()


def _categories(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    out = []
    for v in value:
        c = _clean(v)
        if c and c not in out:
            out.append(c)
    return tuple(out)


def _number(value, path: Path, lineno: int, key: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise RecDataError(
            f"{path}:{lineno}: {key} must be a number, got {value!r}; use Unix time"
        ) from None
    if x != x:
        raise RecDataError(f"{path}:{lineno}: {key} is NaN; use Unix time")
    return x


def _assemble(
    name: str,
    interactions: tuple[list[str], list[str], list[float]],
    meta: dict[str, Item],
    source: Path,
) -> RecDataset:
    """Builds a dataset from raw (user, item, time) columns and the item metadata.

    Items are ordered as in the metadata (those with at least one interaction), followed by
    interacted items without metadata (empty title) in order of first appearance. Users are
    ordered by first appearance; each user's interactions are stably sorted by time.
    """
    users, items, times = interactions
    if not users:
        raise RecDataError(f"{source}: no interactions found; the file is empty")
    seen = set(items)
    order = [k for k in meta if k in seen]
    known = set(order)
    for k in dict.fromkeys(items):
        if k not in known:
            order.append(k)
    index = {k: i for i, k in enumerate(order)}
    catalogue = tuple(meta.get(k) or Item(item_id=k, title="") for k in order)

    per_user: dict[str, list[tuple[float, int]]] = {}
    for u, it, t in zip(users, items, times, strict=True):
        per_user.setdefault(u, []).append((t, index[it]))
    sequences = []
    for evs in per_user.values():
        evs.sort(key=lambda e: e[0])  # stable: ties keep file order
        sequences.append(tuple(i for _, i in evs))
    missing = len(order) - len(known)
    notes = (f"loaded {len(users)} interactions from {source.name}",)
    if missing:
        notes += (f"{missing} interacted item(s) have no metadata (empty title)",)
    return RecDataset(
        items=catalogue,
        user_ids=tuple(per_user),
        sequences=tuple(sequences),
        name=name,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# MovieLens-100k (RecBole atomic files).


def _recbole_ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        d = Path(loc) / "dataset_example" / "ml-100k"
        if (d / "ml-100k.inter").is_file() and (d / "ml-100k.item").is_file():
            return d
    raise RecFileNotFoundError(
        f"MovieLens-100k files not found (they ship with recbole); run: {RECBOLE_HINT}"
    )


def _read_atomic(path: Path, required: Sequence[str]) -> tuple[dict[str, int], list[list[str]]]:
    """Reads a RecBole atomic file: a ``name:type`` tab-separated header, then rows."""
    with _open_text(path) as f:
        header = f.readline().rstrip("\r\n")
        if not header:
            raise RecDataError(f"{path}: empty file; expected a RecBole atomic-file header")
        names = [h.split(":", 1)[0] for h in header.split("\t")]
        cols = {n: j for j, n in enumerate(names)}
        missing = [r for r in required if r not in cols]
        if missing:
            raise RecDataError(
                f"{path}: header lacks column(s) {', '.join(missing)} (has {', '.join(names)}); "
                "expected a RecBole atomic file such as ml-100k.inter / ml-100k.item"
            )
        rows = []
        width = len(names)
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            row = line.split("\t")
            if len(row) != width:
                raise RecDataError(
                    f"{path}:{lineno}: {len(row)} tab-separated fields, header has {width}"
                )
            rows.append(row)
    return cols, rows


_ML_UNKNOWN = {"unknown", "unkonwn"}  # ml-100k item 267 has the misspelt placeholder


def load_movielens_100k(
    path: str | os.PathLike | None = None, *, min_rating: float | None = None
) -> RecDataset:
    """Loads MovieLens-100k from RecBole's atomic files (unfiltered).

    The files ``ml-100k.inter`` and ``ml-100k.item`` ship inside the ``recbole`` package
    (``recbole/dataset_example/ml-100k/``); they are found without importing recbole. Every
    rating counts as an interaction (implicit feedback) unless ``min_rating`` is given.
    Titles read ``"Toy Story (1995)"``; the description lists genres and the release year.
    The placeholder movie (id 267, title "unknown") gets an empty title, so
    :func:`filter_dataset` drops it.

    Args:
      path: a directory holding ``ml-100k.inter`` and ``ml-100k.item``; default: the copy
        inside the installed recbole package.
      min_rating: keep only ratings ``>= min_rating``; default keeps all.

    Returns:
      943 users, 1,682 items, 100,000 interactions (with the default arguments).

    Raises:
      RecFileNotFoundError: recbole is not installed (or ``path`` lacks the files).
      RecDataError: a file lacks a needed column or has a malformed row.

    >>> ds = load_movielens_100k()  # doctest: +SKIP
    >>> ds.items[0].title  # doctest: +SKIP
    'Toy Story (1995)'
    """
    d = Path(path) if path is not None else _recbole_ml100k_dir()
    inter_path = _check_file(d / "ml-100k.inter", "MovieLens interaction")
    item_path = _check_file(d / "ml-100k.item", "MovieLens item")
    icols, irows = _read_atomic(item_path, ["item_id", "movie_title"])
    need = ["user_id", "item_id", "timestamp"] + (["rating"] if min_rating is not None else [])
    cols, rows = _read_atomic(inter_path, need)

    meta: dict[str, Item] = {}
    jy, jc = icols.get("release_year"), icols.get("class")
    for row in irows:
        iid = row[icols["item_id"]]
        title = row[icols["movie_title"]].strip()
        year = row[jy].strip() if jy is not None else ""
        title = "" if title.lower() in _ML_UNKNOWN else title
        year = "" if year.lower() in _ML_UNKNOWN else year
        genres = tuple(
            g for g in (row[jc].split() if jc is not None else []) if g.lower() not in _ML_UNKNOWN
        )
        parts = []
        if genres:
            parts.append(f"Genres: {', '.join(genres)}.")
        if year:
            parts.append(f"Released in {year}.")
        meta.setdefault(
            iid,
            Item(
                item_id=iid,
                title=f"{title} ({year})" if title and year else title,
                description=" ".join(parts),
                categories=genres,
                extra={"release_year": year} if year else None,
            ),
        )

    ju, ji, jt = cols["user_id"], cols["item_id"], cols["timestamp"]
    jr = cols.get("rating")
    users, items, times = [], [], []
    for lineno, row in enumerate(rows, 2):
        if min_rating is not None and _number(row[jr], inter_path, lineno, "rating") < min_rating:
            continue
        users.append(row[ju])
        items.append(row[ji])
        times.append(_number(row[jt], inter_path, lineno, "timestamp"))
    return _assemble("ml-100k", (users, items, times), meta, inter_path)


# --------------------------------------------------------------------------------------------
# Amazon Reviews 2018 / 2023 and plain CSV + JSONL.


def _read_interactions_jsonl(
    path: Path, user_key: str, item_key: str, time_key: str, what: str, *, literals=False
) -> tuple[list[str], list[str], list[float]]:
    users, items, times = [], [], []
    for lineno, obj in _json_lines(path, what, literals=literals):
        _require(obj, (user_key, item_key, time_key), path, lineno, what)
        users.append(str(obj[user_key]))
        items.append(str(obj[item_key]))
        times.append(_number(obj[time_key], path, lineno, time_key))
    return users, items, times


def load_amazon_2018(
    reviews_path: str | os.PathLike, meta_path: str | os.PathLike, *, name: str = "amazon-2018"
) -> RecDataset:
    """Loads an Amazon Reviews 2018 category (J. Ni et al.; unfiltered).

    Reviews: JSON lines with ``reviewerID``, ``asin``, ``unixReviewTime`` (seconds; day
    resolution, so ties are common and keep file order). Metadata: JSON lines with ``asin``,
    ``title``, ``description`` (list or string), ``category`` (list); HTML is removed. Both
    may be gzip-compressed (``.json.gz``). Only metadata of reviewed items is kept; reviewed
    items without metadata get an empty title. The 2014 files (Python dict literals) are
    :func:`load_amazon_2014`'s.

    Args:
      reviews_path: the reviews file (e.g. ``Movies_and_TV.json.gz`` or a 5-core file).
      meta_path: the metadata file (e.g. ``meta_Movies_and_TV.json.gz``).
      name: dataset name to record.

    Returns:
      The unfiltered dataset; apply :func:`filter_dataset` next.

    Raises:
      RecFileNotFoundError: a file is missing.
      RecDataError: a line is not a JSON object or lacks a needed key.
    """
    reviews = _check_file(reviews_path, "Amazon 2018 reviews")
    meta_file = _check_file(meta_path, "Amazon 2018 metadata")
    cols = _read_interactions_jsonl(reviews, "reviewerID", "asin", "unixReviewTime", "reviews")
    wanted = set(cols[1])
    meta: dict[str, Item] = {}
    for lineno, obj in _json_lines(meta_file, "metadata"):
        _require(obj, ("asin",), meta_file, lineno, "metadata")
        asin = str(obj["asin"])
        if asin not in wanted or asin in meta:
            continue
        extra = {k: _clean(obj[k]) for k in ("brand", "main_cat") if obj.get(k)}
        meta[asin] = Item(
            item_id=asin,
            title=_clean(obj.get("title")),
            description=_clean(obj.get("description")),
            categories=_categories(obj.get("category")),
            extra=extra or None,
        )
    return _assemble(name, cols, meta, reviews)


def _flat_categories(value) -> tuple[str, ...]:
    """Amazon 2014 ``categories``: a list of category paths (lists), flattened in order."""
    if isinstance(value, list | tuple) and all(isinstance(v, list | tuple) for v in value):
        value = [c for path in value for c in path]
    return _categories(value)


def load_amazon_2014(
    reviews_path: str | os.PathLike, meta_path: str | os.PathLike, *, name: str = "amazon-2014"
) -> RecDataset:
    """Loads an Amazon Reviews 2014 category (J. McAuley et al.; the Beauty, Sports and Toys
    sets of TIGER, P5 and LC-Rec; unfiltered).

    Reviews (``reviews_Beauty_5.json.gz``): one record a line with ``reviewerID``, ``asin``,
    ``unixReviewTime``. Metadata (``meta_Beauty.json.gz``): ``asin``, ``title``,
    ``description``, ``categories`` (a list of category paths), ``brand``. Lines are strict
    JSON or, as the 2014 files mostly are, Python dict literals (single quotes,
    ``True``/``None``), read with ``ast.literal_eval``, which accepts literals only: nothing
    in a file is ever run. Either file may be gzip-compressed.

    Args:
      reviews_path: the reviews file.
      meta_path: the metadata file.
      name: dataset name to record.

    Returns:
      The unfiltered dataset; apply :func:`filter_dataset` next.

    Raises:
      RecFileNotFoundError: a file is missing.
      RecDataError: a line that is neither a JSON object nor a dict literal (a call such as
        ``__import__('os')`` included), or lacks a needed key; one line naming file:line.
    """
    reviews = _check_file(reviews_path, "Amazon 2014 reviews")
    meta_file = _check_file(meta_path, "Amazon 2014 metadata")
    cols = _read_interactions_jsonl(
        reviews, "reviewerID", "asin", "unixReviewTime", "reviews", literals=True
    )
    wanted = set(cols[1])
    meta: dict[str, Item] = {}
    for lineno, obj in _json_lines(meta_file, "metadata", literals=True):
        _require(obj, ("asin",), meta_file, lineno, "metadata")
        asin = str(obj["asin"])
        if asin not in wanted or asin in meta:
            continue
        brand = _clean(obj.get("brand"))
        meta[asin] = Item(
            item_id=asin,
            title=_clean(obj.get("title")),
            description=_clean(obj.get("description")),
            categories=_flat_categories(obj.get("categories")),
            extra={"brand": brand} if brand else None,
        )
    return _assemble(name, cols, meta, reviews)


def load_amazon_2023(
    reviews_path: str | os.PathLike, meta_path: str | os.PathLike, *, name: str = "amazon-2023"
) -> RecDataset:
    """Loads an Amazon Reviews 2023 category (Y. Hou et al.; unfiltered).

    Reviews: JSON lines with ``user_id``, ``parent_asin``, ``timestamp`` (milliseconds).
    Metadata: JSON lines with ``parent_asin``, ``title``, ``description`` (list),
    ``categories`` (list; often empty, then ``main_category`` is used). Items are keyed by
    ``parent_asin`` (product variants merged), as in the dataset's own benchmarks. Either
    file may be gzip-compressed (``.jsonl.gz``).

    Args:
      reviews_path: the reviews file (e.g. ``Video_Games.jsonl.gz``).
      meta_path: the metadata file (e.g. ``meta_Video_Games.jsonl.gz``).
      name: dataset name to record.

    Returns:
      The unfiltered dataset; apply :func:`filter_dataset` next.

    Raises:
      RecFileNotFoundError: a file is missing.
      RecDataError: a line is not a JSON object or lacks a needed key.
    """
    reviews = _check_file(reviews_path, "Amazon 2023 reviews")
    meta_file = _check_file(meta_path, "Amazon 2023 metadata")
    cols = _read_interactions_jsonl(reviews, "user_id", "parent_asin", "timestamp", "reviews")
    wanted = set(cols[1])
    meta: dict[str, Item] = {}
    for lineno, obj in _json_lines(meta_file, "metadata"):
        _require(obj, ("parent_asin",), meta_file, lineno, "metadata")
        asin = str(obj["parent_asin"])
        if asin not in wanted or asin in meta:
            continue
        cats = _categories(obj.get("categories"))
        main = _clean(obj.get("main_category"))
        meta[asin] = Item(
            item_id=asin,
            title=_clean(obj.get("title")),
            description=_clean(obj.get("description")),
            categories=cats or ((main,) if main else ()),
            extra={"main_category": main} if main else None,
        )
    return _assemble(name, cols, meta, reviews)


def load_csv(
    interactions_csv: str | os.PathLike, items_jsonl: str | os.PathLike, *, name: str = "csv"
) -> RecDataset:
    """Loads a CSV of interactions plus a JSON-lines item catalogue (unfiltered).

    Interactions: a CSV with a header containing ``user_id``, ``item_id`` and ``timestamp``
    (a number; extra columns are ignored). Items: JSON lines
    ``{"item_id": ..., "title": ..., "description": ..., "categories": [...]}`` where
    ``description`` (string or list) and ``categories`` (list or string) are optional.

    Args:
      interactions_csv: the interactions file (may be gzip-compressed).
      items_jsonl: the items file (may be gzip-compressed).
      name: dataset name to record.

    Returns:
      The unfiltered dataset; apply :func:`filter_dataset` next.

    Raises:
      RecFileNotFoundError: a file is missing.
      RecDataError: a column or key is missing, or a value is malformed.

    >>> ds = load_csv("interactions.csv", "items.jsonl")  # doctest: +SKIP
    """
    inter = _check_file(interactions_csv, "interactions CSV")
    items_file = _check_file(items_jsonl, "items JSONL")
    meta: dict[str, Item] = {}
    for lineno, obj in _json_lines(items_file, "items"):
        _require(obj, ("item_id", "title"), items_file, lineno, "items")
        iid = str(obj["item_id"])
        if iid in meta:
            raise RecDataError(
                f"{items_file}:{lineno}: duplicate item_id {iid!r}; ids must be unique"
            )
        meta[iid] = Item(
            item_id=iid,
            title=_clean(obj["title"]),
            description=_clean(obj.get("description")),
            categories=_categories(obj.get("categories")),
        )
    users, items, times = [], [], []
    try:
        with _open_text(inter) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("user_id", "item_id", "timestamp") if c not in header]
            if missing:
                raise RecDataError(
                    f"{inter}: CSV header lacks column(s) {', '.join(missing)} "
                    f"(has {', '.join(header) or 'nothing'}); need user_id,item_id,timestamp"
                )
            for row in reader:
                lineno = reader.line_num
                if None in row.values() or row["user_id"] in ("", None):
                    raise RecDataError(
                        f"{inter}:{lineno}: row has fewer fields than the header, or no user_id"
                    )
                users.append(row["user_id"])
                items.append(row["item_id"])
                times.append(_number(row["timestamp"], inter, lineno, "timestamp"))
    except (csv.Error, UnicodeDecodeError) as e:
        raise RecDataError(f"{inter}: unreadable CSV ({e}); expected UTF-8 CSV") from None
    return _assemble(name, (users, items, times), meta, inter)


# --------------------------------------------------------------------------------------------
# Filtering, split, statistics.


def filter_dataset(
    ds: RecDataset,
    *,
    min_user_interactions: int = 5,
    min_item_interactions: int = 5,
    max_history: int | None = None,
    drop_untitled: bool = True,
) -> RecDataset:
    """Drops untitled items, truncates long histories and applies iterative k-core filtering.

    Steps, in order: (1) interactions with items lacking a title are removed; (2) each user
    keeps only the last ``max_history`` interactions; (3) items with fewer than
    ``min_item_interactions`` and users with fewer than ``min_user_interactions``
    interactions are removed, repeatedly, until both hold everywhere (removing an item can
    push a user under the threshold and vice versa). Truncation comes first so the k-core
    guarantee holds on the result. Repeats count as separate interactions. Items are
    re-indexed in their original order; empty users are dropped. Each step's effect is
    appended to :attr:`RecDataset.notes` and logged.

    Args:
      ds: the dataset.
      min_user_interactions: k for users (1 disables).
      min_item_interactions: k for items (1 disables).
      max_history: keep each user's last N interactions; ``None`` keeps all.
      drop_untitled: remove items with an empty title.

    Returns:
      A new, filtered dataset.

    >>> ds = RecDataset(items=(Item("x", "X"), Item("y", "")), user_ids=("u",),
    ...                 sequences=((0, 1, 0),))
    >>> filter_dataset(ds, min_user_interactions=1, min_item_interactions=1).sequences
    ((0, 0),)
    """
    if min_user_interactions < 1 or min_item_interactions < 1:
        raise RecDataError("min_user_interactions and min_item_interactions must be >= 1")
    if max_history is not None and max_history < 1:
        raise RecDataError(f"max_history must be >= 1 or None, got {max_history}")
    lengths = np.array([len(s) for s in ds.sequences], dtype=np.int64)
    user = np.repeat(np.arange(len(ds.sequences), dtype=np.int64), lengths)
    item = np.fromiter((i for s in ds.sequences for i in s), np.int64, count=int(lengths.sum()))
    keep = np.ones(item.shape, dtype=bool)
    notes = list(ds.notes)

    if drop_untitled:
        keep &= ~_untitled(ds, item, notes)
    if max_history is not None:
        keep &= ~_beyond_history(user, keep, len(lengths), max_history, notes)
    rounds = _k_core(
        user, item, keep, len(lengths), len(ds.items), min_user_interactions, min_item_interactions
    )
    kept_items, sequences, user_ids = _regroup(ds, lengths, item, keep)
    notes.append(
        f"k-core (users >= {min_user_interactions}, items >= {min_item_interactions}) stable "
        f"after {rounds} round(s): {len(user_ids)} users, {kept_items.size} items, "
        f"{int(keep.sum())} interactions"
    )
    for line in notes[len(ds.notes) :]:
        _LOG.info("%s: %s", ds.name, line)
    return RecDataset(
        items=tuple(ds.items[int(i)] for i in kept_items),
        user_ids=tuple(user_ids),
        sequences=tuple(sequences),
        name=ds.name,
        notes=tuple(notes),
    )


def _untitled(ds: RecDataset, item: np.ndarray, notes: list[str]) -> np.ndarray:
    """Which interactions (``item`` of each) have an item without a title; notes the count."""
    untitled = np.array([not it.title.strip() for it in ds.items], dtype=bool)
    hit = untitled[item] if item.size else np.zeros(0, bool)
    n_items = int(np.unique(item[hit]).size)
    if n_items:
        notes.append(f"dropped {n_items} item(s) without a title ({int(hit.sum())} interactions)")
    return hit


def _beyond_history(
    user: np.ndarray, keep: np.ndarray, num_users: int, max_history: int, notes: list[str]
) -> np.ndarray:
    """Which kept interactions lie before each user's last ``max_history``; notes the count."""
    # Rank from the end among the kept interactions of each user (arrays are user-major).
    kept_len = np.bincount(user[keep], minlength=num_users)
    rank = np.cumsum(keep) - 1  # position among kept, global
    start = np.concatenate([[0], np.cumsum(kept_len)[:-1]])
    from_end = kept_len[user] - 1 - (rank - start[user])
    cut = keep & (from_end >= max_history)
    if cut.any():
        notes.append(f"kept the last {max_history} interactions per user ({int(cut.sum())} cut)")
    return cut


def _k_core(
    user: np.ndarray,
    item: np.ndarray,
    keep: np.ndarray,
    num_users: int,
    num_items: int,
    min_user: int,
    min_item: int,
) -> int:
    """Clears ``keep`` (in place) until every kept item and user has enough interactions.

    Returns the number of rounds.
    """
    rounds = 0
    while True:
        rounds += 1
        icount = np.bincount(item[keep], minlength=num_items)
        drop = keep & (icount[item] < min_item)
        keep &= ~drop
        ucount = np.bincount(user[keep], minlength=num_users)
        drop_u = keep & (ucount[user] < min_user)
        keep &= ~drop_u
        if not drop.any() and not drop_u.any():
            return rounds


def _regroup(
    ds: RecDataset, lengths: np.ndarray, item: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, ...]], list[str]]:
    """The kept items (old indices), and the kept users' re-indexed sequences and ids."""
    kept_items = np.unique(item[keep])
    remap = np.full(len(ds.items), -1, dtype=np.int64)
    remap[kept_items] = np.arange(kept_items.size)
    new_item = remap[item]
    sequences, user_ids = [], []
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for u in range(len(lengths)):
        lo, hi = bounds[u], bounds[u + 1]
        seq = new_item[lo:hi][keep[lo:hi]]
        if seq.size:
            sequences.append(tuple(int(i) for i in seq))
            user_ids.append(ds.user_ids[u])
    return kept_items, sequences, user_ids


def leave_one_out(ds: RecDataset, *, max_history: int = 20) -> Split:
    """Splits each user's sequence: last item -> test, second-to-last -> valid, rest -> train.

    For a sequence ``s`` of length ``n``: the test example predicts ``s[n-1]`` from
    ``s[:n-1]``; the valid example predicts ``s[n-2]`` from ``s[:n-2]``; train examples
    predict ``s[t]`` from ``s[:t]`` for ``t = 1 .. n-3`` (every prefix of length >= 1 of the
    training part). Histories keep the most recent ``max_history`` items. Users with fewer
    than 3 interactions are dropped (they cannot give a valid and a test example with a
    history); a user with exactly 3 gives no train example.

    Args:
      ds: the (filtered) dataset.
      max_history: longest history kept in an example.

    Returns:
      The :class:`Split`; examples are ordered by user, then by time.

    >>> ds = RecDataset(items=tuple(Item(str(i), str(i)) for i in range(4)),
    ...                 user_ids=("u",), sequences=((0, 1, 2, 3),))
    >>> split = leave_one_out(ds, max_history=2)
    >>> [(e.history, e.target) for e in split.train], split.test[0].history
    ([((0,), 1)], (1, 2))
    """
    if max_history < 1:
        raise RecDataError(f"max_history must be >= 1, got {max_history}")
    train, valid, test = [], [], []
    train_sequences: dict[int, tuple[int, ...]] = {}
    dropped = 0
    for u, s in enumerate(ds.sequences):
        n = len(s)
        if n < 3:
            dropped += 1
            continue
        for t in range(1, n - 2):
            train.append(Example(u, tuple(s[max(0, t - max_history) : t]), s[t]))
        valid.append(Example(u, tuple(s[max(0, n - 2 - max_history) : n - 2]), s[n - 2]))
        test.append(Example(u, tuple(s[max(0, n - 1 - max_history) : n - 1]), s[n - 1]))
        train_sequences[u] = tuple(s[: n - 2])
    if dropped:
        _LOG.info("%s: leave-one-out dropped %d user(s) with < 3 interactions", ds.name, dropped)
    return Split(train, valid, test, num_items=len(ds.items), train_sequences=train_sequences)


def dataset_stats(ds: RecDataset) -> dict:
    """Returns summary counts of a dataset.

    Args:
      ds: the dataset.

    Returns:
      ``{"users", "items", "interactions", "density", "avg_length", "min_length",
      "max_length"}``; density is interactions / (users * items).

    >>> ds = RecDataset(items=(Item("a", "A"), Item("b", "B")), user_ids=("u",),
    ...                 sequences=((0, 1, 1),))
    >>> dataset_stats(ds)["interactions"], dataset_stats(ds)["density"]
    (3, 1.5)
    """
    lengths = [len(s) for s in ds.sequences]
    users, items, inter = len(lengths), len(ds.items), sum(lengths)
    return {
        "users": users,
        "items": items,
        "interactions": inter,
        "density": inter / (users * items) if users and items else 0.0,
        "avg_length": inter / users if users else 0.0,
        "min_length": min(lengths, default=0),
        "max_length": max(lengths, default=0),
    }


def item_popularity(split: Split) -> np.ndarray:
    """Counts each item's training interactions (valid and test targets excluded).

    Each interaction of each user's training part (``Split.train_sequences``: everything
    before the validation target) counts once, so the counts never leak evaluation targets.

    Args:
      split: the leave-one-out split.

    Returns:
      ``[num_items]`` int64 counts.

    >>> ds = RecDataset(items=tuple(Item(str(i), str(i)) for i in range(3)),
    ...                 user_ids=("u",), sequences=((0, 0, 1, 2),))
    >>> item_popularity(leave_one_out(ds)).tolist()
    [2, 0, 0]
    """
    counts = np.zeros(split.num_items, dtype=np.int64)
    for seq in split.train_sequences.values():
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1)
    return counts
