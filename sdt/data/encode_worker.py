"""A tokenizing worker process of the sharded preparation (`sdt/data/shards.py`), run as a script.

It imports only numpy and `tokenizers` (never `sdt`, torch or Lightning), so each worker costs tens of MB whatever
the process that starts it has loaded. Protocol, over its stdin / a duplicate of its stdout, one pickle per message:
the parent sends the tokenizer's JSON and the end-of-text id, then lists of documents; for each list the worker
answers (tokens, tokens per document, UTF-8 bytes per document), where `tokens` is every document's ids followed by
the end-of-text id, as one uint32 array. It exits at end of input, e.g. when its parent dies.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np


def encode_documents(backend, docs: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, tokens per document, UTF-8 bytes per document) of `docs`, each document followed by `eos_id`.

    One document at a time on one thread: a worker is one core, and a document's ids never depend on its neighbours.
    """
    ids = [backend.encode(d, add_special_tokens=False).ids for d in docs]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    for x, end in zip(ids, ends, strict=True):
        tokens[end - len(x) - 1 : end - 1] = x
        tokens[end - 1] = eos_id
    num_bytes = np.fromiter((len(d.encode("utf-8")) for d in docs), dtype=np.int64, count=len(docs))
    return tokens, lengths, num_bytes


def main() -> None:
    import tokenizers

    # Stray prints of a library must not corrupt the protocol: answers go to a private copy of stdout.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    source = sys.stdin.buffer
    tokenizer_json, eos_id = pickle.load(source)
    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    while True:
        try:
            docs = pickle.load(source)
        except EOFError:
            return
        pickle.dump(encode_documents(backend, docs, eos_id), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    main()
