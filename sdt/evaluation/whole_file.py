"""Whole-file perplexity (`evaluate.py ... splits=[all]`): every token of the given files, in sliding windows.

Each document (a .txt file, or a row of a .jsonl/.parquet file) is scored on its own, after the end-of-text token
that separates documents in training, so its first token is scored too. Windows of `seq_len` tokens start every
`stride` tokens; each window scores only the tokens no earlier window scored, with the rest of the window as
context (as in the Hugging Face perplexity guide). `stride = seq_len` gives disjoint windows; a smaller stride gives
every scored token more context, at seq_len / stride times the cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sdt.common.errors import UserError
from sdt.data.corpora import build_corpus


def sliding_windows(ids: Sequence[int], seq_len: int, stride: int) -> Iterator[tuple[list[int], list[int]]]:
    """(input ids, targets) per window of a token sequence; targets are the next tokens, -100 where not scored.

    Token ids[t] for t >= 1 is scored exactly once, by the first window that reaches it.
    """
    if not 1 <= stride <= seq_len:
        raise UserError(f"stride={stride} must be in [1, data.seq_len={seq_len}]")
    n = len(ids) - 1  # tokens to predict: ids[1:]
    scored = 0  # ids[1 .. scored] are done
    for begin in range(0, max(n, 1), stride):
        end = min(begin + seq_len, n)
        if end <= scored:
            continue
        inputs = list(ids[begin:end])
        targets = list(ids[begin + 1 : end + 1])
        fresh = end - scored
        targets[: len(targets) - fresh] = [-100] * (len(targets) - fresh)
        yield inputs, targets
        scored = end
        if end == n:
            break


def window_batches(
    documents: Sequence[Sequence[int]], eos_id: int, seq_len: int, stride: int, batch_size: int
) -> list[dict[str, Any]]:
    """The windows of every document (each prefixed with `eos_id`) as batches of `run_split`'s form; windows of one
    length share batches (full windows, then each document's shorter last one)."""
    by_length: dict[int, list[tuple[list[int], list[int]]]] = {}
    for doc in documents:
        for window in sliding_windows([eos_id, *doc], seq_len, stride):
            by_length.setdefault(len(window[0]), []).append(window)
    batches = []
    for length in sorted(by_length, reverse=True):
        windows = by_length[length]
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            batches.append(
                {
                    "input_ids": torch.tensor([w[0] for w in chunk], dtype=torch.long),
                    "targets": torch.tensor([w[1] for w in chunk], dtype=torch.long),
                }
            )
    return batches


def read_documents(data_cfg: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Per file of `data.paths`: its name, UTF-8 bytes and tokenised documents (data=text_files only)."""
    if data_cfg.corpus != "text_files":
        raise UserError(
            f"splits=[all] scores whole files: pass data=text_files 'data.paths=[...]' (got data.corpus="
            f"{data_cfg.corpus}; its own splits are val and test)"
        )
    files = []
    for path, docs in build_corpus(data_cfg).read_files():
        if docs:
            files.append(
                {
                    "file": str(path),
                    "bytes": sum(len(d.encode("utf-8")) for d in docs),
                    "documents": tokenizer.encode_batch(docs),
                }
            )
    if not files:
        raise UserError("data.paths holds no text to score")
    return files
