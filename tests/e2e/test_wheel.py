"""The wheel: built from the source tree, installed into an isolated directory, it ships the
configs (``--config quickstart`` loads by name) and the four console scripts work."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.tiny_task import REPO

SCRIPTS = {
    "gti-train": "gti_jax.train.__main__:cli",
    "gti-extend": "gti_jax.cli:extend",
    "gti-prepare": "gti_jax.rec.prepare:cli",
    "gti-diagnose": "gti_jax.diagnose:cli",
}


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built (no build isolation, no network) from a copy of the source tree, so
    the build writes nothing into the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "gti_jax", src / "gti_jax", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "configs", src / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-q", "-w", str(root / "dist"), str(src)]
    )
    (whl,) = (root / "dist").glob("gti_jax-*.whl")
    return whl


@pytest.mark.slow  # builds and installs a wheel, starts four interpreters (~1 min on 2 cores)
def test_wheel_ships_the_configs_and_console_scripts(wheel, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".jsonl")}
    assert {f"gti_jax/configs/{n}" for n in shipped} <= names
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "gti_jax").rglob("*.py")}
    assert sources <= names, sorted(sources - names)  # every module, none left behind
    (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text

    site = tmp_path / "site"
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
        + ["--target", str(site), str(wheel)]
    )
    # the installed copy only: the child sees `site` first, the checkout not at all, and
    # runs from a directory without configs/
    env = {**os.environ, "PYTHONPATH": str(site), "GTI_JAX_NO_REEXEC": "1"}
    run_here = tmp_path / "elsewhere"
    run_here.mkdir()
    where = _run(
        [sys.executable, "-c", "import gti_jax; print(gti_jax.__file__)"], env=env, cwd=run_here
    )
    assert Path(where.stdout.strip()).is_relative_to(site)

    out = _run(
        [
            str(site / "bin" / "gti-train"),
            "--print-config",
            "--config",
            "quickstart",
            "--sft.steps",
            "5",
        ],
        env=env,
        cwd=run_here,
    )
    shown = yaml.safe_load(out.stdout)
    expected = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert shown["sft"]["steps"] == 5 and shown["run_dir"] == expected["run_dir"]
    assert shown["rec"]["levels"] == expected["rec"]["levels"]
    for script in ("gti-extend", "gti-prepare", "gti-diagnose"):
        assert (
            "usage:" in _run([str(site / "bin" / script), "--help"], env=env, cwd=run_here).stdout
        )
    ext = _run(
        [
            str(site / "bin" / "gti-extend"),
            "--model",
            "m",
            "--tokens",
            "t",
            "--out",
            "o",
            "--print-config",
        ],
        env=env,
        cwd=run_here,
    )
    assert json.loads(json.dumps(yaml.safe_load(ext.stdout)))["model"] == "m"
