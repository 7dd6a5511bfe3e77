"""Reads W&B's offline run files (`wandb/offline-run-*/run-<id>.wandb`) the way `wandb sync` does,
for the tracking test: a LevelDB-style log of 32 KiB blocks holding protobuf `Record`s.

wandb 0.31 no longer ships a Python reader (its Go core reads them), so this follows the format:
a 7-byte file header (":W&B", magic 0xBEE1, version 0), then records, each with a 7-byte header
(CRC-32, length, type: 1 full, 2 first, 3 middle, 4 last) that never straddles a block boundary.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def run_contents(wandb_dir: Path, run_id: str) -> dict:
    """History rows, config and summary of every offline attempt of run `run_id` under `wandb_dir`."""
    history, config, summary, files = [], {}, {}, []
    for path in sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(_items(record.history.item))
            elif kind == "run":
                config.update(_items(record.run.config.update))
            elif kind == "config":
                config.update(_items(record.config.update))
            elif kind == "summary":
                summary.update(_items(record.summary.update))
            elif kind == "files":
                files += [f.path for f in record.files.files]
    return {"history": history, "config": config, "summary": summary, "files": files}


def _items(items) -> dict:
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in items}
