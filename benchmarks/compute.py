"""Compute benchmark: measured time, memory and KV-cache bytes of MoD, SDT and STT against a dense model.

    python benchmarks/compute.py --size small --out results.json [--markdown docs/performance.md] [--layer-bench]

For each capacity, a dense model and each routed model of the same dimensions are built (random weights: cost does
not depend on them) and measured in one process, with the repeats of every phase interleaved across the models so
that background load and frequency drift hit all of them alike. Phases:

- train step: forward + backward + AdamW step under Top-K routing (what training executes);
- forward: the same batch in the model's causal routing mode, no grad (validation / scoring);
- prefill: the prompt at batch 1 with a ModelCache;
- decode: `generate` of N tokens at batch 1 in the causal mode (sampled at temperature 1 by default: random weights
  decode greedily into one repeated token); the KV-cache bytes are read from the cache afterwards.

Every `*_ratio` is model / dense of the same quantity (a time or a byte count), so < 1 means cheaper, and sits
beside the analytic FLOP ratios of `sdt.models.compute`. Untrained routers are calibrated to the capacity on random
batches before the causal phases; the routing mode used and the executed fraction measured per routed layer are
reported.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Run as a script from a checkout (`python benchmarks/compute.py`): make the repository's `sdt` and the sibling
# modules of this benchmark importable.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch
from compute_common import ARCHS, CAPACITIES, CLOCKS, SIZES, Settings, check_models_and_capacities, csv_of, machine
from compute_models import bench_capacity
from compute_output import format_markdown, format_table, target_checks
from compute_twins import bench_layer, bench_transformers


def run(s: Settings, command: str = "") -> dict[str, Any]:
    device = torch.device(s.device)
    bf16 = s.dtype == "bf16"

    @contextlib.contextmanager
    def amp() -> Iterator[None]:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            yield

    peak_source = (
        "cuda: torch.cuda.max_memory_allocated during one training step minus the memory allocated before it"
        if device.type == "cuda"
        else "unavailable on cpu (torch's CPU allocator keeps no peak statistics; the process RSS high-water mark "
        "is monotone and shared by all models in the run)"
    )
    meta = {
        **machine(),
        "size": s.size,
        "dims": dataclasses.asdict(SIZES[s.size]),
        **{k: v for k, v in dataclasses.asdict(s).items() if k != "size"},
        "peak_memory_source": peak_source,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    records = []
    for capacity in s.capacities:
        records += bench_capacity(s, capacity, device, amp)
    layer = bench_layer(s, device, amp) if s.layer_bench else None
    hf = bench_transformers(s, device, amp) if s.compare_transformers else None
    result = {"meta": meta, "records": records, "layer_bench": layer, "transformers": hf}
    result["targets"] = target_checks(result)
    return result


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--models", type=csv_of(str), default=ARCHS, help="comma-separated; dense is always measured")
    p.add_argument("--capacities", type=csv_of(float), default=CAPACITIES, help="comma-separated, each in (0, 1]")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per phase; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per phase and model before timing")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument(
        "--decode-temperature",
        type=float,
        default=1.0,
        help="0 = greedy; random weights decode greedily into one repeated token, hence sampling by default",
    )
    p.add_argument(
        "--skip-train", action="store_true", help="inference phases only: no training step (train columns n/a)"
    )
    p.add_argument("--layer-bench", action="store_true", help="also time one routed block vs one dense block")
    p.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also time our dense forward against transformers' Qwen2 of the same config and weights",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (needs a quiet machine) | cpu: process CPU time, for shared CPUs with --threads 1",
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    p.add_argument("--markdown", type=Path, default=None, help="write a markdown report here")
    a = p.parse_args(argv)
    check_models_and_capacities(p, a.models, ARCHS, a.capacities)
    for name in ("repeats", "decode_tokens", "prompt_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if a.clock == "cpu" and a.device == "cuda":
        p.error("--clock cpu measures CPU work; time CUDA with --clock wall")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    settings = Settings(
        size=a.size,
        models=tuple(dict.fromkeys(a.models)),
        capacities=tuple(a.capacities),
        repeats=a.repeats,
        warmup=a.warmup,
        dtype=a.dtype,
        device=a.device,
        decode_tokens=a.decode_tokens,
        prompt_tokens=a.prompt_tokens,
        decode_temperature=a.decode_temperature,
        train_phase=not a.skip_train,
        layer_bench=a.layer_bench,
        compare_transformers=a.compare_transformers,
        clock=a.clock,
        seed=a.seed,
    )
    return settings, a.out, a.markdown


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, out, markdown = parse_args(argv)
    result = run(settings, command=shlex.join(["python", "benchmarks/compute.py", *argv]))
    print(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(format_markdown(result))
    return result


if __name__ == "__main__":
    main()
