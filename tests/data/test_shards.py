"""The sharded preparation of large corpora (`sdt/data/shards.py`): the same shards whatever the number of workers,
a SIGKILLed preparation resumed into the same bytes, damaged shards rebuilt, and training reads over shards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from itertools import count
from pathlib import Path

import numpy as np
import pytest

from sdt.data import DataConfig, LMDataModule
from sdt.data.config import TokenizerConfig
from sdt.data.corpus import Corpus
from sdt.data.datamodule import PackedDataset, ResumableSampler
from sdt.data.prepare import main as prepare_main
from sdt.data.shards import MANIFEST, ShardedTokens
from sdt.data.tokenizer import get_tokenizer
from tests.conftest import ROOT, cli_env
from tests.data.data_helpers import make_text, write_jsonl

SHARD_TOKENS = 4096


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory) -> Path:
    """300 documents, ~60k tokens with the tiny BPE: about 15 shards of SHARD_TOKENS."""
    d = tmp_path_factory.mktemp("jsonl")
    write_jsonl(d / "part-0.jsonl", [make_text(i, n_lines=10) for i in range(150)])
    write_jsonl(d / "part-1.jsonl", [make_text(i, n_lines=10) for i in range(150, 300)])
    return d


def data_overrides(jsonl_dir: Path) -> list[str]:
    return [
        "data=hf_hub",
        f"data.name={jsonl_dir}",
        "data.val_split=null",
        "data.max_eval_docs=10",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.tokenizer.vocab_size=320",
        f"data.shard_tokens={SHARD_TOKENS}",
    ]


def make_module(jsonl_dir: Path, cache_dir: Path, num_proc: int = 1) -> LMDataModule:
    cfg = DataConfig.from_dict(
        {
            "corpus": "hf_hub",
            "name": str(jsonl_dir),
            "val_split": None,
            "max_eval_docs": 10,
            "seq_len": 32,
            "batch_size": 4,
            "tokenizer": {"vocab_size": 320},
            "cache_dir": str(cache_dir),
            "num_proc": num_proc,
            "shard_tokens": SHARD_TOKENS,
        }
    )
    return LMDataModule(cfg)


def shard_bytes(entry: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("shard-*.bin"))}
    files[MANIFEST] = json.dumps(json.loads((entry / MANIFEST).read_text())["splits"], sort_keys=True).encode()
    return files


@pytest.fixture(scope="module")
def reference(jsonl_dir, tmp_path_factory) -> LMDataModule:
    """One uninterrupted preparation in this process (num_proc=1)."""
    dm = make_module(jsonl_dir, tmp_path_factory.mktemp("ref-cache"), num_proc=1)
    dm.setup("fit")
    return dm


def test_the_shards_hold_the_documents_in_order_and_do_not_depend_on_the_number_of_workers(
    reference, jsonl_dir, tmp_path
):
    entry = reference.tokens_dir
    manifest = json.loads((entry / MANIFEST).read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["num_tokens"] == SHARD_TOKENS for s in shards[:-1])
    assert 0 < shards[-1]["num_tokens"] <= SHARD_TOKENS
    # The train stream is the documents after the 10 + 10 held out, each followed by EOS, as one .npy would hold.
    tok = reference.tokenizer
    docs = [make_text(i, n_lines=10) for i in range(20, 300)]
    want = np.concatenate([np.asarray([*tok.encode(d), tok.eos_id]) for d in docs])
    assert np.array_equal(np.asarray(reference.token_stream("train")), want)
    assert reference.split_stats["train"]["num_bytes"] == sum(len(d.encode()) + 1 for d in docs)

    two = make_module(jsonl_dir, tmp_path / "cache", num_proc=2)
    two.prepare_data()
    assert two.tokens_dir.name == entry.name  # the worker count is not part of the cache key
    assert shard_bytes(two.tokens_dir) == shard_bytes(entry)


@pytest.mark.slow  # two subprocesses that import the package: ~10 s of CPU
def test_a_sigkilled_preparation_resumes_into_the_same_shards(reference, jsonl_dir, tmp_path):
    """Killed (SIGKILL) while writing its 4th shard; `python -m sdt.data.prepare` run again resumes after the 3
    complete ones and ends with the bytes of an uninterrupted preparation."""
    cache = tmp_path / "cache"
    # Kill deterministically: after 3 recorded shards, on the next write into the 4th (a partial file on disk).
    killer = (
        "import os, signal, sys\n"
        "from sdt.data import shards\n"
        "finish, append = shards.ShardWriter._finish_shard, shards.ShardWriter._append\n"
        "def _finish(self, nxt):\n"
        "    finish(self, nxt)\n"
        "    shards.FINISHED = getattr(shards, 'FINISHED', 0) + 1\n"
        "def _append(self, tokens):\n"
        "    append(self, tokens)\n"
        "    if getattr(shards, 'FINISHED', 0) == 3:\n"
        "        self._file.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "shards.ShardWriter._finish_shard, shards.ShardWriter._append = _finish, _append\n"
        "from sdt.data.prepare import main\n"
        "main(sys.argv[1:])\n"
    )
    args = [*data_overrides(jsonl_dir), "data.num_proc=2", f"paths.cache_dir={cache}"]
    env = cli_env(cache)
    killed = subprocess.run(
        [sys.executable, "-c", killer, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    entry = cache / "shards" / reference.tokens_dir.name
    manifest = json.loads((entry / MANIFEST).read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 3 and not manifest["splits"]["train"]["complete"]
    assert list(entry.glob("train/.shard-00003.bin.partial"))  # the shard it was writing: never trained on

    resumed = subprocess.run(
        [sys.executable, "-m", "sdt.data.prepare", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the train split after its 3 complete shard(s)" in resumed.stderr
    assert str(entry) in resumed.stdout and "python train.py data=hf_hub" in resumed.stdout
    assert shard_bytes(entry) == shard_bytes(reference.tokens_dir)
    assert not list(entry.glob("*/.*.partial"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_detected_and_rebuilt_alone(reference, jsonl_dir, tmp_path, damage, caplog):
    dm = make_module(jsonl_dir, tmp_path / "cache")
    dm.prepare_data()
    want = shard_bytes(dm.tokens_dir)
    victim = dm.tokens_dir / "train" / "shard-00002.bin"
    other = dm.tokens_dir / "train" / "shard-00005.bin"
    other_mtime = other.stat().st_mtime_ns
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))

    again = make_module(jsonl_dir, tmp_path / "cache")
    with caplog.at_level("WARNING"):
        again.setup("fit")
    assert "shard-00002.bin is damaged" in caplog.text
    assert shard_bytes(again.tokens_dir) == want
    assert other.stat().st_mtime_ns == other_mtime  # the intact shards are not rewritten
    assert np.array_equal(np.asarray(again.token_stream("train")), np.asarray(reference.token_stream("train")))


def test_sharded_tokens_read_across_shard_boundaries():
    parts = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 12, dtype=np.uint16), np.arange(12, 13, dtype=np.uint16)]
    tokens = ShardedTokens(parts)
    whole = np.arange(13)
    assert len(tokens) == 13 and np.array_equal(np.asarray(tokens), whole)
    for a in range(14):
        for b in range(a, 14):
            assert np.array_equal(tokens[a:b], whole[a:b]), (a, b)
    view = tokens.slice_view(3, 11)
    assert len(view) == 8 and np.array_equal(np.asarray(view), whole[3:11]) and np.array_equal(view[1:7], whole[4:10])
    assert int(tokens[-1]) == 12 and int(view[0]) == 3
    assert np.array_equal(np.concatenate(list(view.chunks())), whole[3:11])


def test_ranks_draw_disjoint_blocks_that_cover_the_epoch_over_shards(reference):
    ds = reference._dataset("train")
    assert isinstance(ds.tokens, ShardedTokens) and len(ds.tokens.parts) > 3
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(ds, num_replicas=2, rank=rank, seed=7)
        sampler.set_epoch(1)
        seen.append(list(sampler))
    assert len(seen[0]) == len(seen[1]) == len(ds) // 2
    assert not set(seen[0]) & set(seen[1])
    # Blocks that straddle two shards read the same tokens as the contiguous stream.
    stream = np.asarray(reference.token_stream("train"))
    flat = PackedDataset(stream[: len(ds.tokens)], 32)
    for i in (0, SHARD_TOKENS // 32 - 1, SHARD_TOKENS // 32, len(ds) - 1):
        assert ds[i]["input_ids"].tolist() == flat[i]["input_ids"].tolist()


def test_the_tokenizer_trains_on_a_bounded_sample_of_an_endless_corpus(tmp_path):
    class Endless(Corpus):
        name = "endless"

        def fingerprint(self) -> str:
            return "endless"

        def documents(self, split):
            raise AssertionError("a large corpus must be streamed, never listed")

        def iter_documents(self, split, skip=0):
            return (make_text(i, n_lines=3) for i in count(skip))

    tok = get_tokenizer(TokenizerConfig(vocab_size=300, max_train_chars=20_000), Endless(), tmp_path)
    assert tok.vocab_size == 300


def test_the_prepare_command_rejects_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_main(["data=hf_hub", f"data.name={tmp_path / 'missing'}", f"paths.cache_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.name=") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        prepare_main(["data=hf_hub", "data.name=x", "data.num_proc=0", f"paths.cache_dir={tmp_path}"])
    assert e.value.code == 2 and "data.num_proc must be >= 1" in capsys.readouterr().err
