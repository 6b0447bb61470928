"""Tests for gti_jax.rec.prompts: ID tokens, code descriptions, templates and task files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gti_jax.rec.data import (
    Example,
    Item,
    RecDataError,
    filter_dataset,
    leave_one_out,
    load_csv,
)
from gti_jax.rec.prompts import (
    PAIR_TEMPLATES,
    UNUSED_CODE_DESCRIPTION,
    all_code_tokens,
    aux_prompts,
    code_descriptions,
    code_token,
    item_id_string,
    next_item_prompt,
    pair_prompts,
    write_jsonl,
    write_lines,
    write_task_files,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "rec"

ITEMS = [
    Item("1", "Toy Story (1995)", "Toys come alive.", ("Animation", "Comedy")),
    Item("2", "GoldenEye (1995)", "A spy returns.", ("Action", "Thriller")),
    Item("3", "Four Rooms (1995)", "", ("Comedy",)),
    Item("4", "Toy Soldiers (1991)", "Boarding school toys.", ("Action", "Comedy")),
]
# Level a groups {0, 2, 3} and {1}; level b groups {0, 1} (shared across a) and {2}, {3}.
CODES = np.array([[0, 1], [1, 1], [0, 0], [0, 2]])


def test_tokens_and_id_strings():
    assert code_token(0, 12) == "<a_12>"
    assert code_token(3, 0) == "<d_0>"
    assert item_id_string((12, 7, 201)) == "<a_12><b_7><c_201>"
    assert item_id_string(np.array([1, 2])) == "<a_1><b_2>"
    assert all_code_tokens(2, 3) == ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>"]
    assert len(set(all_code_tokens(4, 256))) == 1024
    with pytest.raises(RecDataError, match="level 26"):
        code_token(26, 0)
    with pytest.raises(RecDataError, match=">= 0"):
        code_token(0, -1)
    with pytest.raises(RecDataError, match="codebook_size"):
        all_code_tokens(2, 0)


def test_code_descriptions_content():
    d = code_descriptions(ITEMS, CODES, codebook_size=4)
    assert list(d) == all_code_tokens(2, 4)
    # <a_0>: items 0, 2, 3 (Toy Story, Four Rooms, Toy Soldiers); "toy"/"toys" occur twice.
    assert d["<a_0>"].startswith("Comedy, Animation, Action items such as Toy Story (1995); ")
    assert "Four Rooms (1995); Toy Soldiers (1991)." in d["<a_0>"]
    assert "Keywords: toy, toys" in d["<a_0>"]
    assert d["<a_1>"] == (
        "Action, Thriller items such as GoldenEye (1995). Keywords: goldeneye, spy, returns."
    )
    # Prefix-aware in the sense of the level: <b_1> collects items 0 and 1 across a-codes.
    assert "Toy Story (1995); GoldenEye (1995)." in d["<b_1>"]
    assert d["<b_2>"].startswith("Action, Comedy items such as Toy Soldiers (1991).")
    assert d["<a_2>"] == d["<a_3>"] == d["<b_3>"] == UNUSED_CODE_DESCRIPTION
    # "1995" and stop words never become keywords.
    assert "1995," not in d["<b_1>"].split("Keywords:")[1]


def test_code_descriptions_limits_and_popularity():
    d = code_descriptions(ITEMS, CODES, max_titles=1, max_words=1, max_categories=1)
    assert d["<a_0>"] == "Comedy items such as Toy Story (1995). Keywords: toy."
    d = code_descriptions(ITEMS, CODES, max_titles=1, popularity=np.array([0, 0, 0, 9]))
    assert "such as Toy Soldiers (1991)." in d["<a_0>"]
    assert len(d) == 2 * 3  # inferred codebook size: max code + 1


def test_code_descriptions_errors():
    with pytest.raises(RecDataError, match="3 rows but there are 4 items"):
        code_descriptions(ITEMS, CODES[:3])
    with pytest.raises(RecDataError, match=r"\[num_items, num_levels\]"):
        code_descriptions(ITEMS, np.zeros(4, int))
    with pytest.raises(RecDataError, match="beyond codebook_size 2"):
        code_descriptions(ITEMS, CODES, codebook_size=2)
    with pytest.raises(RecDataError, match=">= 0"):
        code_descriptions(ITEMS, -CODES - 1)
    with pytest.raises(RecDataError, match="integers"):
        code_descriptions(ITEMS, CODES + 0.5)
    with pytest.raises(RecDataError, match="popularity"):
        code_descriptions(ITEMS, CODES, popularity=np.ones(3))


def test_pair_prompts_six_templates():
    rows = pair_prompts(ITEMS, CODES, rng_seed=0, shuffle=False)
    # Six templates for items with a description, two (title-only) for item 2.
    assert len(rows) == 6 + 6 + 2 + 6
    first = rows[:6]
    sid = "<a_0><b_1>"
    assert [r["completion"] for r in first] == [
        sid,
        sid,
        sid,
        "Toy Story (1995)",
        "Toys come alive.",
        "Toy Story (1995). Toys come alive.",
    ]
    assert "Toy Story (1995)" in first[0]["prompt"]
    assert "Toys come alive." in first[1]["prompt"] and "Toy Story" not in first[1]["prompt"]
    assert "Toy Story (1995)" in first[2]["prompt"] and "Toys come alive." in first[2]["prompt"]
    for r in first[3:]:
        assert sid in r["prompt"]
    assert rows[12:14] == [
        {"prompt": rows[12]["prompt"], "completion": "<a_0><b_0>"},
        {"prompt": rows[13]["prompt"], "completion": "Four Rooms (1995)"},
    ]
    for r in rows:
        assert set(r) == {"prompt", "completion"}
        assert any(
            r["prompt"] == v.format(title=t.title, description=t.description, sid=s)
            for vs in PAIR_TEMPLATES.values()
            for v in vs
            for t, s in zip(
                ITEMS, ["<a_0><b_1>", "<a_1><b_1>", "<a_0><b_0>", "<a_0><b_2>"], strict=True
            )
        )


def test_pair_prompts_seed_subset_and_truncation():
    a = pair_prompts(ITEMS, CODES, rng_seed=1)
    assert a == pair_prompts(ITEMS, CODES, rng_seed=1)
    assert a != pair_prompts(ITEMS, CODES, rng_seed=2)
    b = pair_prompts(ITEMS, CODES, rng_seed=2)
    assert sorted(r["completion"] for r in a) == sorted(r["completion"] for r in b)
    sub = pair_prompts(ITEMS, CODES, rng_seed=0, templates=["id_to_title"], shuffle=False)
    assert [r["completion"] for r in sub] == [it.title for it in ITEMS]
    cut = pair_prompts(
        ITEMS, CODES, rng_seed=0, templates=["id_to_description"], max_description_words=2
    )
    assert "Boarding school ..." in [r["completion"] for r in cut]
    with pytest.raises(RecDataError, match="unknown pair template"):
        pair_prompts(ITEMS, CODES, rng_seed=0, templates=["title_to_sku"])


def test_next_item_prompt():
    assert next_item_prompt(["<a_1><b_2>", "<a_0><b_5>"]) == (
        "The user has watched the following items in order: <a_1><b_2>, <a_0><b_5>. "
        "What is the next item?"
    )
    p = next_item_prompt(["<a_1>", "<a_2>"], history_titles=["X", "Y"], action="purchased")
    assert p == (
        'The user has purchased the following items in order: <a_1> "X", <a_2> "Y". '
        "What is the next item?"
    )
    with pytest.raises(RecDataError, match="non-empty"):
        next_item_prompt([])
    with pytest.raises(RecDataError, match="one title per"):
        next_item_prompt(["<a_1>"], history_titles=[])


def test_aux_prompts():
    examples = [Example(0, (0, 2), 3), Example(1, (1,), 0)]
    rows = aux_prompts(ITEMS, CODES, examples, rng_seed=0)
    assert len(rows) == 2 * len(ITEMS) + 2
    seq = [r for r in rows if "in order" in r["prompt"]]
    assert sorted(r["completion"] for r in seq) == ["<a_0><b_1>", "<a_0><b_2>"]
    assert any('"Toy Story (1995)", "Four Rooms (1995)"' in r["prompt"] for r in seq)
    id_to_item = [r for r in rows if r["prompt"].startswith("Which item does the ID")]
    assert {(r["prompt"].split()[5], r["completion"]) for r in id_to_item} == {
        ("<a_0><b_1>", "Toy Story (1995)"),
        ("<a_1><b_1>", "GoldenEye (1995)"),
        ("<a_0><b_0>", "Four Rooms (1995)"),
        ("<a_0><b_2>", "Toy Soldiers (1991)"),
    }
    capped = aux_prompts(ITEMS, CODES, examples, rng_seed=0, max_sequence_rows=1)
    assert len(capped) == 2 * len(ITEMS) + 1


def test_write_jsonl_atomic(tmp_path):
    path = write_jsonl(tmp_path / "sub" / "a.jsonl", [{"prompt": "é", "completion": "<a_1>"}])
    assert path.read_text(encoding="utf-8") == '{"prompt": "é", "completion": "<a_1>"}\n'

    def rows():
        yield {"prompt": "p", "completion": "c"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl(path, rows())
    assert path.read_text(encoding="utf-8").count("\n") == 1  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.jsonl"]  # no temp left
    with pytest.raises(RecDataError, match="mappings"):
        write_jsonl(tmp_path / "b.jsonl", ["not a dict"])
    with pytest.raises(RecDataError, match="newline"):
        write_lines(tmp_path / "c.txt", ["a\nb"])
    assert not (tmp_path / "b.jsonl").exists() and not (tmp_path / "c.txt").exists()


@pytest.fixture()
def csv_task():
    ds = filter_dataset(
        load_csv(FIX / "interactions.csv", FIX / "items.jsonl"),
        min_user_interactions=1,
        min_item_interactions=1,
    )
    split = leave_one_out(ds, max_history=20)
    codes = np.array([[i % 3, i // 3] for i in range(ds.num_items)])
    return ds, split, codes


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_task_files(tmp_path, csv_task):
    ds, split, codes = csv_task
    paths = write_task_files(tmp_path / "task", ds, split, codes, codebook_size=4, rng_seed=3)
    assert set(paths) == {"tokens", "pairs", "sft", "valid", "test", "aux", "candidates", "items"}
    tokens = _read_jsonl(paths["tokens"])
    assert [t["token"] for t in tokens] == all_code_tokens(2, 4)
    assert all(set(t) == {"token", "description"} and t["description"] for t in tokens)
    sids = [item_id_string(c) for c in codes]
    assert paths["candidates"].read_text().splitlines() == sids
    for key in ("pairs", "valid", "test", "aux"):
        rows = _read_jsonl(paths[key])
        assert rows and all(set(r) == {"prompt", "completion"} for r in rows), key
    # alice (m1, m2, m3) and bob (m1, m2, m4) have 3 interactions: no train rows, one each.
    assert split.train == [] and _read_jsonl(paths["sft"]) == []
    test_rows = _read_jsonl(paths["test"])
    assert test_rows == [
        {"prompt": next_item_prompt([sids[0], sids[1]]), "completion": sids[2]},
        {"prompt": next_item_prompt([sids[0], sids[1]]), "completion": sids[3]},
    ]
    valid_rows = _read_jsonl(paths["valid"])
    assert [r["completion"] for r in valid_rows] == [sids[1], sids[1]]
    items = _read_jsonl(paths["items"])
    assert items[0] == {"index": 0, "item_id": "m1", "semantic_id": sids[0], "title": "Toy Town"}
    assert len(items) == ds.num_items


def test_write_task_files_titles_and_sft(tmp_path):
    ds = filter_dataset(
        load_csv(FIX / "interactions.csv", FIX / "items.jsonl"),
        min_user_interactions=1,
        min_item_interactions=1,
    )
    seqs = ((0, 1, 2, 3),) + ds.sequences[1:]
    ds = type(ds)(items=ds.items, user_ids=ds.user_ids, sequences=seqs, name="x")
    split = leave_one_out(ds)
    codes = np.array([[i, 0] for i in range(ds.num_items)])
    paths = write_task_files(tmp_path, ds, split, codes, history_with_titles=True)
    sft = _read_jsonl(paths["sft"])
    assert sft == [
        {
            "prompt": next_item_prompt(["<a_0><b_0>"], history_titles=["Toy Town"]),
            "completion": "<a_1><b_0>",
        }
    ]


def test_write_task_files_validates_before_writing(tmp_path, csv_task):
    ds, split, codes = csv_task
    clash = codes.copy()
    clash[1] = clash[0]
    out = tmp_path / "out"
    with pytest.raises(RecDataError, match="items 0 and 1 share the ID <a_0><b_0>"):
        write_task_files(out, ds, split, clash)
    assert not out.exists()
    with pytest.raises(RecDataError, match="rows but there are"):
        write_task_files(out, ds, split, codes[:-1])
    other = leave_one_out(filter_dataset(ds, min_user_interactions=3, min_item_interactions=1))
    with pytest.raises(RecDataError, match="split was made on"):
        write_task_files(out, ds, other, codes)
    assert not out.exists()
    paths = write_task_files(out, ds, split, clash, allow_collisions=True)
    assert len(paths["candidates"].read_text().splitlines()) == ds.num_items - 1
