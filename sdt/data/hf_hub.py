"""Hugging Face datasets as a corpus: a hub id, a local directory of data files, or a `save_to_disk` directory."""

from __future__ import annotations

import logging
import math
from itertools import islice
from pathlib import Path
from typing import Any

from sdt.data.cache import cache_key
from sdt.data.corpus import LoadedCorpus
from sdt.data.text_files import iter_column
from sdt.errors import UserError

log = logging.getLogger(__name__)


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


class HFHubCorpus(LoadedCorpus):
    """A Hugging Face dataset, read up to max_train_docs / max_eval_docs documents per split."""

    name = "hf_hub"

    def __init__(
        self,
        name: str,
        config_name: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        streaming: bool = True,
        text_column: str = "text",
        max_train_docs: int | None = 20000,
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
        self._splits: dict[str, list[str]] | None = None

    def fingerprint(self) -> str:
        local_files = []
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
        import datasets

        where = f"data.name={self.dataset_name}"
        if self.local_path is not None and _is_saved_to_disk(self.local_path):
            loaded = datasets.load_from_disk(str(self.local_path))
            # A single saved Dataset has no split names: treat it as the train split.
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {self.split_names["train"]: loaded}
        try:
            loaded = datasets.load_dataset(
                self.dataset_name, self.config_name, streaming=self.streaming, cache_dir=self.cache_dir
            )
        except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            raise UserError(f"{where}: dataset not found ({e}); give a hub id or a local directory") from None
        except ValueError as e:
            if "config" in str(e).lower():  # e.g. a missing or unknown config name; the message lists the choices
                raise UserError(f"{where}, data.config_name={self.config_name}: {e}") from None
            raise
        return dict(loaded)

    def _take(self, ds: Any, limit: int | None, where: str) -> list[str]:
        columns = ds.column_names
        if columns is not None and self.text_column not in columns:
            raise UserError(
                f"{where} has no column {self.text_column!r} (columns: {', '.join(columns)}); set data.text_column"
            )
        if columns is not None and len(columns) > 1:
            ds = ds.select_columns([self.text_column])  # skip decoding columns we do not use
        return list(islice(iter_column(ds, self.text_column, where), limit))

    def _load(self) -> dict[str, list[str]]:
        available = self._open()
        where = f"data.name={self.dataset_name}"
        train_name = self.split_names["train"]
        if train_name not in available:
            raise UserError(f"{where} has no split {train_name!r} (data.train_split); splits: {', '.join(available)}")

        splits: dict[str, list[str]] = {}
        held_out = []
        for split in ("val", "test"):
            split_name = self.split_names[split]
            if split_name is not None and split_name in available:
                splits[split] = self._take(available[split_name], self.max_eval_docs, f"{where} split {split_name}")
            else:
                if split_name is not None:
                    log.warning(
                        "%s has no split %r; holding out %s documents from the train split", where, split_name, split
                    )
                held_out.append(split)

        limit = None if self.max_train_docs is None else self.max_train_docs + self.max_eval_docs * len(held_out)
        docs = self._take(available[train_name], limit, f"{where} split {train_name}")
        start = 0
        for split in held_out:
            n = min(self.max_eval_docs, max(1, math.floor(self.fractions[split] * len(docs))))
            n = n if self.fractions[split] > 0 else 0
            splits[split] = docs[start : start + n]
            start += n
        splits["train"] = docs[start:][: self.max_train_docs]
        if not splits["train"]:
            raise UserError(
                f"{where} split {train_name} has only {len(docs)} non-empty documents, too few to hold out "
                f"{', '.join(held_out)} and still train; add data or name a data.val_split / data.test_split"
            )
        return splits
