import numpy as np
import pytest
import torch

from sdt.common.errors import UserError
from sdt.data import DataConfig, LMDataModule, TextFilesCorpus, Tokenizer
from tests.data.data_helpers import make_text

T = 16


def make_cfg(paths, tmp_path, **overrides) -> DataConfig:
    d = {
        "corpus": "text_files",
        "paths": paths,
        "seq_len": T,
        "batch_size": 4,
        "eval_batch_size": 3,
        "cache_dir": str(tmp_path / "cache"),
        "val_fraction": 0.1,
        "test_fraction": 0.1,
        "tokenizer": {"vocab_size": 300},
    } | overrides
    return DataConfig.from_dict(d)


def test_batches_and_shift(txt_corpus, tmp_path):
    dm = LMDataModule(make_cfg(txt_corpus, tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size <= 300 and dm.eos_id == 0

    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, T)
    assert batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])

    val = dm.val_dataloader()
    stream = torch.from_numpy(val.dataset.tokens.astype(np.int64))
    batch = next(iter(val))
    assert batch["input_ids"].shape == (3, T)
    for i in range(3):  # unshuffled: block i starts at i*T, targets are the next tokens of the stream
        assert torch.equal(batch["input_ids"][i], stream[i * T : i * T + T])
        assert torch.equal(batch["targets"][i], stream[i * T + 1 : i * T + T + 1])
    assert len(val.dataset) == (len(stream) - 1) // T

    # Every token but the first is a target exactly once.
    targets = torch.cat([b["targets"].reshape(-1) for b in dm.test_dataloader()])
    test_stream = dm.test_dataloader().dataset.tokens
    assert torch.equal(targets, torch.from_numpy(test_stream[1 : len(targets) + 1].astype(np.int64)))


def test_streams_match_documents_and_stats(txt_corpus, tmp_path):
    cfg = make_cfg(txt_corpus, tmp_path)
    dm = LMDataModule(cfg)
    dm.setup()
    docs = TextFilesCorpus(txt_corpus, val_fraction=0.1, test_fraction=0.1).documents("val")
    expected = "".join(d + "<|endoftext|>" for d in docs)
    assert dm.tokenizer.decode(dm.val_dataloader().dataset.tokens) == expected
    assert dm.sample_text("val", 50) == expected[:50]
    stats = dm.split_stats
    assert stats["val"]["num_bytes"] == sum(len(d.encode()) + 1 for d in docs)
    assert stats["train"]["bytes_per_token"] == pytest.approx(
        stats["train"]["num_bytes"] / stats["train"]["num_tokens"]
    )
    assert all(stats[s]["num_tokens"] > T for s in stats)


def test_shuffle_is_seeded(txt_corpus, tmp_path):
    def first_batch(seed):
        dm = LMDataModule(make_cfg(txt_corpus, tmp_path, seed=seed))
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_token_cache_written_once_and_reused(txt_corpus, tmp_path, monkeypatch):
    cfg = make_cfg(txt_corpus, tmp_path)
    dm = LMDataModule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("fit")  # idempotent
    files = sorted(f for f in dm.tokens_dir.iterdir() if not f.name.startswith("."))  # skip the lock file
    assert [f.name for f in files] == ["meta.json", "test.npy", "train.npy", "val.npy"]
    assert np.load(dm.tokens_dir / "train.npy").dtype == np.uint16
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("cached data should be reused")

    monkeypatch.setattr(TextFilesCorpus, "documents", fail)  # neither tokenizer nor streams may be rebuilt
    monkeypatch.setattr(Tokenizer, "encode_batch", fail)
    dm2 = LMDataModule(cfg)
    dm2.prepare_data()
    dm2.setup("fit")
    assert dm2.tokens_dir == dm.tokens_dir
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert len(dm2.train_dataloader().dataset) == len(dm.train_dataloader().dataset)


def test_given_tokenizer_is_used(txt_corpus, tmp_path):
    dm = LMDataModule(make_cfg(txt_corpus, tmp_path))
    tok = Tokenizer.from_json(dm.tokenizer.to_json())
    dm2 = LMDataModule(make_cfg(txt_corpus, tmp_path, tokenizer={"vocab_size": 260}), tokenizer=tok)
    assert dm2.tokenizer is tok and dm2.vocab_size == dm.vocab_size
    dm2.setup("validate")
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1  # no tokenizer trained for dm2


def test_split_too_short(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(make_text(0, n_lines=60), encoding="utf-8")
    dm = LMDataModule(make_cfg([str(path)], tmp_path, seq_len=512))
    with pytest.raises(UserError, match=r"the val split has only \d+ tokens; data.seq_len=512 needs at least 513"):
        dm.setup("fit")
    dm = LMDataModule(make_cfg([str(path)], tmp_path, seq_len=64, batch_size=4096))
    dm.setup("fit")
    with pytest.raises(UserError, match="data.batch_size=4096"):
        dm.train_dataloader()


def test_spread_train_blocks_span_the_split_and_leave_the_training_order_alone(txt_corpus, tmp_path):
    dm = LMDataModule(make_cfg(txt_corpus, tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    first_batch = next(iter(dm.train_dataloader()))["input_ids"]
    train = dm.train_dataloader().dataset
    blocks = dm.spread_train_blocks(3)
    assert blocks.shape == (3, T)
    last = len(train) - 1
    for block, i in zip(blocks, (0, round(last / 2), last), strict=True):
        assert torch.equal(block, train[i]["input_ids"])
    assert len(dm.spread_train_blocks(10**6)) == len(train)  # never more than the split has
    assert torch.equal(next(iter(dm.train_dataloader()))["input_ids"], first_batch)
