"""Hugging Face datasets as a corpus: a hub id, a local directory of data files, or a `save_to_disk` directory."""

from __future__ import annotations

import glob
import logging
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from sdt.common.errors import UserError
from sdt.data.cache import cache_key
from sdt.data.corpus import SPLITS, LoadedCorpus, check_split
from sdt.data.text_files import iter_column

log = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _glob_files(pattern: str) -> list[Path]:
    """The files a glob of local shards names (e.g. data/*.jsonl.gz is not supported: one of .jsonl / .json /
    .parquet / .txt / .csv), all of one type."""
    files = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"data.name: the glob {pattern!r} matches no file")
    kinds = {f.suffix for f in files}
    if not kinds <= set(_BUILDERS) or len({_BUILDERS[k] for k in kinds}) > 1:
        raise UserError(
            f"data.name: the glob {pattern!r} must match files of one type ({', '.join(_BUILDERS)}), "
            f"got {', '.join(sorted(kinds))}"
        )
    return files


class HFHubCorpus(LoadedCorpus):
    """A Hugging Face dataset: a hub id, a local directory of data files, a glob of local shards, or a
    `save_to_disk` directory; streamed, up to max_train_docs / max_eval_docs documents per split."""

    name = "hf_hub"
    sharded = True

    def __init__(
        self,
        name: str,
        config_name: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        streaming: bool = True,
        text_column: str = "text",
        max_train_docs: int | None = None,
        max_eval_docs: int = 500,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        cache_dir: str | None = None,
    ) -> None:
        self.dataset_name = name
        self.config_name = config_name
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.streaming = streaming
        self.text_column = text_column
        self.max_train_docs = max_train_docs
        self.max_eval_docs = max_eval_docs
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.cache_dir = cache_dir  # HF datasets cache; None = the library default, shared with other projects
        self.local_path = Path(name).expanduser() if Path(name).expanduser().exists() else None
        self.data_files = _glob_files(name) if self.local_path is None and glob.has_magic(name) else None
        self._splits: dict[str, list[str]] | None = None
        self._available: dict[str, Any] | None = None
        self._spans: dict[str, tuple[str, int, int | None]] | None = None

    def fingerprint(self) -> str:
        local_files = []
        if self.data_files is not None:
            local_files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.data_files]
        if self.local_path is not None:
            # A local dataset can change under the same name; its file listing tracks that.
            root = self.local_path.resolve()
            for p in sorted(root.rglob("*") if root.is_dir() else [root]):
                if p.is_file():
                    st = p.stat()
                    local_files.append(
                        [str(p.relative_to(root)) if root.is_dir() else p.name, st.st_size, st.st_mtime_ns]
                    )
        return cache_key(
            {
                "corpus": self.name,
                "name": str(self.local_path.resolve()) if self.local_path else self.dataset_name,
                "local_files": local_files,
                "config_name": self.config_name,
                "splits": self.split_names,
                "text_column": self.text_column,
                "max_train_docs": self.max_train_docs,
                "max_eval_docs": self.max_eval_docs,
                "fractions": self.fractions,
            },
            length=64,
        )

    def _open(self) -> dict[str, Any]:
        """Map split name -> Dataset or IterableDataset, without reading documents yet."""
        if self._available is not None:
            return self._available
        import datasets

        where = f"data.name={self.dataset_name}"
        if self.local_path is not None and _is_saved_to_disk(self.local_path):
            loaded = datasets.load_from_disk(str(self.local_path))
            # A single saved Dataset has no split names: treat it as the train split.
            self._available = (
                dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {self.split_names["train"]: loaded}
            )
            return self._available
        try:
            if self.data_files is not None:  # a glob of local shards: one builder for the file type
                builder = _BUILDERS[self.data_files[0].suffix]
                files = [str(f) for f in self.data_files]
                loaded = datasets.load_dataset(
                    builder, data_files={self.split_names["train"]: files}, streaming=self.streaming
                )
            else:
                loaded = datasets.load_dataset(
                    self.dataset_name, self.config_name, streaming=self.streaming, cache_dir=self.cache_dir
                )
        except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            raise UserError(f"{where}: dataset not found ({e}); give a hub id or a local directory") from None
        except ValueError as e:
            if "config" in str(e).lower():  # e.g. a missing or unknown config name; the message lists the choices
                raise UserError(f"{where}, data.config_name={self.config_name}: {e}") from None
            raise
        self._available = dict(loaded)
        return self._available

    def _column(self, split_name: str) -> Iterator[str]:
        """The non-empty documents of the dataset split `split_name`, streamed."""
        where = f"data.name={self.dataset_name} split {split_name}"
        ds = self._open()[split_name]
        columns = ds.column_names
        if columns is not None and self.text_column not in columns:
            raise UserError(
                f"{where} has no column {self.text_column!r} (columns: {', '.join(columns)}); set data.text_column"
            )
        if columns is not None and len(columns) > 1:
            ds = ds.select_columns([self.text_column])  # skip decoding columns we do not use
        return iter_column(ds, self.text_column, where)

    def _layout(self) -> dict[str, tuple[str, int, int | None]]:
        """Per split: (dataset split, first document, end or None), documents counted after empty ones are dropped.

        Held-out splits take the first documents of the train split, each the val/test fraction of the documents
        read, at least 1 and at most max_eval_docs: counting up to max_eval_docs / fraction documents settles the
        count without holding them, so the train split streams whatever its size.
        """
        if self._spans is not None:
            return self._spans
        available = self._open()
        where = f"data.name={self.dataset_name}"
        train_name = self.split_names["train"]
        if train_name not in available:
            raise UserError(f"{where} has no split {train_name!r} (data.train_split); splits: {', '.join(available)}")
        spans: dict[str, tuple[str, int, int | None]] = {}
        held_out = []
        for split in ("val", "test"):
            split_name = self.split_names[split]
            if split_name is not None and split_name in available:
                spans[split] = (split_name, 0, self.max_eval_docs)
            else:
                if split_name is not None:
                    log.warning(
                        "%s has no split %r; holding out %s documents from the train split", where, split_name, split
                    )
                held_out.append(split)
        limit = None if self.max_train_docs is None else self.max_train_docs + self.max_eval_docs * len(held_out)
        # Documents that settle every held-out count: floor(fraction * n) reaches max_eval_docs from here on.
        enough = max(
            (math.ceil(self.max_eval_docs / self.fractions[s]) for s in held_out if self.fractions[s]), default=0
        )
        peek = enough if limit is None else min(limit, enough)
        n_read = sum(1 for _ in islice(self._column(train_name), peek)) if held_out else 0
        start = 0
        for split in held_out:
            n = min(self.max_eval_docs, max(1, math.floor(self.fractions[split] * n_read)))
            n = n if self.fractions[split] > 0 else 0
            spans[split] = (train_name, start, start + n)
            start += n
        spans["train"] = (train_name, start, None if self.max_train_docs is None else start + self.max_train_docs)
        if held_out and n_read <= start:
            raise UserError(
                f"{where} split {train_name} has only {n_read} non-empty documents, too few to hold out "
                f"{', '.join(held_out)} and still train; add data or name a data.val_split / data.test_split"
            )
        self._spans = spans
        return spans

    def iter_documents(self, split: str, skip: int = 0) -> Iterator[str]:
        """The documents of `split` from its `skip`-th on, streamed (a hub dataset with data.streaming=true is
        read as it downloads; local files are read in chunks)."""
        check_split(split)
        split_name, start, stop = self._layout()[split]
        docs = islice(self._column(split_name), start + skip, stop)
        if split == "train":
            return self._non_empty_train(docs, skip)
        return docs

    def _non_empty_train(self, docs: Iterator[str], skip: int) -> Iterator[str]:
        n = 0
        for n, doc in enumerate(docs, 1):
            yield doc
        if n == 0 and skip == 0:
            split_name = self.split_names["train"]
            raise UserError(
                f"data.name={self.dataset_name} split {split_name} has no non-empty documents to train on"
                f" (column {self.text_column!r})"
            )

    def size_hint(self, split: str) -> int | None:
        """Bytes of text `split` will roughly yield, when cheap to know (local files, uncapped train): drives the
        progress bar's ETA."""
        if split != "train" or self.max_train_docs is not None:
            return None
        files = self.data_files or (
            [p for p in self.local_path.rglob("*") if p.is_file()]
            if self.local_path and self.local_path.is_dir()
            else ([self.local_path] if self.local_path else [])
        )
        size = sum(p.stat().st_size for p in files if p.suffix in _BUILDERS)
        return size or None

    def _load(self) -> dict[str, list[str]]:
        return {split: list(self.iter_documents(split)) for split in SPLITS}
