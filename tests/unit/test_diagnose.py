"""gti_jax.diagnose: recording stages into a run directory, redrawing, and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gti_jax import diagnose as dx
from gti_jax.rec.semantic_ids import SemanticIds, save_semantic_ids
from tests.helpers.hf_models import make_tiny_hf_model
from tests.helpers.tokenizers import tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_OLD, NUM_NEW, NUM_PAD, DIM = 40, 16, 8, 24
NEW_IDS = range(NUM_OLD, NUM_OLD + NUM_NEW)


def _strict_json(path: Path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def _tables(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean-init table, grounded table), both [NUM_OLD + NUM_NEW + NUM_PAD, DIM]."""
    rng = np.random.default_rng(seed)
    init = np.zeros((NUM_OLD + NUM_NEW + NUM_PAD, DIM), np.float32)
    init[:NUM_OLD] = rng.normal(size=(NUM_OLD, DIM))
    init[NEW_IDS.start : NEW_IDS.stop] = init[:NUM_OLD].mean(0)
    ground = init.copy()
    ground[NEW_IDS.start : NEW_IDS.stop] = rng.normal(size=(NUM_NEW, DIM))
    return init, ground


def _decode(i: int) -> str:
    return f"tok{i}"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with stages init and ground (codebook given) and metrics.jsonl."""
    run = tmp_path / "run"
    init, ground = _tables()
    code = np.random.default_rng(1).normal(size=(NUM_NEW, 4))
    dx.record_stage(run, "init", init, NEW_IDS, codebook_vectors=code, decode=_decode)
    dx.record_stage(run, "ground", jnp.asarray(ground), NEW_IDS, codebook_vectors=code)
    lines = [
        {"stage": s, "step": i, "loss": 3.0 - 0.1 * i, "lr": 1e-3, "grad_norm": 1.0}
        for s in ("ground", "sft")
        for i in range(5)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


# ---------------------------------------------------------------- record_stage


def test_record_stage_writes_both_stages_with_collapse_then_spread(run_dir):
    data = _strict_json(run_dir / "diagnostics.json")
    assert list(data) == ["init", "ground"]
    init, ground = data["init"], data["ground"]
    for d in (init, ground):
        for key in ("effective_rank", "stable_rank", "mean_cos", "rsa_pearson", "rsa_spearman"):
            assert key in d
        assert d["num_new"] == NUM_NEW
    assert init["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert init["mean_cos"] == pytest.approx(1.0, abs=1e-6)
    assert init["rsa_pearson"] is None  # all new rows equal: correlation undefined
    assert ground["effective_rank"] > 8.0
    assert abs(ground["mean_cos"]) < 0.3
    assert -1.0 <= ground["rsa_pearson"] <= 1.0 and ground["rsa_num_new"] == NUM_NEW
    # Neighbours come from the real old tokens only (no padding rows, no new rows).
    nbr_ids = [n["id"] for item in init["nearest"] for n in item["neighbors"]]
    assert nbr_ids and all(0 <= i < NUM_OLD for i in nbr_ids)
    assert init["nearest"][0]["text"] == f"tok{init['nearest'][0]['id']}"
    assert init["nearest"][0]["neighbors"][0]["text"].startswith("tok")
    for name in ("spectra", "cosine_init", "new_cosine_init", "cosine_ground", "new_cosine_ground"):
        assert _is_png(run_dir / f"{name}.png"), name


def test_record_stage_saves_plain_npy_arrays_for_redrawing(run_dir):
    d = _strict_json(run_dir / "diagnostics.json")["ground"]
    spec = d["plots"]["cosine"]
    mixed = np.load(run_dir / spec["file"], allow_pickle=False)
    assert spec["split"] == NUM_OLD  # fewer than 50 old tokens: all of them
    assert spec["old_ids"] == list(range(NUM_OLD))
    assert spec["new_ids"] == list(NEW_IDS)
    assert mixed.shape == (NUM_OLD + NUM_NEW,) * 2
    _, ground = _tables()
    rows = ground[np.r_[0:NUM_OLD, NEW_IDS.start : NEW_IDS.stop]].astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(mixed, unit @ unit.T, atol=1e-5)
    new_cos = np.load(run_dir / d["plots"]["new_cosine"]["file"], allow_pickle=False)
    assert new_cos.shape == (NUM_NEW, NUM_NEW)
    np.testing.assert_allclose(np.diag(new_cos), 1.0, atol=1e-5)


def test_old_sample_is_spread_and_new_sample_is_the_first_50(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(300, 8))
    dx.record_stage(tmp_path, "init", table, range(200, 300), draw=False)
    spec = _strict_json(tmp_path / "diagnostics.json")["init"]["plots"]["cosine"]
    assert len(spec["old_ids"]) == 50 and spec["old_ids"][0] == 0 and spec["old_ids"][-1] == 199
    assert spec["new_ids"] == list(range(200, 250))
    assert not (tmp_path / "spectra.png").exists()  # draw=False


def test_rerecording_a_stage_replaces_it_and_keeps_the_others(run_dir):
    _, ground = _tables(seed=5)
    out = dx.record_stage(run_dir, "init", ground, NEW_IDS)
    data = _strict_json(run_dir / "diagnostics.json")
    assert list(data) == ["init", "ground"]
    assert data["init"]["effective_rank"] == pytest.approx(out["effective_rank"])
    assert data["init"]["effective_rank"] > 8.0
    assert "rsa_pearson" not in data["init"]  # no codebook this time
    assert not list(run_dir.glob(".*tmp"))  # no temporary files left behind


def test_new_cosine_is_ordered_by_semantic_id(tmp_path):
    tokens = ["<b_1>", "<a_10>", "<a_2>", "<b_0>", "<a_1>", "other"]
    table = np.random.default_rng(0).normal(size=(10, 6))
    out = dx.record_stage(tmp_path, "ground", table, range(4, 10), tokens=tokens)
    spec = out["plots"]["new_cosine"]
    assert spec["labels"] == ["<a_1>", "<a_2>", "<a_10>", "<b_0>", "<b_1>", "other"]
    assert spec["ids"] == [8, 6, 5, 7, 4, 9]
    m = np.load(tmp_path / spec["file"], allow_pickle=False)
    rows = table[spec["ids"]] / np.linalg.norm(table[spec["ids"]], axis=1, keepdims=True)
    np.testing.assert_allclose(m, rows @ rows.T, atol=1e-5)


def test_token_order_from_new_tokens_json(tmp_path):
    (tmp_path / "new_tokens.json").write_text(
        json.dumps(
            {"new_ids": [4, 8], "tokens": ["w", "x", "y", "z"], "token_order": ["z", "x", "w", "y"]}
        )
    )
    table = np.random.default_rng(0).normal(size=(8, 6))
    out = dx.record_stage(tmp_path, "init", table, range(4, 8), draw=False)
    assert out["plots"]["new_cosine"]["ids"] == [7, 5, 4, 6]
    assert out["plots"]["new_cosine"]["labels"] == ["z", "x", "w", "y"]


def test_nan_code_rows_are_left_out_of_rsa(tmp_path):
    table = np.random.default_rng(0).normal(size=(20, 6))
    code = np.random.default_rng(1).normal(size=(10, 3))
    code[[0, 4]] = np.nan
    out = dx.record_stage(tmp_path, "ground", table, range(10, 20), codebook_vectors=code)
    assert out["rsa_num_new"] == 8
    keep = [i for i in range(10) if i not in (0, 4)]
    from gti_jax.geometry import rsa

    want = rsa(code[keep], table[10:][keep])
    assert out["rsa_pearson"] == pytest.approx(want["rsa_pearson"])
    assert out["rsa_spearman"] == pytest.approx(want["rsa_spearman"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage": "../x"}, "stage name"),
        ({"new_ids": [3]}, "at least 2"),
        ({"new_ids": [9, 10]}, r"\[0, 10\)"),
        ({"codebook_vectors": np.zeros((2, 2))}, "aligned with new_ids"),
    ],
)
def test_record_stage_rejects_bad_input(tmp_path, kwargs, match):
    args = {"stage": "init", "new_ids": [7, 8, 9]} | kwargs
    with pytest.raises(dx.DiagnoseError, match=match):
        dx.record_stage(tmp_path, args.pop("stage"), np.ones((10, 4)), args.pop("new_ids"), **args)
    assert not (tmp_path / "diagnostics.json").exists()


# ---------------------------------------------------------------- codebook vectors


def _sids() -> SemanticIds:
    books = (np.arange(6.0).reshape(3, 2), -np.arange(8.0).reshape(4, 2))
    codes = np.array([[0, 1, 0], [2, 3, 1], [2, 3, 0]])
    return SemanticIds(codes, books, (3, 4, 2))  # third column: disambiguation level


def test_token_codebook_vectors_maps_level_letters_to_codebook_rows():
    out = dx.token_codebook_vectors(_sids(), ["<a_2>", "<b_3>", "<a_0>", "<c_1>", "plain"])
    assert out.dtype == np.float32 and out.shape == (5, 2)
    np.testing.assert_array_equal(out[0], [4.0, 5.0])
    np.testing.assert_array_equal(out[1], [-6.0, -7.0])
    np.testing.assert_array_equal(out[2], [0.0, 1.0])
    assert np.all(np.isnan(out[3:]))  # no codebook for level c; not a code token


def test_token_codebook_vectors_none_pad_and_errors():
    assert dx.token_codebook_vectors(_sids(), ["<c_0>", "hello"]) is None
    uneven = SemanticIds(np.array([[0, 0]]), (np.ones((1, 3)), 2 * np.ones((1, 1))), (1, 1))
    np.testing.assert_array_equal(
        dx.token_codebook_vectors(uneven, ["<b_0>", "<a_0>"]), [[2, 0, 0], [1, 1, 1]]
    )
    with pytest.raises(dx.DiagnoseError, match="has only 3 codes"):
        dx.token_codebook_vectors(_sids(), ["<a_3>"])


# ---------------------------------------------------------------- loss


def test_plot_loss_draws_one_curve_per_stage_and_skips_a_cut_last_line(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "st')  # crashed mid-write
    assert _is_png(dx.plot_loss(run_dir))
    curves = dx._read_metrics(run_dir / "metrics.jsonl")
    assert sorted(curves) == ["ground", "sft"] and curves["sft"][0] == [0, 1, 2, 3, 4]


def test_plot_loss_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        dx.plot_loss(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"stage": "sft"}\n{"stage": "sft", "step": 1}\n')
    with pytest.raises(dx.DiagnoseError, match=r"metrics.jsonl:1"):
        dx.plot_loss(tmp_path)


# ---------------------------------------------------------------- CLI: run directory


def test_cli_summarizes_and_redraws_a_run_dir(run_dir):
    for png in run_dir.glob("*.png"):
        png.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "gti_jax.diagnose", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "N", "eff_rank"]
    init_row = next(line.split() for line in lines if line.startswith("init "))
    assert init_row[1] == "16" and float(init_row[2]) == pytest.approx(1.0, abs=1e-3)
    assert any(line.startswith("nearest old tokens (init)") for line in lines)
    assert any("tok" in line and "->" in line for line in lines)
    names = ["spectra", "loss", "cosine_init", "new_cosine_init", "cosine_ground"]
    for name in names + ["new_cosine_ground"]:
        assert _is_png(run_dir / f"{name}.png"), name


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_cli_missing_run_dir(tmp_path, capsys):
    assert dx.main([str(tmp_path / "nope")]) == 2
    assert "run directory not found" in _one_error_line(capsys)


def test_cli_run_dir_without_diagnostics(tmp_path, capsys):
    assert dx.main([str(tmp_path)]) == 2
    assert "diagnostics.json not found" in _one_error_line(capsys)


def test_cli_corrupt_diagnostics(tmp_path, capsys):
    (tmp_path / "diagnostics.json").write_text("{not json")
    assert dx.main([str(tmp_path)]) == 2
    assert "cannot read diagnostics" in _one_error_line(capsys)


def test_cli_no_arguments_and_unknown_flag(capsys):
    assert dx.main([]) == 2
    assert "RUN_DIR" in _one_error_line(capsys)
    assert dx.main(["--bogus"]) == 2  # the config engine's one line, as in every CLI
    assert "--bogus" in _one_error_line(capsys)


# ---------------------------------------------------------------- CLI: export mode

TOKENS = [f"<{lvl}_{c}>" for lvl in "ab" for c in range(4)]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    tok.add_tokens(TOKENS)
    return make_tiny_hf_model(tmp_path_factory.mktemp("export"), "llama", tokenizer=tok)


@pytest.mark.parametrize("spec", ["5", "a:b", "10:11", "9:5"])
def test_cli_bad_new_ids(export_dir, tmp_path, capsys, spec):
    assert dx.main(["--export", str(export_dir), "--new-ids", spec, "--out", str(tmp_path)]) == 2
    assert "--new-ids" in _one_error_line(capsys)
    assert not (tmp_path / "diagnostics.json").exists()


def test_cli_new_ids_beyond_table(export_dir, tmp_path, capsys):
    argv = ["--export", str(export_dir), "--new-ids", "10:100000", "--out", str(tmp_path)]
    assert dx.main(argv) == 2
    assert "table's rows" in _one_error_line(capsys)


def test_cli_export_missing_dir(tmp_path, capsys):
    assert dx.main(["--export", str(tmp_path / "nope"), "--new-ids", "1:3"]) == 2
    assert "export directory not found" in _one_error_line(capsys)


def test_cli_export_with_tokens_and_codebook(export_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(export_dir).convert_tokens_to_ids(TOKENS)
    books = tuple(np.random.default_rng(i).normal(size=(4, 5)) for i in range(2))
    codebook = save_semantic_ids(tmp_path / "sids", SemanticIds(np.array([[0, 1]]), books, (4, 4)))
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text("\n".join(TOKENS) + "\n")
    out = tmp_path / "out"
    argv = ["--export", str(export_dir), "--tokens", str(tokens_file), "--codebook", str(codebook)]
    assert dx.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[2].split()[:2] == ["export", "8"]
    d = _strict_json(out / "diagnostics.json")["export"]
    assert d["plots"]["cosine"]["new_ids"] == ids
    assert d["plots"]["new_cosine"]["labels"] == TOKENS
    assert d["rsa_num_new"] == 8 and -1.0 <= d["rsa_pearson"] <= 1.0
    assert all(isinstance(n["text"], str) for item in d["nearest"] for n in item["neighbors"])
    # Same numbers as computing from the safetensors table directly.
    from gti_jax.geometry import effective_rank
    from gti_jax.io.safetensors import load_dir_tensors

    table = load_dir_tensors(export_dir)["model.embed_tokens.weight"]
    assert d["effective_rank"] == pytest.approx(effective_rank(table[ids]))
    for name in ("spectra", "cosine_export", "new_cosine_export"):
        assert _is_png(out / f"{name}.png"), name


def test_cli_export_new_ids_default_out(export_dir, capsys):
    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(export_dir).convert_tokens_to_ids(TOKENS[0])
    argv = ["--export", str(export_dir), "--new-ids", f"{first}:{first + 8}", "--stage", "final"]
    assert dx.main(argv) == 0
    out = export_dir.parent / "diagnose"
    d = _strict_json(out / "diagnostics.json")["final"]
    assert d["num_new"] == 8 and "rsa_pearson" not in d
    assert d["plots"]["new_cosine"]["labels"] == TOKENS  # names from the exported tokenizer
    assert _is_png(out / "cosine_final.png")


def test_cli_export_tokens_not_in_tokenizer(export_dir, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text("<a_0>\n<zz_9>\n")
    assert dx.main(["--export", str(export_dir), "--tokens", str(tokens_file)]) == 2
    assert "not in the exported tokenizer" in _one_error_line(capsys)
