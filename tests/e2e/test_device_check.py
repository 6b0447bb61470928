"""`bash scripts/device_check.sh --cpu`: the prepared accelerator check, at tiny sizes on the
CPU, through the same code a GPU run takes (issue 14 item 6)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# one subprocess compiling ~15 tiny programs (2 shapes x SFT, grounding, beam search, plus
# parity): about 2 CPU-minutes
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEADER = "| check | model | setting | time | throughput | MFU | memory | result |"


def _number(cell: str) -> float:
    """The first number of a cell ("1,234.5 tokens/s (0.01 TFLOP/s)" -> 1234.5)."""
    m = re.search(r"-?[\d,]+(?:\.\d+)?(?:e[-+]?\d+)?", cell)
    assert m, cell
    return float(m.group(0).replace(",", ""))


def test_device_check_cpu(tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    # the script's own process: one CPU device is enough; compile-bound like the suite, so
    # it keeps the suite's XLA optimization level (tests/conftest.py)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "device_check.sh"), "--cpu", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text in proc.stdout  # the table is printed and written
    lines = text.splitlines()
    assert lines[0].startswith("Device: cpu") and "MFU" not in lines[0]
    start = lines.index(HEADER)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 :]]
    assert all(len(r) == 8 for r in rows), rows
    kinds = [(r[0], r[1]) for r in rows]
    for shape in ("SmolLM2-135M shape (tiny)", "Qwen3-0.6B shape (tiny)"):
        assert ("SFT step (full)", shape) in kinds
        assert ("beam search", shape) in kinds
        assert any(k.startswith("ground step") and m == shape for k, m in kinds)
    parity = [r for r in rows if r[0] == "parity"]
    assert {r[1] for r in parity} == {"tiny Qwen3", "tiny Gemma 3"}
    assert any("transformers" in r[2] for r in parity) and len(parity) == 5
    for r in rows:
        assert r[7].startswith("ok"), r
        if r[0] == "parity":
            err = float(re.search(r"logit error ([\d.e+-]+)", r[7]).group(1))
            tol = float(re.search(r"tol ([\d.e+-]+)", r[7]).group(1))
            assert math.isfinite(err) and err <= tol, r
            continue
        assert _number(r[3]) > 0 and math.isfinite(_number(r[3])), r  # time in ms
        assert _number(r[4]) > 0 and math.isfinite(_number(r[4])), r  # throughput
        assert r[6].endswith("iB") and math.isfinite(_number(r[6].split()[-2])), r
        if r[0] != "beam search":
            assert r[5] == "n/a"  # no MFU without a known peak (the CPU has none)
            assert math.isfinite(_number(r[7].split("loss")[1])), r
