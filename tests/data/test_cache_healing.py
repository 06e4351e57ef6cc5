"""A damaged cache entry (cut short by an interrupted copy or a full disk, or with flipped bytes) is detected when it
is loaded, rebuilt with a warning, and the run goes on with the same data as before the damage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from sdt.data import LMDataModule
from sdt.data.corpus import SPLITS
from sdt.data.tokenizer import bpe_cache_path
from tests.data.test_datamodule import make_cfg


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(path: Path) -> None:
    """Same size, one byte changed in the middle: only a content check finds it."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


# (cache, file): the tokenizer and its record, a token stream, and the streams' record.
CACHE_FILES = [
    ("tokenizer", "tokenizer.json"),
    ("tokenizer", "meta.json"),
    ("tokens", "train.npy"),
    ("tokens", "val.npy"),
    ("tokens", "meta.json"),
]


def entry_dir(dm: LMDataModule, cache: str) -> Path:
    return dm.tokens_dir if cache == "tokens" else bpe_cache_path(dm.cfg.tokenizer, dm.corpus, dm.cache_dir).parent


def loaded(cfg) -> LMDataModule:
    dm = LMDataModule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("damage", [truncate, corrupt])
@pytest.mark.parametrize("cache, name", CACHE_FILES)
def test_damaged_cache_file_is_rebuilt_with_a_warning(txt_corpus, tmp_path, caplog, cache, name, damage):
    cfg = make_cfg(txt_corpus, tmp_path)
    first = loaded(cfg)
    tokenizer = first.tokenizer.to_json()
    streams = {s: np.array(first.token_stream(s)) for s in SPLITS}
    stats = first.split_stats
    damaged = entry_dir(first, cache) / name
    before = damaged.read_bytes()
    damage(damaged)
    assert damaged.read_bytes() != before

    with caplog.at_level(logging.WARNING, logger="sdt.data"):
        healed = loaded(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0] and name in warnings[0], warnings
    assert healed.tokenizer.to_json() == tokenizer
    assert all(np.array_equal(healed.token_stream(s), streams[s]) for s in SPLITS)
    assert healed.split_stats == stats
    assert damaged.read_bytes() == before  # rebuilt as it was: building is deterministic

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdt.data"):
        loaded(cfg)  # intact again: loaded without a rebuild
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_entry_written_before_records_is_adopted_not_rebuilt(txt_corpus, tmp_path, caplog):
    cfg = make_cfg(txt_corpus, tmp_path)
    first = loaded(cfg)
    record = entry_dir(first, "tokenizer") / "meta.json"
    record.unlink()  # as an older version of sdt left its tokenizer cache
    with caplog.at_level(logging.INFO, logger="sdt.data"):
        again = loaded(cfg)
    assert "trained BPE" not in caplog.text and "damaged" not in caplog.text
    assert again.tokenizer.to_json() == first.tokenizer.to_json()
    assert record.is_file()  # and it has its record now


def test_training_after_a_token_stream_was_cut_short_trains_normally(tmp_path, corpus_files, caplog):
    from sdt.training.train import train
    from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data

    cache = tmp_path / "cache"
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)]
    first = train(compose_cfg("train", overrides, tmp_path / "first", cache))
    (stream,) = cache.glob("tokens/*/train.npy")
    truncate(stream)  # what an interrupted copy or a full disk leaves: `mmap length is greater than file size`
    with caplog.at_level(logging.WARNING, logger="sdt.data"):
        second = train(compose_cfg("train", overrides, tmp_path / "second", cache))
    assert "token cache" in caplog.text and "train.npy" in caplog.text and "rebuilding" in caplog.text
    assert second["global_step"] == first["global_step"] == 6
    assert second["metrics"]["val/loss"] == pytest.approx(first["metrics"]["val/loss"], abs=1e-6)
