"""Damaging files on purpose: checkpoints and model directories for the recovery tests.

The checkpoint helpers take an orbax step directory (``<checkpoints>/<step>``) and damage
its ``state`` item in place, one way each: :func:`truncate_array` (the largest array file
loses its last bytes), :func:`flip_bit` (one bit of it flipped, same size) and
:func:`drop_metadata` (``state/_METADATA`` removed). :func:`truncated_model_copy` copies a
Hugging Face checkpoint directory with its ``model.safetensors`` cut in half.

Example:
    >>> flip_bit(run_dir / "checkpoints" / "8")  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["array_file", "drop_metadata", "flip_bit", "truncate_array", "truncated_model_copy"]


def array_file(step_dir: Path) -> Path:
    """The largest file of the step's state item (an array chunk)."""
    files = [p for p in (Path(step_dir) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate_array(step_dir: Path) -> None:
    """Cuts the last 7 bytes off the step's largest array file."""
    p = array_file(step_dir)
    p.write_bytes(p.read_bytes()[:-7])


def flip_bit(step_dir: Path) -> None:
    """Flips one bit in the middle of the step's largest array file."""
    p = array_file(step_dir)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


def drop_metadata(step_dir: Path) -> None:
    """Removes the step's ``state/_METADATA`` file."""
    (Path(step_dir) / "state" / "_METADATA").unlink()


def truncated_model_copy(src: Path, dst: Path) -> Path:
    """Copies the checkpoint directory `src` to `dst` with ``model.safetensors`` cut in half."""
    shutil.copytree(src, dst)
    f = Path(dst) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return Path(dst)
