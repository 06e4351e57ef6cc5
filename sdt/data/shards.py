"""Sharded token streams: a corpus of any size tokenized in parallel into fixed-size token shards, and read back.

Layout of an entry (one directory per corpus, tokenizer and shard size):

    manifest.json            what the entry holds, rewritten atomically after every shard
    train/shard-00000.bin    raw token ids (uint16 when the vocabulary fits, else uint32), `shard_tokens` each,
    train/shard-00001.bin    the last one shorter; every document is followed by the end-of-text id
    val/shard-00000.bin
    test/shard-00000.bin

Shard k of a split holds tokens [k * shard_tokens, (k + 1) * shard_tokens) of the split's stream, whatever the
number of worker processes: documents are handed to the workers in chunks and their answers are written in order.
The manifest records per shard its token count, size, SHA-256 and where the next shard starts in the document
stream (a document index and the tokens of that document already written), so that:

* a preparation that dies (SIGKILL, a full disk) resumes after its last complete shard and writes the same bytes
  as an uninterrupted run; the shard being written lives under a temporary name until it is complete;
* a shard that does not match its record (cut short, a flipped byte) is detected when the entry is loaded and
  rebuilt on its own, by re-tokenizing from its recorded start;
* memory stays bounded: a few chunks of documents in flight, one shard's hash state, nothing that grows with the
  corpus.

Training reads the shards through `ShardedTokens`, a read-only 1-D view over their memory maps.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sdt.data.cache import file_problem, read_record, write_record
from sdt.data.corpus import SPLITS
from sdt.data.encoding_pool import EncodingPool, chunked

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_FORMAT_VERSION = 1
DocumentSource = Callable[[int], Iterator[str]]  # documents of a split from the given index on


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_path(out_dir: Path, split: str, index: int) -> Path:
    return out_dir / split / f"shard-{index:05d}.bin"


# -------------------------------------------------------------------------------------------------------------------
# Writing the shards of one split.


class Progress:
    """A progress bar of one split (tokens/s and, when the size of the input is known, an ETA), and a log line per
    shard for logs that are not a terminal."""

    def __init__(self, split: str, total_bytes: int | None, done_bytes: int, done_tokens: int) -> None:
        from tqdm.auto import tqdm

        self.split = split
        self.start = time.perf_counter()
        self.tokens0 = done_tokens
        self.bar = tqdm(
            total=total_bytes,
            initial=done_bytes,
            unit="B",
            unit_scale=True,
            desc=f"tokenizing {split}",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def update(self, num_bytes: int, tokens_done: int) -> None:
        self.bar.update(num_bytes)
        self.bar.set_postfix_str(f"{tokens_done:,} tokens, {self.rate(tokens_done):,.0f} tokens/s", refresh=False)

    def rate(self, tokens_done: int) -> float:
        return (tokens_done - self.tokens0) / max(time.perf_counter() - self.start, 1e-9)

    def shard_done(self, index: int, tokens_done: int) -> None:
        eta = ""
        total, n = self.bar.total, self.bar.n
        if total and n and self.bar.format_dict.get("rate"):
            eta = f", ETA {max(0.0, (total - n) / self.bar.format_dict['rate']) / 60:.1f} min"
        log.info(
            "%s shard %d written: %s tokens so far, %.0f tokens/s%s",
            self.split,
            index,
            f"{tokens_done:,}",
            self.rate(tokens_done),
            eta,
        )

    def close(self) -> None:
        self.bar.close()


class ShardWriter:
    """Writes the shards of one split from a document stream, recording each in the manifest when it is complete.

    Started at a shard's recorded position, it re-tokenizes from that document on and drops the tokens that
    belong to earlier shards; with `only_one` it stops after that shard (rebuilding a damaged one).
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        manifest: dict[str, Any],
        start_shard: int,
        only_one: bool = False,
    ) -> None:
        self.out_dir = out_dir
        self.split = split
        self.manifest = manifest
        self.record = manifest["splits"][split]
        self.shard_tokens: int = manifest["shard_tokens"]
        self.dtype = np.dtype(manifest["dtype"])
        self.index = start_shard
        self.only_one = only_one
        start = self.record["shards"][start_shard - 1]["next"] if start_shard else _STREAM_START
        self.start_doc: int = start["doc"]
        self.skip: int = start["skip"]  # tokens of the first document that belong to earlier shards
        self.bytes_before: int = start["bytes"]  # bytes of the documents before start_doc
        self._file: BinaryIO | None = None
        self._fill = 0
        self._hash = hashlib.sha256()
        self.done = False

    def run(self, source: DocumentSource, pool: EncodingPool, progress: Progress | None) -> None:
        docs_seen = self.start_doc
        pos = self.index * self.shard_tokens - self.skip  # stream position of the next token tokenized
        for tokens, lengths, num_bytes in pool.encode(chunked(source(self.start_doc))):
            ends = np.cumsum(lengths)
            cum_bytes = np.cumsum(num_bytes)
            c = max(0, self.index * self.shard_tokens - pos)  # tokens of earlier shards, re-tokenized on resume
            while c < len(tokens):
                take = min(self.shard_tokens - self._fill, len(tokens) - c)
                self._append(tokens[c : c + take])
                c += take
                if self._fill == self.shard_tokens:
                    # Where the next shard starts: the first document not entirely written, and how much of it is.
                    j = int(np.searchsorted(ends, c, side="right"))
                    skip = c - (int(ends[j - 1]) if j else 0)
                    nxt = {"doc": docs_seen + j, "skip": skip, "bytes": self.bytes_before + _prefix(cum_bytes, j)}
                    self._finish_shard(nxt)
                    if self.only_one:
                        return
            pos += len(tokens)
            self.bytes_before += int(cum_bytes[-1])
            docs_seen += len(lengths)
            if progress is not None:
                progress.update(int(cum_bytes[-1]) + len(lengths), pos)
        if self._fill or self._file is not None or not self.record["shards"]:
            self._finish_shard({"doc": docs_seen, "skip": 0, "bytes": self.bytes_before})
        self.record.update(
            complete=True,
            num_docs=docs_seen,
            num_tokens=pos,
            num_bytes=self.bytes_before + docs_seen,  # each EOS stands for one byte of separator, as in the .npy path
        )
        write_record(self.out_dir / MANIFEST, self.manifest)
        self.done = True

    def _append(self, tokens: np.ndarray) -> None:
        if self._file is None:
            path = shard_path(self.out_dir, self.split, self.index)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(_partial_path(path), "wb")  # noqa: SIM115 - closed in _finish_shard
            self._hash = hashlib.sha256()
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._fill += len(tokens)

    def _finish_shard(self, nxt: dict[str, int]) -> None:
        """Make the shard being written final (fsync, rename) and record it, with where the next one starts."""
        path = shard_path(self.out_dir, self.split, self.index)
        if self._file is None:  # an empty split: one empty shard, so that every split has a file to map
            self._append(np.zeros(0, dtype=self.dtype))
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(_partial_path(path), path)
        entry = {
            "file": f"{self.split}/{path.name}",
            "num_tokens": self._fill,
            "num_bytes": self._fill * self.dtype.itemsize,
            "sha256": self._hash.hexdigest(),
            "next": nxt,
        }
        shards = self.record["shards"]
        if self.index < len(shards):
            if shards[self.index] != entry:
                log.warning(
                    "%s: rebuilt %s differs from its old record; rebuilding the shards after it", self.split, path
                )
                del shards[self.index :]
                self.record["complete"] = False
                self.only_one = False
            else:
                shards[self.index] = entry
        if self.index == len(shards):
            shards.append(entry)
        write_record(self.out_dir / MANIFEST, self.manifest)
        self.index += 1
        self._fill = 0


_STREAM_START = {"doc": 0, "skip": 0, "bytes": 0}


def _prefix(cum: np.ndarray, j: int) -> int:
    return int(cum[j - 1]) if j else 0


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


# -------------------------------------------------------------------------------------------------------------------
# The entry: building, checking, healing.


def new_manifest(vocab_size: int, shard_tokens: int) -> dict[str, Any]:
    return {
        "version": SHARD_FORMAT_VERSION,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        "splits": {s: {"complete": False, "shards": []} for s in SPLITS},
    }


def load_manifest(out_dir: Path, vocab_size: int, shard_tokens: int) -> dict[str, Any]:
    """The entry's manifest, or a new one when there is none or it does not belong to these settings."""
    manifest = read_record(out_dir / MANIFEST)
    fresh = new_manifest(vocab_size, shard_tokens)
    if manifest is None or any(manifest.get(k) != fresh[k] for k in ("version", "dtype", "vocab_size", "shard_tokens")):
        if (out_dir / MANIFEST).exists():
            log.warning("%s is unreadable or from other settings: preparing the entry again", out_dir / MANIFEST)
        return fresh
    return manifest


def damaged_shards(out_dir: Path, manifest: dict[str, Any], split: str) -> list[tuple[int, str]]:
    """(index, what is wrong) of every recorded shard of `split` that does not match its record."""
    damaged = []
    for i, entry in enumerate(manifest["splits"][split]["shards"]):
        problem = file_problem(out_dir / entry["file"], entry)
        if problem is not None:
            damaged.append((i, problem))
    return damaged


def entry_problem(out_dir: Path) -> str | None:
    """What keeps the entry `out_dir` from being trained on (incomplete, a shard that does not match its record),
    or None when it is intact. Reads every shard once (SHA-256, about 1 s per GB)."""
    manifest = read_record(out_dir / MANIFEST)
    if manifest is None:
        return "no complete entry" if not (out_dir / MANIFEST).exists() else f"{MANIFEST} is unreadable or corrupted"
    for split in SPLITS:
        record = manifest.get("splits", {}).get(split)
        if not isinstance(record, dict) or not record.get("complete"):
            return f"the {split} split is not complete"
        damaged = damaged_shards(out_dir, manifest, split)
        if damaged:
            return damaged[0][1]
    return None


def build_shards(
    out_dir: Path,
    sources: dict[str, DocumentSource],
    tokenizer_json: str,
    eos_id: int,
    vocab_size: int,
    shard_tokens: int,
    num_proc: int,
    total_bytes: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Make `out_dir` hold a complete, intact entry: resume an interrupted preparation, rebuild damaged shards,
    prepare what is missing. The caller holds the entry's lock. Returns the manifest."""
    manifest = load_manifest(out_dir, vocab_size, shard_tokens)
    for stale in out_dir.glob("*/.shard-*.partial"):  # the shard a killed run was writing
        stale.unlink()
    with EncodingPool(tokenizer_json, eos_id, num_proc) as pool:
        for split in SPLITS:
            record = manifest["splits"][split]
            for index, problem in damaged_shards(out_dir, manifest, split):
                if index >= len(record["shards"]):
                    break  # dropped by the rebuild of an earlier shard
                log.warning("%s is damaged (%s): rebuilding it", out_dir / record["shards"][index]["file"], problem)
                ShardWriter(out_dir, split, manifest, index, only_one=True).run(sources[split], pool, None)
            if record["complete"]:
                continue
            start = len(record["shards"])
            if start:
                log.info("resuming the %s split after its %d complete shard(s)", split, start)
            writer = ShardWriter(out_dir, split, manifest, start)
            done_tokens = start * shard_tokens
            progress = Progress(split, (total_bytes or {}).get(split), writer.bytes_before, done_tokens)
            try:
                writer.run(sources[split], pool, progress)
            finally:
                progress.close()
            log.info(
                "prepared %s: %s documents -> %s tokens in %d shard(s)",
                split,
                f"{record['num_docs']:,}",
                f"{record['num_tokens']:,}",
                len(record["shards"]),
            )
    return manifest


# -------------------------------------------------------------------------------------------------------------------
# Reading.


class ShardedTokens:
    """A read-only 1-D token array over memory-mapped shards (or any 1-D arrays), sliced without copying unless a
    slice crosses a shard boundary. Supports len(), integer and contiguous slice indexing, and np.asarray()."""

    def __init__(self, parts: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.parts = [p for p in parts if len(p)] or parts[:1]
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self._bounds = self.offsets.tolist()  # bisect on a list: cheaper per block than a numpy call
        # Plain ndarray views of the memory maps: slicing an np.memmap builds a memmap object, which costs more.
        self._arrays = [np.asarray(p) for p in self.parts]
        total = int(self.offsets[-1])
        self.start = start
        self.stop = total if stop is None else stop
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    @classmethod
    def open(cls, out_dir: Path, manifest: dict[str, Any], split: str) -> ShardedTokens:
        dtype = np.dtype(manifest["dtype"])
        parts = []
        for entry in manifest["splits"][split]["shards"]:
            path = out_dir / entry["file"]
            parts.append(np.memmap(path, dtype=dtype, mode="r") if entry["num_tokens"] else np.zeros(0, dtype=dtype))
        return cls(parts)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def ndim(self) -> int:
        return 1

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            return self._view(self.start + start, self.start + max(start, stop))
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(key)
        return self._read(self.start + i, self.start + i + 1)[0]

    def _view(self, start: int, stop: int) -> np.ndarray:
        first = bisect.bisect_right(self._bounds, start) - 1
        if 0 <= first < len(self._arrays) and stop <= self._bounds[first + 1]:
            base = self._bounds[first]
            return self._arrays[first][start - base : stop - base]  # within one shard: a view of its memory map
        return self._read(start, stop)

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = []
        first = max(0, bisect.bisect_right(self._bounds, start) - 1)
        for k in range(first, len(self._arrays)):
            lo, hi = self._bounds[k], self._bounds[k + 1]
            if lo >= stop:
                break
            out.append(self._arrays[k][max(start, lo) - lo : min(stop, hi) - lo])
        return np.concatenate(out) if out else np.zeros(0, dtype=self.dtype)

    def slice_view(self, start: int, stop: int | None = None) -> ShardedTokens:
        """Tokens [start, stop) as a ShardedTokens (no copy, whatever the span)."""
        stop = len(self) if stop is None else stop
        return ShardedTokens(self.parts, self.start + start, self.start + stop)

    def chunks(self) -> Iterator[np.ndarray]:
        """The tokens as consecutive arrays, one per shard, for passes over a split that must not load it whole."""
        for k in range(len(self.parts)):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            a, b = max(lo, self.start), min(hi, self.stop)
            if a < b:
                yield self.parts[k][a - lo : b - lo]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(self.start, self.stop)
        return out.astype(dtype) if dtype is not None else out
