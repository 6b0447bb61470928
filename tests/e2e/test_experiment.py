"""`scripts/experiment.py` end to end: 2 arms x 2 seeds on a tiny random model and a tiny
recommendation dataset (CSV + a .npy of item embeddings), sharing one prepared data dir."""

import contextlib
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.hf_models import make_tiny_hf_model

# 4 trainer runs (2 arms x 2 seeds)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "experiment.py"
WORDS = ["red", "green", "blue", "gold", "dark", "tiny", "old", "new", "wild", "calm", "odd", "far"]


def _load_script():
    spec = importlib.util.spec_from_file_location("experiment_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    model = make_tiny_hf_model(root, "llama")
    n_items, n_users = 12, 10
    with open(root / "items.jsonl", "w") as f:
        for i in range(n_items):
            item = {"item_id": f"i{i}", "title": f"{WORDS[i]} film", "description": WORDS[i]}
            f.write(json.dumps(item) + "\n")
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        for t in range(6):  # every item is seen 5 times
            rows.append(f"u{u},i{(5 * u + t) % n_items},{t}")
    (root / "inter.csv").write_text("\n".join(rows) + "\n")
    np.save(root / "emb.npy", rng.normal(size=(n_items, 8)).astype(np.float32))
    overrides = [
        f"model={model}",
        "rec.dataset=csv",
        f"rec.paths={{interactions: {root / 'inter.csv'}, items: {root / 'items.jsonl'}}}",
        f"rec.embeddings={root / 'emb.npy'}",
        "rec.min_interactions=2",
        "rec.max_history=3",
        "rec.levels=2",
        "rec.codebook_size=3",
        "data.max_len=96",
        "ground.steps=3",
        "ground.lr=0.01",
        "ground.batch_size=4",
        "sft.steps=3",
        "sft.batch_size=4",
        "eval.beams=4",
        "eval.k=[1,3]",
        "eval.max_new_tokens=6",
        "eval.batch_size=4",
        "checkpoint.every=100",
        "export.hf=false",
        "pad_to_multiple_of=8",
    ]
    out, report = root / "runs", root / "report" / "results.md"
    argv = ["--config", "configs/experiment_cpu.yaml", "--out", str(out), "--report", str(report)]
    argv += ["--arms", "mean,mean+gti", "--seeds", "0,1", *overrides]
    return {"root": root, "out": out, "report": report, "argv": argv, "mod": _load_script()}


@pytest.fixture(scope="module")
def first(exp):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = exp["mod"].main(exp["argv"])
    sys.stderr.write(err.getvalue())
    return rc, err.getvalue()


def test_runs_every_arm_and_seed_and_writes_the_report(exp, first):
    rc, err = first
    assert rc == 0
    out = exp["out"]
    for arm in ("mean", "mean+gti"):
        for seed in (0, 1):
            run_dir = out / arm / f"seed{seed}"
            res = json.loads((run_dir / "results.json").read_text())
            assert "recall@3" in res and "popularity_baseline" in res
            assert (run_dir / "data").resolve() == (out / "data").resolve()  # one shared dir
            assert not (run_dir / "checkpoints").exists()  # removed once the run finished
    # grounding ran only in the GTI arm; seeds share the split and semantic IDs
    stages = json.loads((out / "mean" / "seed0" / "stages.json").read_text())
    assert "ground" not in stages or not stages["ground"].get("done")
    assert json.loads((out / "mean+gti" / "seed1" / "stages.json").read_text())["ground"]["done"]
    tok0 = json.loads((out / "mean" / "seed0" / "new_tokens.json").read_text())["tokens"]
    tok1 = json.loads((out / "mean+gti" / "seed1" / "new_tokens.json").read_text())["tokens"]
    assert tok0 == tok1
    meta = json.loads((out / "experiment.json").read_text())
    assert set(meta["seconds"]) == {f"{a}/seed{s}" for a in ("mean", "mean+gti") for s in (0, 1)}

    text = exp["report"].read_text()
    assert "CPU configuration" in text
    assert "python scripts/experiment.py --config configs/experiment_cpu.yaml" in text
    table = [line for line in text.splitlines() if line.startswith("| mean")]
    assert any(line.startswith("| mean | 2 |") for line in table)
    assert any(line.startswith("| mean+gti | 2 |") for line in table)
    assert re.search(r"\| mean\+gti \| 2 \| \d\.\d{4} ± \d\.\d{4} \|", text)  # mean ± std
    assert "| popularity baseline |" in text
    assert "## Conclusion" in text and "Best at Recall@1" in text
    assert "**mean+gti**" in text and "**mean**" in text  # the GTI vs mean comparison
    # the paired per-user test on the same users, from each run's eval_ranks.json
    assert "Paired per-user tests at K = 3" in text
    assert re.search(
        r"\*\*mean\+gti\*\* vs \*\*mean\*\* \(\d+ users x seeds \[0, 1\]\).*McNemar p = ", text
    )
    for bad in (r"\bnan\b", r"\bNone\b", "TODO", "TBD", "XXX", r"\{[a-z_]*\}"):
        assert not re.search(bad, text), bad
    fig_dir = exp["report"].parent / "results"
    for png in ("recall3_by_arm.png", "effective_rank_by_stage.png", "spectra_mean-gti.png"):
        assert (fig_dir / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"results/{png}" in text
    assert "run 1/4: mean/seed0" in err and "run 4/4: mean+gti/seed1" in err
    assert re.search(r"2/4 mean\+gti/seed0 in .*ETA \d+m\d\ds \(2 runs left\)", err)


def test_rerun_skips_completed_runs(exp, first, capfd):
    res = exp["out"] / "mean" / "seed1" / "results.json"
    before = res.stat().st_mtime_ns
    capfd.readouterr()
    assert exp["mod"].main(exp["argv"]) == 0
    err = capfd.readouterr().err
    assert "4 of 4 runs already complete: skipped" in err
    assert "run 1/4" not in err
    assert res.stat().st_mtime_ns == before


def test_report_only_rebuilds_the_report(exp, first, capfd):
    # the script's main in this process (a subprocess spent ~20 s importing jax and
    # matplotlib again): only --out and --report are given, so the arms, seeds and overrides
    # can only come from experiment.json (main keeps no state between calls)
    report2 = exp["root"] / "again" / "results.md"
    argv = ["--out", str(exp["out"]), "--report", str(report2), "--report-only"]
    assert exp["mod"].main(argv) == 0, capfd.readouterr().err[-3000:]
    text = report2.read_text()
    # the settings (arms, seeds, overrides) come from experiment.json: the same table
    first_rows = [x for x in exp["report"].read_text().splitlines() if x.startswith("| mean")]
    assert [x for x in text.splitlines() if x.startswith("| mean")] == first_rows
    assert "--report-only" in text
    assert (report2.parent / "results" / "recall3_by_arm.png").is_file()


def test_bad_input_is_one_line(exp, tmp_path, capfd):
    mod = exp["mod"]
    assert mod.main(["--out", str(tmp_path), "--arms", "mean,bogus"]) == 2
    assert mod.main(["--out", str(tmp_path), "seed=3"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "unknown arm(s) bogus" in err[0] and "seed" in err[1] and "--seeds" in err[1]
    assert not any(tmp_path.iterdir())  # nothing written before the checks
