"""Importing precomputed semantic IDs (rec.semantic_ids_file: a JSON map item -> code tokens,
LC-Rec's .index.json format) instead of computing them, and its one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from gti_jax.rec import data as rd
from gti_jax.rec.config import RecConfig
from gti_jax.rec.data import RecDataError
from gti_jax.rec.prepare import prepare
from gti_jax.rec.semantic_ids import import_semantic_ids

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rec"


def _write(tmp_path, obj, name="ids.index.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def _lcrec(n: int) -> dict:
    """An LC-Rec style map: item index -> three tokens, all distinct."""
    return {str(i): [f"<a_{i % 3}>", f"<b_{i // 3}>", f"<c_{(7 * i) % 5}>"] for i in range(n)}


def test_by_index_like_lcrec(tmp_path):
    sids = import_semantic_ids(_write(tmp_path, _lcrec(7)), [f"m{i}" for i in range(7)])
    assert sids.codes.tolist() == [[i % 3, i // 3, (7 * i) % 5] for i in range(7)]
    assert sids.codebook_sizes == (3, 3, 5)  # largest code + 1 per level
    assert sids.codebooks == () and sids.stats["collision_rate"] == 0.0


def test_by_item_id_ignores_items_filtered_away(tmp_path):
    ids = {"B2": ["<a_1>", "<b_0>"], "B1": ["<a_0>", "<b_4>"], "gone": ["<a_9>", "<b_9>"]}
    sids = import_semantic_ids(_write(tmp_path, ids), ["B1", "B2"])
    assert sids.codes.tolist() == [[0, 4], [1, 0]]
    assert sids.codebook_sizes == (2, 5)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ({"0": ["<a_1>"]}, r"1 of 2 items have no semantic ID \(item indices"),
        ({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>"]}, r"different lengths \(\[1, 2\]"),
        ({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "<b_2>"]}, "items '0' and '1' share"),
        ({"0": ["<a_1>", "<c_2>"], "1": ["<a_0>", "<b_2>"]}, r"token 2 is '<c_2>', expected <b_N>"),
        ({"0": ["a_1"], "1": ["<a_0>"]}, "token 1 is 'a_1', expected <a_N>"),
        ({"0": "<a_1><b_2>", "1": ["<a_0>"]}, "item '0' maps to '<a_1><b_2>'"),
        ([["<a_1>"]], "expected a non-empty JSON object"),
    ],
)
def test_bad_maps_one_line(tmp_path, ids, message):
    with pytest.raises(RecDataError, match=message) as e:
        import_semantic_ids(_write(tmp_path, ids), ["x", "y"])
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_not_json_and_missing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{'0': ['<a_1>']}")
    with pytest.raises(RecDataError, match="bad.json: not a JSON file"):
        import_semantic_ids(bad, ["x"])
    with pytest.raises(RecDataError, match="no such semantic-IDs file"):
        import_semantic_ids(tmp_path / "none.json", ["x"])


def _rec(tmp_path, ids_file) -> RecConfig:
    ds = rd.filter_dataset(
        rd.load_csv(FIXTURES / "interactions.csv", FIXTURES / "items.jsonl"),
        min_user_interactions=1,
        min_item_interactions=1,
    )
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(ds.num_items, 4)).astype(np.float32))
    rec = RecConfig(
        dataset="csv",
        paths={
            "interactions": str(FIXTURES / "interactions.csv"),
            "items": str(FIXTURES / "items.jsonl"),
        },
        min_interactions=1,
        embeddings=str(emb),
        semantic_ids_file=str(ids_file),
    )
    return rec, ds


def test_prepare_uses_the_imported_ids(tmp_path):
    _, ds = _rec(tmp_path, "unused")
    ids = {it.item_id: [f"<a_{i % 2}>", f"<b_{i}>"] for i, it in enumerate(ds.items)}
    rec, _ = _rec(tmp_path, _write(tmp_path, ids))
    paths = prepare(rec, tmp_path / "out", verbose=False)
    items = [json.loads(x) for x in paths["items"].read_text().splitlines() if x]
    assert {r["item_id"]: r["semantic_id"] for r in items} == {
        k: "".join(v) for k, v in ids.items()
    }
    stats = json.loads(paths["stats"].read_text())
    assert stats["semantic_ids"]["method"] == "imported"
    assert stats["semantic_ids"]["codebook_sizes"] == [2, ds.num_items]
    tokens = [json.loads(x)["token"] for x in paths["tokens"].read_text().splitlines() if x]
    assert sorted(tokens) == sorted({t for v in ids.values() for t in v})


def test_prepare_refuses_a_bad_map_before_writing(tmp_path):
    rec, ds = _rec(tmp_path, _write(tmp_path, {ds_id: ["<a_0>"] for ds_id in ("m1",)}))
    with pytest.raises(RecDataError, match=f"{ds.num_items - 1} of {ds.num_items} items have"):
        prepare(rec, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()
