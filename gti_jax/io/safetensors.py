"""Safetensors read/write without torch and without copying what need not be copied.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and byte range, then the raw bytes. Reading here memory-maps the file and
returns read-only numpy views (bfloat16 through ``ml_dtypes``), so a loader can hand each
device only its slice of a tensor and an extender can copy untouched tensors byte for byte.
Checkpoints are untrusted input: the header is validated before any data is touched, and a
truncated file is reported as such, never half-read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import ml_dtypes
import numpy as np

from gti_jax.errors import BadInput
from gti_jax.io.atomic import atomic_write

__all__ = [
    "SafetensorsError",
    "TensorInfo",
    "read_header",
    "open_tensors",
    "checkpoint_files",
    "load_dir_tensors",
    "save_tensors",
    "save_dir_tensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(BadInput):
    """A safetensors file or checkpoint directory is missing, malformed or truncated."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (byte offsets are absolute)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Reads and validates a safetensors header.

    Args:
      path: a ``.safetensors`` file.

    Returns:
      ``(tensors, metadata)``: name -> :class:`TensorInfo` with absolute byte offsets, and the
      file's ``__metadata__`` string map (empty if absent).

    Raises:
      SafetensorsError: the file is missing, not safetensors, or shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path}: no such safetensors file; check the checkpoint path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(
                f"{path}: truncated safetensors file (no header); re-download or re-export it"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size}); "
                "re-download or re-export it"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(
                f"{path}: corrupt safetensors header ({e}); re-download or re-export it"
            ) from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (lo, hi) = (
                spec["dtype"],
                tuple(int(s) for s in spec["shape"]),
                spec["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if hi - lo != want or lo < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has {hi - lo} bytes but shape {shape} needs {want}"
            )
        if base + hi > size:
            raise SafetensorsError(
                f"{path}: truncated file: tensor {name!r} ends at byte {base + hi}, file has {size}; "
                "re-download or re-export it"
            )
        tensors[name] = TensorInfo(dtype, shape, base + lo, base + hi)
    return tensors, dict(metadata)


def open_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a safetensors file as a read-only numpy array.

    Nothing is read until a view is used, so taking a slice reads only that slice.

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> save_tensors(p, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    >>> open_tensors(p)["w"][1].tolist()
    [3.0, 4.0, 5.0]
    """
    infos, _ = read_header(path)
    if not infos:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in infos.items():
        flat = mm[info.start : info.end].view(_DTYPES[info.dtype])
        out[name] = flat.reshape(info.shape)
    return out


def checkpoint_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Maps each tensor name of a Hugging Face checkpoint directory to its safetensors file.

    Handles a single ``model.safetensors`` and sharded checkpoints with
    ``model.safetensors.index.json``. Every file the index names must exist.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SafetensorsError(
                f"{index}: malformed index (needs a 'weight_map' object)"
            ) from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise SafetensorsError(
                f"{model_dir}: index names missing shard files {missing}; copy the whole checkpoint"
            )
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in read_header(single)[0]}
    if not model_dir.is_dir():
        raise SafetensorsError(f"{model_dir}: no such checkpoint directory")
    raise SafetensorsError(
        f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; gti_jax reads safetensors checkpoints only "
        "(convert .bin files with transformers' save_pretrained(safe_serialization=True))"
    )


def load_dir_tensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a (possibly sharded) Hugging Face checkpoint directory."""
    files = checkpoint_files(model_dir)
    out: dict[str, np.ndarray] = {}
    for f in sorted(set(files.values())):
        tensors = open_tensors(f)
        for name, arr in tensors.items():
            if files.get(name) == f:
                out[name] = arr
    absent = sorted(set(files) - set(out))
    if absent:
        raise SafetensorsError(
            f"{model_dir}: index lists tensors not found in their files: {absent[:5]}"
        )
    return out


def _spec(x) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape an array-like will have, without reading its data when it says
    them itself (numpy, jax, :class:`gti_jax.models.hf.ExportTensor`)."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        x = np.asarray(x)
    dtype = np.dtype(x.dtype)
    if dtype not in _NAMES:
        raise SafetensorsError(f"cannot store dtype {dtype} in safetensors")
    return dtype, tuple(int(n) for n in x.shape)


def _write(f: IO[bytes], tensors: Mapping[str, object], metadata: Mapping[str, str] | None) -> None:
    """Writes the header from the tensors' dtypes and shapes, then each tensor's bytes in
    turn: a tensor is read (``np.asarray``) only when its bytes are written and dropped
    before the next, so lazily fetched tensors pass through memory one at a time."""
    specs = {k: _spec(v) for k, v in tensors.items()}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes, as the reference writer does
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, value in tensors.items():
        arr = np.asarray(value)
        if (arr.dtype, arr.shape) != specs[name]:
            raise ValueError(
                f"tensor {name!r} read as {arr.dtype} {list(arr.shape)} but announced as "
                f"{specs[name][0]} {list(specs[name][1])}"
            )
        f.write(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)
        del arr


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, object],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors (numpy or jax arrays, or array-likes with ``dtype``, ``shape`` and
    ``__array__`` read one at a time) to one safetensors file, atomically.

    The data goes to a temporary file in the same directory that is renamed into place, so a
    reader never sees a half-written file.
    """
    atomic_write(path, lambda f: _write(f, tensors, metadata), binary=True, flush_behind=True)


def save_dir_tensors(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, object],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes a Hugging Face checkpoint: ``model.safetensors``, or shards plus an index.

    Args:
      out_dir: the checkpoint directory (created if needed).
      tensors: name -> array, in the order to write.
      max_shard_bytes: start a new shard when a file would grow past this.
      metadata: string map stored in each file (``{"format": "pt"}`` is always set).

    Returns:
      The files written.
    """
    out_dir = Path(out_dir)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, object]] = [{}]
    size = 0
    for name, arr in tensors.items():
        nbytes = int(np.prod(np.shape(arr), dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += nbytes
    if len(shards) == 1:
        save_tensors(out_dir / SINGLE_FILE, shards[0], meta)
        (out_dir / INDEX_FILE).unlink(missing_ok=True)
        return [out_dir / SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        save_tensors(out_dir / fname, shard, meta)
        for name, arr in shard.items():
            weight_map[name] = fname
            total += int(np.prod(np.shape(arr), dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(out_dir / INDEX_FILE, lambda f: f.write(json.dumps(index, indent=2)))
    return [out_dir / n for n in names]
