"""LightningDataModule: corpus -> tokenizer -> one cached token stream per split -> packed (input, target) blocks.

Each split's documents are encoded and concatenated with an end-of-text token after every document, giving one
1-D stream, cached keyed by the corpus fingerprint and the tokenizer so that a second run (or every DDP rank after
rank 0) only memory-maps it. Small corpora (Shakespeare, text_files) are tokenized in one go into one .npy per
split; large ones (hf_hub: the hub, local files of any size) are streamed through parallel workers into
fixed-size token shards (`sdt/data/shards.py`), resumable and read back through one memory map per shard.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sdt.common.errors import UserError
from sdt.data.cache import (
    atomic_write,
    cache_key,
    cache_lock,
    file_problem,
    file_record,
    read_record,
    write_record,
)
from sdt.data.config import DataConfig
from sdt.data.corpora import build_corpus
from sdt.data.corpus import SPLITS, Corpus
from sdt.data.encoding_pool import available_cores
from sdt.data.shards import MANIFEST, ShardedTokens, build_shards, entry_problem
from sdt.data.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

# Documents are encoded this many at a time: large enough for the Rust encoder's threads, small enough that the
# Python lists of ids for one chunk stay modest.
_ENCODE_CHUNK_DOCS = 256
_STREAM_FORMAT_VERSION = 1
TokenStream = np.ndarray | ShardedTokens  # one .npy, or the shards of a large corpus


class PackedDataset(Dataset):
    """Fixed-length blocks cut from one token stream, for next-token prediction.

    Block i is tokens[i*T : i*T + T + 1]; item i is {"input_ids": block[:-1], "targets": block[1:]}. Consecutive
    blocks overlap by one token, so every token but the first is a target exactly once.

    THE shift between inputs and targets happens here and only here: targets[t] is the token that follows
    input_ids[t], and the model's loss must compare logits[:, t] with targets[:, t] without shifting again.
    """

    def __init__(self, tokens: TokenStream, seq_len: int, split: str = "train") -> None:
        if len(tokens) < seq_len + 1:
            raise UserError(
                f"the {split} split has only {len(tokens)} tokens; data.seq_len={seq_len} needs at least "
                f"{seq_len + 1}; lower data.seq_len or add text"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_blocks = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        start = i * self.seq_len
        block = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": block[:-1], "targets": block[1:]}


class ResumableSampler(DistributedSampler):
    """The training order: a fresh shuffle per epoch (seed + epoch) split across ranks, that can start part-way
    through an epoch, so a resumed run sees exactly the batches the interrupted one had not reached yet.

    A DistributedSampler, so Lightning keeps it under DDP/FSDP instead of injecting its own, and calls `set_epoch`
    at every epoch. `len()` stays the whole epoch's share: Lightning counts the batches already done itself.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        # drop_last: every rank gets the same number of blocks, so no rank waits for a batch another never has.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._skip = 0

    def start_at(self, epoch: int, samples_done: int) -> None:
        """Make the next iteration begin at this rank's `samples_done`-th sample of `epoch`."""
        self.set_epoch(epoch)
        self._skip = samples_done

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0  # only the first iteration after a resume starts part-way
        return itertools.islice(super().__iter__(), skip, None)


class ResumableDataModule(L.LightningDataModule):
    """A data module whose training order resumes exactly: the position in it is part of the checkpoint.

    Subclasses keep `cfg.batch_size` and `cfg.seed` and build their training loader with `train_sampler`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) to start the next train loader at

    def train_sampler(self, ds: Dataset, batch_size: int) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=self.cfg.seed)
        if self._resume_at is not None:
            epoch, batches_done = self._resume_at
            sampler.start_at(epoch, batches_done * batch_size)
            self._resume_at = None
        return sampler

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # The fit loop's own progress, not a count of batches the loader handed out: Lightning prefetches a batch
        # ahead (and workers more), so the loader is always further along than training.
        loop = trainer.fit_loop
        return {
            "train_epoch": int(loop.epoch_progress.current.processed),
            "train_batches_done": int(loop.epoch_loop.batch_progress.current.processed),
            "batch_size": self.cfg.batch_size,
            "world_size": int(trainer.world_size),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" not in state_dict:
            return
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if state_dict.get("batch_size") != self.cfg.batch_size or state_dict.get("world_size") != world:
            # Another batch size or number of ranks cuts the same order into other batches: no exact position.
            log.warning(
                "resuming with data.batch_size=%s on %s ranks (checkpoint: %s on %s): the data order restarts at "
                "epoch %s instead of continuing mid-epoch",
                self.cfg.batch_size,
                world,
                state_dict.get("batch_size"),
                state_dict.get("world_size"),
                state_dict["train_epoch"],
            )
            self._resume_at = (int(state_dict["train_epoch"]), 0)
            return
        self._resume_at = (int(state_dict["train_epoch"]), int(state_dict["train_batches_done"]))


class LMDataModule(ResumableDataModule):
    """Train/val/test dataloaders of packed token blocks for language modelling.

    Pass `tokenizer` (e.g. rebuilt from a checkpoint with `Tokenizer.from_json`) to reuse it instead of getting one
    from `cfg.tokenizer`; evaluation must use the tokenizer the model was trained with.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # Resolve now: Hydra or the caller may change the working directory later.
        self.cache_dir = Path(cfg.cache_dir).expanduser().absolute()
        self._tokenizer = tokenizer
        # Built now (cheap: no text is read yet) so that bad paths fail early and relative paths resolve against
        # the working directory of the caller.
        self.corpus: Corpus = build_corpus(cfg)
        self._tokens_dir: Path | None = None
        self._streams: dict[str, TokenStream] | None = None
        self._meta: dict[str, Any] | None = None
        self._datasets: dict[str, PackedDataset] = {}
        self._verified: Path | None = None  # the token cache entry this module has checked (or built)
        # (epoch, batches done in it) read from a checkpoint; applied to the next train loader built.

    # ---------------------------------------------------------------------------------------------------------------
    # Building and loading the caches.

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (trained or loaded from its cache on first access)."""
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.cfg.tokenizer, self.corpus, self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokens_dir(self) -> Path:
        """Cache directory of the token streams for this corpus and tokenizer."""
        if self._tokens_dir is None:
            entry: dict[str, Any] = {
                "corpus": self.corpus.fingerprint(),
                "tokenizer": cache_key(self.tokenizer.to_json(), 64),
                "version": _STREAM_FORMAT_VERSION,
            }
            if self.corpus.sharded:
                entry["shard_tokens"] = self.cfg.shard_tokens  # the number of workers changes no byte: not a key
            self._tokens_dir = self.cache_dir / ("shards" if self.corpus.sharded else "tokens") / cache_key(entry)
        return self._tokens_dir

    def prepare_data(self) -> None:
        """Build the tokenizer and token caches if missing.

        Lightning calls this on one process per node; calling it from every rank is also safe (a file lock lets one
        process build while the others wait, then they reuse its files).
        """
        self._build_streams(self.tokens_dir)

    def _build_streams(self, out_dir: Path) -> None:
        """Make `out_dir` hold intact token streams: checked against meta.json, (re)built under the lock if not."""
        if self.corpus.sharded:
            self._build_shards(out_dir)
            return
        if self._verified == out_dir or streams_problem(out_dir) is None:
            self._verified = out_dir
            return
        with cache_lock(out_dir):
            problem = streams_problem(out_dir)  # another process may have (re)built it while we waited
            if problem is not None:
                if problem != _NO_ENTRY:
                    log.warning("token cache %s is damaged (%s): rebuilding it", out_dir, problem)
                (out_dir / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta.json is written
                self._write_streams(out_dir)
        self._verified = out_dir

    def _build_shards(self, out_dir: Path) -> None:
        """Make `out_dir` hold a complete entry of intact shards: resumed, healed or prepared under the lock."""
        if self._verified == out_dir or entry_problem(out_dir) is None:
            self._verified = out_dir
            return
        with cache_lock(out_dir):
            problem = entry_problem(out_dir)  # another process may have prepared it while we waited
            if problem is not None:
                tok = self.tokenizer
                corpus = self.corpus
                num_proc = self.cfg.num_proc or available_cores()
                log.info("preparing token shards in %s with %d worker process(es)", out_dir, num_proc)
                build_shards(
                    out_dir,
                    sources={s: (lambda skip, s=s: corpus.iter_documents(s, skip)) for s in SPLITS},
                    tokenizer_json=tok.backend.to_str(),
                    eos_id=tok.eos_id,
                    vocab_size=tok.vocab_size,
                    shard_tokens=self.cfg.shard_tokens,
                    num_proc=num_proc,
                    total_bytes={s: getattr(corpus, "size_hint", lambda _s: None)(s) for s in SPLITS},
                )
        self._verified = out_dir

    def _write_streams(self, out_dir: Path) -> None:
        tok = self.tokenizer
        dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
        meta: dict[str, Any] = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "splits": {}}
        for split in SPLITS:
            t0 = time.perf_counter()
            docs = self.corpus.documents(split)
            chunks = [np.zeros(0, dtype=dtype)]
            for i in range(0, len(docs), _ENCODE_CHUNK_DOCS):
                for ids in tok.encode_batch(docs[i : i + _ENCODE_CHUNK_DOCS]):
                    ids.append(tok.eos_id)
                    chunks.append(np.asarray(ids, dtype=dtype))
            stream = np.concatenate(chunks)
            # Bits per byte should be comparable across tokenizers, so bytes are counted on the text itself; each
            # EOS stands for one byte of document separator (it is predicted, so it must cost something).
            num_bytes = sum(len(d.encode("utf-8")) for d in docs) + len(docs)
            atomic_write(out_dir / f"{split}.npy", lambda f, a=stream: np.save(f, a, allow_pickle=False))
            meta["splits"][split] = {
                "num_docs": len(docs),
                "num_tokens": len(stream),
                "num_bytes": num_bytes,
                "file": file_record(out_dir / f"{split}.npy"),  # what a later load checks the file against
            }
            log.info(
                "tokenized %s: %d docs -> %d tokens in %.1fs", split, len(docs), len(stream), time.perf_counter() - t0
            )
        # meta.json is written last: its presence marks the whole entry as complete.
        write_record(out_dir / "meta.json", meta)

    def setup(self, stage: str | None = None) -> None:
        """Load (memory-map) the token streams; builds them first if prepare_data was not called. Idempotent."""
        if self._streams is None:
            out_dir = self.tokens_dir
            self._build_streams(out_dir)  # no-op when prepare_data already ran
            if self.corpus.sharded:
                manifest = read_record(out_dir / MANIFEST)
                assert manifest is not None  # _build_streams checked it
                self._meta = manifest
                self._streams = {s: ShardedTokens.open(out_dir, manifest, s) for s in SPLITS}
            else:
                self._meta = read_record(out_dir / "meta.json")
                self._streams = {s: np.load(out_dir / f"{s}.npy", mmap_mode="r", allow_pickle=False) for s in SPLITS}
            self._log_usage()
        # Fail now, with a clear message, if a split the stage needs is too short for seq_len.
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ()):
            self._dataset(split)

    def _log_usage(self) -> None:
        """Say how much of the corpus this run uses: documents and tokens per split, and any cap on them."""
        assert self._meta is not None
        splits = self._meta["splits"]
        parts = [f"{s} {splits[s].get('num_docs', 0):,} docs / {splits[s]['num_tokens']:,} tokens" for s in SPLITS]
        cap = getattr(self.corpus, "max_train_docs", None)
        note = f" (train capped at data.max_train_docs={cap})" if cap is not None else ""
        log.info("corpus %s: %s%s", self.corpus.name, "; ".join(parts), note)

    def _dataset(self, split: str) -> PackedDataset:
        if split not in self._datasets:
            if self._streams is None:
                self.setup()
            assert self._streams is not None
            if split in ("train", "calibration"):
                train, calibration = self._split_calibration(self._streams["train"])
                self._datasets["train"] = PackedDataset(train, self.cfg.seq_len, "train")
                if calibration is not None:
                    self._datasets["calibration"] = PackedDataset(calibration, self.cfg.seq_len, "calibration")
            else:
                self._datasets[split] = PackedDataset(self._streams[split], self.cfg.seq_len, split)
        return self._datasets[split]

    def _split_calibration(self, tokens: TokenStream) -> tuple[TokenStream, TokenStream | None]:
        """The train stream minus its last `calibration_blocks` blocks (at most 10%), and those blocks."""
        T = self.cfg.seq_len
        n_blocks = max(0, (len(tokens) - 1) // T)
        n_cal = min(self.cfg.calibration_blocks, n_blocks // 10)
        if n_cal == 0:
            return tokens, None
        cut = (n_blocks - n_cal) * T
        if isinstance(tokens, ShardedTokens):  # views, not copies of the whole split
            return tokens.slice_view(0, cut + 1), tokens.slice_view(cut)
        return tokens[: cut + 1], tokens[cut:]

    # ---------------------------------------------------------------------------------------------------------------
    # Dataloaders.

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        ds = self._dataset(split)
        sampler = self.train_sampler(ds, batch_size) if shuffle else None
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def calibration_dataloader(self) -> DataLoader | None:
        """Held-out training blocks for calibrating routing thresholds (None when the corpus is too small)."""
        self._dataset("train")
        if "calibration" not in self._datasets:
            return None
        return self._loader("calibration", self.cfg.eval_batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        if len(ds) < self.cfg.batch_size:
            raise UserError(
                f"the train split has only {len(ds)} blocks of data.seq_len={self.cfg.seq_len} tokens, fewer than "
                f"data.batch_size={self.cfg.batch_size}; lower one of them or add text"
            )
        return self._loader("train", self.cfg.batch_size, shuffle=True)

    def spread_train_blocks(self, n: int) -> Tensor:
        """n training blocks spread evenly over the train split, (n, seq_len) token ids; the training order and
        its resumable state are untouched (for fitting a converted model's new modules before training)."""
        ds = self._dataset("train")
        picks = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().tolist()
        return torch.stack([ds[i]["input_ids"] for i in picks])

    def val_dataloader(self) -> DataLoader:
        assert self.cfg.eval_batch_size is not None  # DataConfig fills it in
        return self._loader("val", self.cfg.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        assert self.cfg.eval_batch_size is not None
        return self._loader("test", self.cfg.eval_batch_size, shuffle=False)

    # ---------------------------------------------------------------------------------------------------------------
    # Statistics and samples.

    @property
    def split_stats(self) -> dict[str, dict[str, float]]:
        """Per split: num_tokens, num_bytes and bytes_per_token.

        bits per byte = (mean loss in nats per token) / ln 2 / bytes_per_token.
        """
        if self._meta is None:
            self.setup()
        assert self._meta is not None
        stats = {}
        for split, s in self._meta["splits"].items():
            bpt = s["num_bytes"] / s["num_tokens"] if s["num_tokens"] else math.nan
            stats[split] = {"num_tokens": s["num_tokens"], "num_bytes": s["num_bytes"], "bytes_per_token": bpt}
        return stats

    def token_stream(self, split: str) -> TokenStream:
        """The whole tokenised split as one 1-D stream (documents separated by EOS), memory-mapped."""
        if self._streams is None:
            self.setup()
        return self._streams[split]

    def sample_text(self, split: str, n_chars: int, start_token: int = 0) -> str:
        """The first `n_chars` characters of the split's decoded stream from token `start_token` (fewer if the
        stream ends first)."""
        if self._streams is None:
            self.setup()
        assert self._streams is not None
        stream = self._streams[split]
        n_tokens = max(n_chars // 2, 16)  # most tokens hold several characters; grow the window if not
        while True:
            text = self.tokenizer.decode(stream[start_token : start_token + n_tokens])
            if len(text) > n_chars or start_token + n_tokens >= len(stream):
                return text[:n_chars]
            n_tokens *= 2


_NO_ENTRY = "no entry"


def streams_problem(out_dir: Path) -> str | None:
    """What is wrong with the token cache entry `out_dir` against its meta.json, or None when it is intact.

    Checked: meta.json parses and lists every split; each split's .npy loads as a 1-D array of the recorded dtype and
    token count, with the recorded file size and SHA-256 (entries written before the file records are checked by
    dtype and token count only).
    """
    if not (out_dir / "meta.json").exists():
        return _NO_ENTRY
    meta = read_record(out_dir / "meta.json")
    if meta is None or not isinstance(meta.get("splits"), dict) or not isinstance(meta.get("dtype"), str):
        return "meta.json is unreadable or corrupted"
    for split in SPLITS:
        record = meta["splits"].get(split)
        if not isinstance(record, dict) or not isinstance(record.get("num_tokens"), int):
            return f"meta.json has no token count for the {split} split"
        path = out_dir / f"{split}.npy"
        problem = file_problem(path, record.get("file") or {})
        if problem is not None:
            return problem
        try:
            stream = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            return f"{path.name} does not load ({e})"
        if stream.ndim != 1 or stream.dtype.name != meta["dtype"] or len(stream) != record["num_tokens"]:
            return (
                f"{path.name} holds {stream.size} {stream.dtype.name} tokens in {stream.ndim} dimension(s), "
                f"meta.json says {record['num_tokens']} {meta['dtype']} in 1"
            )
    return None
