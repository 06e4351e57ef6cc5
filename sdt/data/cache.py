"""Small helpers for the on-disk caches (tokenizers, token streams).

Every entry records what it holds (sizes, token counts, dtype, a SHA-256 of each file up to `HASH_LIMIT_BYTES`) and is
checked against that record when it is loaded; an entry that does not match (a copy cut short, a full disk, a flipped
byte) is rebuilt, with a warning, under the same lock that guards building it.

Every cache file is written to a temporary name in the same directory and then renamed with `os.replace`, which is
atomic on POSIX: a crash or a concurrent run never leaves a truncated file under the final name. Builders also hold
`cache_lock` so that concurrent runs (e.g. every DDP rank calling prepare_data) build an entry once while the others
wait and then reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders then duplicate work, still safely
    fcntl = None


HASH_LIMIT_BYTES = 256 * 2**20  # files larger than this are checked by size only: hashing them on every load costs


def file_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of the file's bytes, or None when it is larger than HASH_LIMIT_BYTES."""
    path = Path(path)
    if path.stat().st_size > HASH_LIMIT_BYTES:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problem(path: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """What is wrong with `path` against its `record` ({"num_bytes", "sha256"}), or None when it matches."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if "num_bytes" in record and size != record["num_bytes"]:
        return f"{path.name} has {size} bytes, its record says {record['num_bytes']}"
    if record.get("sha256") and size <= HASH_LIMIT_BYTES and file_sha256(path) != record["sha256"]:
        return f"{path.name} does not match its recorded SHA-256 (corrupted)"
    return None


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """What `file_problem` checks a file against later: its size and, when cheap, its SHA-256."""
    return {"num_bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


_RECORD_CHECKSUM = "record_sha256"


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write a cache entry's record (its meta.json) atomically, with a checksum of its own content."""
    body = {k: v for k, v in record.items() if k != _RECORD_CHECKSUM}
    text = json.dumps({**body, _RECORD_CHECKSUM: _json_sha256(body)}, indent=2)
    atomic_write_text(path, text)


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record in `path`, or None when it is missing, does not parse, or does not match its own checksum
    (records written before checksums existed are taken as they are)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    checksum = value.pop(_RECORD_CHECKSUM, None)
    if checksum is not None and checksum != _json_sha256(value):
        return None
    return value


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_key(obj: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable object, used as a cache directory name."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` atomically: `write` fills a temporary file that is then renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a shared cache should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def cache_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on `directory` (created if needed) for the duration of the block."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
