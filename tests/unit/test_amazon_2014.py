"""Amazon Reviews 2014 (rec.dataset=amazon-2014): JSON or Python-literal lines, read with
ast.literal_eval and never run. Hand-written fixtures in tests/fixtures/rec/amazon2014_*."""

import gzip
import os
from pathlib import Path

import pytest

from gti_jax.rec.config import RecConfig, check_rec
from gti_jax.rec.data import RecDataError, load_amazon_2014, load_amazon_2018

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "rec"
A14 = (FIX / "amazon2014_reviews.json", FIX / "amazon2014_meta.json")


def _gz(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


def test_reads_python_literal_and_json_lines():
    ds = load_amazon_2014(*A14)
    assert [it.item_id for it in ds.items] == ["P1", "P2", "P3"]  # metadata order, reviewed
    p1, p2, p3 = ds.items
    assert p1.title == "Rose & Honey Lip Balm"  # HTML entity decoded
    assert p1.description == "Soft lips, all day."
    assert p1.categories == ("Beauty", "Skin Care", "Lips", "Gift Sets")  # paths flattened
    assert p1.extra == {"brand": "Bee"}
    assert p2.title == "Men's Shave Gel"  # a double-quoted literal holding a single quote
    assert p3.categories == ("Beauty", "Hair Care")  # a strict JSON line
    assert ds.user_ids == ("U1", "U2", "U3")
    # U1: P1 (t=1.2e9) before P2 (t=1.3e9); U2: a tie keeps file order (P3, then P1)
    assert ds.sequences == ((0, 1), (2, 0), (1,))
    assert ds.name == "amazon-2014"


def test_gzip_matches_plain(tmp_path):
    gz = (_gz(A14[0], tmp_path / "r.json.gz"), _gz(A14[1], tmp_path / "m.json.gz"))
    a, b = load_amazon_2014(*A14), load_amazon_2014(*gz)
    assert (a.items, a.user_ids, a.sequences) == (b.items, b.user_ids, b.sequences)


@pytest.mark.parametrize("gz", [False, True])
def test_a_call_is_refused_never_run(tmp_path, gz):
    marker = tmp_path / "ran"
    lines = A14[1].read_text().splitlines()
    # a line that would create `marker` if it were evaluated
    lines.insert(2, f"{{'asin': 'P2', 'title': __import__('os').mkdir({str(marker)!r})}}")
    meta = tmp_path / "meta.json"
    meta.write_text("\n".join(lines) + "\n")
    if gz:
        meta = _gz(meta, tmp_path / "meta.json.gz")
    with pytest.raises(RecDataError) as e:
        load_amazon_2014(A14[0], meta)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{meta}:3: not a JSON object or Python dict literal")
    assert not os.path.exists(marker)


def test_bad_lines_name_file_and_line(tmp_path):
    cut = tmp_path / "cut.json"
    cut.write_text("{'reviewerID': 'U1', 'asin': 'P1', 'unixReviewTime': 1}\n{'reviewerID': \n")
    with pytest.raises(RecDataError, match=r"cut.json:2: not a JSON object or Python dict"):
        load_amazon_2014(cut, A14[1])
    listed = tmp_path / "list.json"
    listed.write_text("['U1', 'P1', 1]\n")
    with pytest.raises(RecDataError, match=r"list.json:1: expected a JSON object"):
        load_amazon_2014(listed, A14[1])
    nokey = tmp_path / "nokey.json"
    nokey.write_text("{'reviewerID': 'U1', 'asin': 'P1'}\n")
    with pytest.raises(RecDataError, match=r"nokey.json:1: .*lacks key\(s\) unixReviewTime"):
        load_amazon_2014(nokey, A14[1])


def test_2018_loader_points_to_2014():
    with pytest.raises(RecDataError, match="rec.dataset=amazon-2014"):
        load_amazon_2018(*A14)


def test_config_takes_amazon_2014():
    check_rec(RecConfig(dataset="amazon-2014", paths={"reviews": "r", "meta": "m"}))
