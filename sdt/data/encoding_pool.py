"""Tokenizing documents in parallel worker processes, answers in input order, memory bounded by a few chunks.

`sdt.data.shards` feeds a split's documents through an `EncodingPool` and writes the answers to shards; the worker
processes run `sdt/data/encode_worker.py`, which imports only numpy and `tokenizers`.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Self

import numpy as np

from sdt.data import encode_worker

CHUNK_DOCS = 256  # documents per message to a worker: large enough to amortise the pipe, small enough to stay cheap


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under SLURM or taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class EncodingPool:
    """`num_proc` tokenizing processes (`sdt/data/encode_worker.py`) fed chunks of documents round-robin; answers
    come back in input order. num_proc=1 tokenizes in this process.

    One chunk is in flight per worker, so memory stays at a few chunks whatever the corpus; a worker that dies
    raises here, and workers exit by themselves when this process dies (their input ends).
    """

    def __init__(self, tokenizer_json: str, eos_id: int, num_proc: int) -> None:
        self.eos_id = eos_id
        self.num_proc = num_proc
        self._workers: list[subprocess.Popen] = []
        if num_proc == 1:
            import tokenizers

            self._backend = tokenizers.Tokenizer.from_str(tokenizer_json)
            return
        # -I: an isolated interpreter (no PYTHONPATH, not the script's directory on sys.path), so the sibling
        # modules of the script never shadow a library and nothing of `sdt` is imported.
        cmd = [sys.executable, "-I", encode_worker.__file__]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        for _ in range(num_proc):
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            pickle.dump((tokenizer_json, eos_id), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            self._workers.append(proc)

    def encode(self, chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(tokens, tokens per document, bytes per document) of each chunk, in order."""
        if not self._workers:
            for docs in chunks:
                yield encode_worker.encode_documents(self._backend, docs, self.eos_id)
            return
        chunks = iter(chunks)
        pending: deque[subprocess.Popen] = deque()
        for worker in self._workers:  # prime every worker with one chunk
            if not self._send(worker, chunks):
                break
            pending.append(worker)
        while pending:
            worker = pending.popleft()
            answer = self._receive(worker)
            if self._send(worker, chunks):  # refill before handing the answer on: the worker keeps busy meanwhile
                pending.append(worker)
            yield answer

    @staticmethod
    def _send(worker: subprocess.Popen, chunks: Iterator[list[str]]) -> bool:
        docs = next(chunks, None)
        if docs is None:
            return False
        assert worker.stdin is not None
        pickle.dump(docs, worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        worker.stdin.flush()
        return True

    @staticmethod
    def _receive(worker: subprocess.Popen) -> Any:
        assert worker.stdout is not None
        try:
            return pickle.load(worker.stdout)
        except EOFError:
            raise RuntimeError(f"a tokenizing worker died (exit code {worker.wait()}); see its message above") from None

    def close(self) -> None:
        for worker in self._workers:
            if worker.stdin is not None:
                worker.stdin.close()
        for worker in self._workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()
        self._workers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunked(docs: Iterable[str], size: int = CHUNK_DOCS) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk
