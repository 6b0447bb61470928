"""The house rules of docs/architecture.md, read from the source: imports point down, and no
function is over 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gti_jax"
LOW = (
    "vocab/",
    "io/",
    "models/",
    "rec/",
    "geometry.py",
    "plots.py",
    "metrics.py",
    "config.py",
    "errors.py",
    "progress.py",
)


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(ROOT).as_posix(), ast.parse(p.read_text(encoding="utf-8")))
        for p in sorted(ROOT.rglob("*.py"))
    ]


def _imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at any depth (function-local imports count too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_parse_sees_the_package():
    names = [name for name, _ in _modules()]
    assert "train/run.py" in names and "models/llama.py" in names and len(names) > 40


@pytest.mark.parametrize(
    ("name", "tree"), _modules(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_imports_point_down(name, tree):
    imports = _imports(tree)
    if name.startswith((*LOW, "extend.py")):  # extend: the CLI beside the trainer, not above
        up = sorted(m for m in imports if m.startswith(("gti_jax.train", "gti_jax.pipeline")))
        assert not up, f"{name} imports the trainer: {up}"
    if name.startswith((*LOW, "train/")):
        plan = sorted(m for m in imports if m.startswith("gti_jax.plan"))
        assert not plan, f"{name} imports the planner, which sits above it: {plan}"
    if name.startswith("train/") and name != "train/__main__.py":
        rec = sorted(m for m in imports if m.startswith(("gti_jax.rec", "gti_jax.pipeline")))
        assert not rec, f"{name} imports the front end: {rec}"


def test_no_function_over_100_lines():
    long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 100
    ]
    assert not long, long
