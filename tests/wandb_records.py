"""Read what W&B wrote for an offline run: the records of its `run-<id>.wandb` file, decoded with wandb's own
protobuf messages (`wandb.proto`). The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then
32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length, type: full / first / middle / last)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:  # zero padding at the end of a block
            continue


@dataclass
class OfflineRun:
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)
    exit_code: int | None = None


def read_offline_run(run_dir: Path, timeout: float = 30.0) -> OfflineRun:
    """The run record, the merged config updates, the logged metric names and the exit code of one offline run.

    W&B's service process writes the file behind the run's `finish()`: read until its exit record is there (or the
    timeout passes; a run never finished then shows `exit_code=None`)."""
    deadline = time.monotonic() + timeout
    while True:
        run = _read(run_dir)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def _read(run_dir: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    run = OfflineRun()

    def update(items) -> None:
        for item in items:
            run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)

    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.job_type = record.run.display_name, record.run.run_group, record.run.job_type
            run.tags = list(record.run.tags)
            update(record.run.config.update)
        elif kind == "config":
            update(record.config.update)
        elif kind == "history":
            run.history_keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
