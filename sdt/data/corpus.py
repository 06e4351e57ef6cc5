"""The corpus interface: a named source of documents with a fixed train / val / test split (the split rules of
each corpus: `sdt/data/corpora.py`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from itertools import islice

SPLITS = ("train", "val", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class Corpus(ABC):
    """A named source of documents with a fixed train/val/test split."""

    name: str
    # Large corpora (the hub, local files of any size) are streamed into token shards by parallel workers
    # (`sdt/data/shards.py`); small ones are tokenized in one go into one .npy per split.
    sharded: bool = False

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable hash of everything that determines the text of the splits; used as a cache key."""

    @abstractmethod
    def documents(self, split: str) -> list[str]:
        """The documents of `split` (train | val | test), in a deterministic order."""

    def iter_documents(self, split: str, skip: int = 0) -> Iterator[str]:
        """The documents of `split` from its `skip`-th on; corpora too large for a list stream them."""
        return islice(self.documents(split), skip, None)


class LoadedCorpus(Corpus):
    """A corpus whose splits are read once, on first use, by `_load` (reading can be slow: files, the hub)."""

    _splits: dict[str, list[str]] | None = None

    @abstractmethod
    def _load(self) -> dict[str, list[str]]:
        """Read the corpus and return its documents per split."""

    def documents(self, split: str) -> list[str]:
        check_split(split)
        if self._splits is None:
            self._splits = self._load()
        return self._splits[split]
