"""Readers of what the trackers wrote, for tests: TensorBoard event files and W&B offline
run files, parsed from their framing (no tensorboard or wandb reader API needed).

- TensorBoard: TFRecord framing (u64 length, masked CRC-32C of it, the ``Event`` protobuf,
  its masked CRC-32C); every CRC is checked.
- W&B: ``run-<id>.wandb`` is a LevelDB log (``:W&B`` header, 32 KiB blocks of records with
  a 7-byte header: CRC, u16 length, type full/first/middle/last) of ``Record`` protobufs; the
  ``history`` records hold what ``run.log`` got.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

__all__ = ["read_tensorboard_scalars", "read_wandb_history"]


def read_tensorboard_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under `logdir`."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert crc == masked_crc32c(header), f"{path}: bad length CRC at {pos}"
            body = data[pos + 12 : pos + 12 + length]
            (crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert crc == masked_crc32c(body), f"{path}: bad data CRC at {pos}"
            pos += 16 + length
            event = Event.FromString(body)
            for value in event.summary.value:
                out[value.tag].append((event.step, value.simple_value))
    return dict(out)


def _leveldb_records(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    block = 32 * 1024
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def read_wandb_history(run_dir: str | Path) -> list[dict]:
    """The dicts logged with ``run.log`` in the W&B offline run(s) under `run_dir`/wandb,
    in order (values decoded from their JSON)."""
    from wandb.proto.wandb_internal_pb2 import Record

    rows = []
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no W&B offline run under {run_dir}/wandb"
    for path in files:
        for raw in _leveldb_records(path.read_bytes()):
            rec = Record.FromString(raw)
            if rec.WhichOneof("record_type") == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
