"""Small helpers for the on-disk caches (tokenizers, token streams).

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
