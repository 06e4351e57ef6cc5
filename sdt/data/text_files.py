"""Local `.txt` / `.jsonl` / `.parquet` files as a corpus, split by document hash or by characters (the rules:
`sdt/data/corpora.py`)."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from sdt.common.errors import UserError
from sdt.data.cache import cache_key
from sdt.data.corpus import SPLITS, LoadedCorpus

TEXT_FILE_EXTENSIONS = (".txt", ".jsonl", ".parquet")
MIN_DOCS_FOR_HASH_SPLIT = 20
SPLIT_SEED = 1234


def _expand_paths(patterns: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise UserError(f"data.paths: the glob {pattern!r} matches no file")
            files.extend(p for p in matches if p.is_file())
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_FILE_EXTENSIONS)
            if not found:
                raise UserError(f"data.paths: the directory {pattern} holds no {'/'.join(TEXT_FILE_EXTENSIONS)} file")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise UserError(f"data.paths: {pattern} does not exist")
    for f in files:
        if f.suffix not in TEXT_FILE_EXTENSIONS:
            raise UserError(
                f"data.paths: {f} has an unsupported extension; use one of {', '.join(TEXT_FILE_EXTENSIONS)}"
            )
    return list(dict.fromkeys(files))  # drop duplicates from overlapping globs, keep order


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8") from None
    # A BOM or Windows line endings should not change the tokens of otherwise identical text.
    return [text.removeprefix("\ufeff").replace("\r\n", "\n")]


def iter_column(rows: Iterable[dict[str, Any]], column: str, where: str) -> Iterator[str]:
    """Yield the non-empty strings of `column`, skipping nulls (a jsonl line without the field reads as null)."""
    for row in rows:
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(f"{where}: column {column!r} must hold strings, got {type(value).__name__}")
        if value.strip():
            yield value


def _read_table(path: Path, column: str) -> list[str]:
    import datasets

    # Streaming reads the file in chunks without writing an Arrow copy into the HF cache.
    builder = "json" if path.suffix == ".jsonl" else "parquet"
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        if ds.column_names is not None and column not in ds.column_names:
            raise UserError(
                f"{path} has no column {column!r} (columns: {', '.join(ds.column_names)}); set data.text_column"
            )
        docs = list(iter_column(ds, column, str(path)))
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8") from None
    # pyarrow / json parse errors come in many types: name the file and keep the parser's explanation.
    except Exception as e:  # noqa: BLE001
        kind = "JSON Lines" if builder == "json" else "Parquet"
        raise UserError(f"could not read {path} as {kind}: {type(e).__name__}: {e}") from None
    if ds.column_names is None and not docs and path.stat().st_size > 0:
        # Schema unknown until read: a non-empty file that yielded nothing lacks the column.
        raise UserError(f"{path} has no column {column!r}; set data.text_column")
    return docs


def _doc_hash_unit(doc: str, seed: int) -> float:
    """A uniform number in [0, 1) determined by the document's content and the seed."""
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64


def hash_split(docs: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Assign each document to a split by a seeded hash of its content (see the module docstring)."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc in docs:
        u = _doc_hash_unit(doc, seed)
        split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        out[split].append(doc)
    return out


def _cut_near(text: str, target: int, lo: int, hi: int) -> int:
    """A cut position in [lo, hi], at the start of a line nearest `target` if one lies in range, else at `target`."""
    target = min(max(target, lo), hi)
    candidates = []
    before = text.rfind("\n", max(lo - 1, 0), target)  # a newline at i means a line starts at i + 1
    if before != -1 and lo <= before + 1 <= hi:
        candidates.append(before + 1)
    after = text.find("\n", target, hi)
    if after != -1 and lo <= after + 1 <= hi:
        candidates.append(after + 1)
    return min(candidates, key=lambda c: abs(c - target)) if candidates else target


def line_split(text: str, fractions: tuple[float, float, float]) -> tuple[str, str, str]:
    """Cut `text` into consecutive train/val/test pieces of about the given shares, at line boundaries.

    A piece with a non-zero share is non-empty whenever the text has enough characters for all of them.
    """
    n = len(text)
    cuts = [0]
    shares_after = [sum(1 for f in fractions[i + 1 :] if f > 0) for i in range(len(fractions))]
    position = 0.0
    for i, share in enumerate(fractions[:-1]):
        position += share
        if share == 0:
            cuts.append(cuts[-1])
            continue
        lo = min(cuts[-1] + 1, n)  # this piece gets at least one character...
        hi = max(n - shares_after[i], lo)  # ...and leaves one for every later non-empty piece
        cuts.append(_cut_near(text, round(position * n), lo, hi))
    cuts.append(n)
    train, val, test = (text[a:b] for a, b in pairwise(cuts))
    return train, val, test


class TextFilesCorpus(LoadedCorpus):
    """Local `.txt` / `.jsonl` / `.parquet` files (globs and directories allowed), split as the module docstring says."""

    name = "text_files"

    def __init__(
        self,
        paths: list[str],
        text_column: str = "text",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = SPLIT_SEED,
    ) -> None:
        if not paths:
            raise UserError("data.paths must list at least one file or glob when data.corpus=text_files")
        self.files = _expand_paths(paths)
        self.text_column = text_column
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self._splits: dict[str, list[str]] | None = None

    def fingerprint(self) -> str:
        # Size and mtime stand in for content: hashing gigabytes on every run would defeat the cache.
        files = []
        for f in self.files:
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return cache_key(
            {
                "corpus": self.name,
                "files": files,
                "text_column": self.text_column,
                "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction,
                "seed": self.seed,
                "min_docs_for_hash_split": MIN_DOCS_FOR_HASH_SPLIT,
            },
            length=64,
        )

    def read_files(self) -> list[tuple[Path, list[str]]]:
        """Every file with its non-empty documents, unsplit (a .txt file is one document; a table one per row)."""
        out = []
        for f in self.files:
            docs = _read_txt(f) if f.suffix == ".txt" else _read_table(f, self.text_column)
            out.append((f, [d for d in docs if d.strip()]))
        return out

    def _load(self) -> dict[str, list[str]]:
        docs = [d for _, file_docs in self.read_files() for d in file_docs]
        if not docs:
            names = ", ".join(str(f) for f in self.files)
            raise UserError(f"data.paths holds no text (every document is empty or whitespace): {names}")

        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        if len(docs) >= MIN_DOCS_FOR_HASH_SPLIT:
            splits = hash_split(docs, self.val_fraction, self.test_fraction, self.seed)
            if all(splits[s] for s in SPLITS if fractions.get(s, 1.0) > 0):
                return splits
        shares = (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)
        splits = {s: [] for s in SPLITS}
        for doc in docs:
            for split, piece in zip(SPLITS, line_split(doc, shares), strict=True):
                if piece:
                    splits[split].append(piece)
        return splits
