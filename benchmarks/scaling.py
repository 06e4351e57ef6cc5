"""Scaling benchmark: how training step time, peak memory and tokens/s grow with model size and sequence length,
dense against each routed model, beside the FLOP counts of `sdt.models.compute`.

    python benchmarks/scaling.py --out scaling.json --markdown scaling.md          # the grid of docs/scaling.md
    python benchmarks/scaling.py --grid tiny --out tiny.json                       # seconds: the tests' grid

A grid is a list of points (d_model, layers, heads, kv heads, sequence length). At each point a dense model and
every routed model (MoD, SDT, STT) at every capacity are built with random weights from the shipped `conf/model/*.yaml`
(so each routed model has the options a user trains it with, skip maps included) and measured **in one process**:

- train step: forward + backward + AdamW step (`sdt.training.optim.build_optimizer`) under Top-K routing, batch x T
  tokens; after `--warmup` untimed steps per model, `--repeats` timed steps interleaved across the models (order
  reversed every other repeat) so machine load hits every model alike; the median is reported;
- peak memory: one more step per model, alone: the rise of the process's resident-set high-water mark (VmHWM, reset
  through /proc/self/clear_refs) over the memory resident before it, i.e. activations, gradients and temporaries on
  top of the weights and AdamW state. glibc's mmap threshold is pinned low so freed tensors go back to the OS
  instead of staying resident; Linux only (null elsewhere);
- FLOPs: `sdt.models.compute.compute_report` of the same config (training FLOPs per token, ratio to dense).

Every `*_ratio` is model / dense at the same point, measured in the same run. Results are written after every point
(JSON and markdown), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script from a checkout: make the repository's `sdt` and the sibling benchmark modules importable.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch
from compute_common import CLOCKS, Timer, check_models_and_capacities, csv_of, interleaved, machine, ratio
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sdt.models import ModelConfig, build_model
from sdt.models.compute import compute_report
from sdt.training.optim import OptimConfig, build_optimizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ROUTED = ("mod", "sdt", "stt")
CAPACITIES = (0.125, 0.5)
VOCAB = 4096  # small enough that the LM head does not hide the blocks' cost


@dataclasses.dataclass(frozen=True)
class Point:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    sweep: str  # the sweep that added the point: "seq_len" or "size" (tables and trends use every point)

    @property
    def key(self) -> str:
        return f"d{self.d_model}-L{self.n_layers}-T{self.seq_len}"


def _size(d_model: int) -> dict[str, int]:
    # Heads of 64 dims, 2 query heads per KV head; depth reduced from the usual 4/8/12 to 4/6/8 to fit the CPU budget.
    return {
        256: {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2},
        512: {"d_model": 512, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4},
        768: {"d_model": 768, "n_layers": 8, "n_heads": 12, "n_kv_heads": 6},
    }[d_model]


GRIDS: dict[str, list[Point]] = {
    # Most important first, since a run cut short keeps what it measured: the sequence-length sweep at d_model 256
    # (the target's numbers), the model-size sweep at T = 512, then the sequence-length sweep at d_model 512.
    "cpu": [Point(**_size(256), seq_len=t, sweep="seq_len") for t in (256, 512, 1024, 2048)]
    + [Point(**_size(d), seq_len=512, sweep="size") for d in (512, 768)]
    + [Point(**_size(512), seq_len=t, sweep="seq_len") for t in (256, 1024, 2048)],
    # The sequence-length sweep at d_model 256 alone: a second pass of the target's numbers.
    "seq": [Point(**_size(256), seq_len=t, sweep="seq_len") for t in (256, 512, 1024, 2048)],
    "tiny": [Point(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, seq_len=t, sweep="seq_len") for t in (32, 64)]
    + [Point(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, seq_len=32, sweep="size")],
}


@dataclasses.dataclass
class Settings:
    grid: str = "cpu"
    models: tuple[str, ...] = ROUTED
    capacities: tuple[float, ...] = CAPACITIES
    batch: int = 1
    warmup: int = 1
    repeats: int = 3
    clock: str = "wall"
    seed: int = 0


def model_config(point: Point, arch: str, capacity: float) -> ModelConfig:
    """The shipped `conf/model/<arch>.yaml` at the point's dimensions (what `python train.py model=<arch>` builds)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={arch}"])
    GlobalHydra.instance().clear()
    model = OmegaConf.to_container(cfg.model, resolve=True)
    dims = {k: v for k, v in dataclasses.asdict(point).items() if k not in ("seq_len", "sweep")}
    model.update(dims, vocab_size=VOCAB, max_seq_len=point.seq_len, capacity=capacity, compile=False)
    return ModelConfig.from_dict(model)


# ------------------------------------------------------------------------------------------------ peak memory


def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def pin_malloc() -> bool:
    """Make glibc return freed tensors to the OS at once, so the resident set follows the live tensors: allocations
    of 64 KiB and more are mmapped (M_MMAP_THRESHOLD, which also stops glibc raising it), the heap top trimmed at
    128 KiB (M_TRIM_THRESHOLD)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def step_peak_bytes(step: Callable[[], None]) -> int | None:
    """Bytes the resident set rose above its level before `step` at its highest during it (Linux; else None)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


# ------------------------------------------------------------------------------------------------ one point


def bench_point(s: Settings, point: Point) -> list[dict[str, Any]]:
    """Dense and every routed model at every capacity at one point, measured in one process; one record each."""
    timer = Timer(torch.device("cpu"), s.clock)
    B, T = s.batch, point.seq_len
    specs = [("dense", 1.0)] + [(a, c) for a in s.models for c in s.capacities]
    names = [a if a == "dense" else f"{a}@{c:g}" for a, c in specs]
    configs = {n: model_config(point, a, c) for n, (a, c) in zip(names, specs, strict=True)}
    models, optimizers = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(s.seed)
        models[name] = build_model(cfg).train()
        optimizers[name] = build_optimizer(models[name], OptimConfig())
    g = torch.Generator().manual_seed(s.seed)
    ids, targets = (torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(2))

    def train_step(name: str) -> None:
        out = models[name](ids, targets, routing="topk")
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    samples = interleaved({n: lambda n=n: train_step(n) for n in names}, s.warmup, s.repeats, timer)
    peak = {n: step_peak_bytes(lambda n=n: train_step(n)) for n in names}
    median = {n: statistics.median(v) for n, v in samples.items()}
    records = []
    for name, (arch, capacity) in zip(names, specs, strict=True):
        cfg, model = configs[name], models[name]
        report = compute_report(cfg, T)
        flops_per_step = report["train_flops_per_token"] * B * T
        n_params = sum(p.numel() for p in model.parameters())
        records.append(
            {
                "point": point.key,
                "sweep": point.sweep,
                "model": arch,
                "capacity": capacity,
                "d_model": point.d_model,
                "n_layers": point.n_layers,
                "seq_len": T,
                "batch": B,
                "params": n_params,
                "train_step_s": median[name],
                "train_step_samples_s": samples[name],
                "tokens_per_s": B * T / median[name],
                "step_peak_bytes": peak[name],
                # Resident before any step: fp32 weights and the two AdamW moments (the gradients are in the peak).
                "weights_and_adam_bytes": 3 * 4 * n_params,
                "train_flops_per_token": report["train_flops_per_token"],
                "achieved_gflops": flops_per_step / median[name] / 1e9,
                "train_flop_ratio": report["train_flops_ratio_vs_dense"],
                "train_time_ratio": ratio(median[name], median["dense"]),
                "tokens_per_s_ratio": ratio(median["dense"], median[name]),
                "peak_memory_ratio": ratio(peak[name], peak["dense"]),
                # FLOP ratio / time ratio: how efficiently the routed model turns FLOPs into time against dense
                # (1: as efficiently; < 1: gather/scatter and small matmuls cost more than their FLOPs say).
                "flop_efficiency_vs_dense": ratio(
                    report["train_flops_ratio_vs_dense"], ratio(median[name], median["dense"])
                ),
            }
        )
    models.clear()
    optimizers.clear()
    gc.collect()
    return records


# ------------------------------------------------------------------------------------------------ summaries


def seq_len_trend(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model size, routed model and capacity: its train-time ratio at each measured sequence length, and whether
    the ratio at the longest length is no worse than at the shortest (the scaling target)."""
    routed = [r for r in records if r["model"] != "dense"]
    out = []
    for d_model, n_layers, model, capacity in dict.fromkeys(
        (r["d_model"], r["n_layers"], r["model"], r["capacity"]) for r in routed
    ):
        rows = sorted(
            (
                r
                for r in routed
                if (r["d_model"], r["n_layers"], r["model"], r["capacity"]) == (d_model, n_layers, model, capacity)
            ),
            key=lambda r: r["seq_len"],
        )
        if len(rows) < 2:  # one length says nothing about a trend
            continue
        first, last = rows[0], rows[-1]
        out.append(
            {
                "d_model": d_model,
                "n_layers": n_layers,
                "model": model,
                "capacity": capacity,
                "train_time_ratio_by_seq_len": {r["seq_len"]: r["train_time_ratio"] for r in rows},
                "train_flop_ratio_by_seq_len": {r["seq_len"]: r["train_flop_ratio"] for r in rows},
                "shortest": first["seq_len"],
                "longest": last["seq_len"],
                "met": last["train_time_ratio"] <= first["train_time_ratio"],
                "change": last["train_time_ratio"] / first["train_time_ratio"],
            }
        )
    return out


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


COLUMNS = (
    ("model", lambda r: r["model"]),
    ("cap", lambda r: "-" if r["model"] == "dense" else f"{r['capacity']:g}"),
    ("params (M)", lambda r: f"{r['params'] / 1e6:.1f}"),
    ("step ms", lambda r: f"{r['train_step_s'] * 1e3:.0f}"),
    ("tok/s", lambda r: f"{r['tokens_per_s']:.0f}"),
    ("peak MiB", lambda r: _mib(r["step_peak_bytes"])),
    ("train GFLOP/tok", lambda r: f"{r['train_flops_per_token'] / 1e9:.3f}"),
    ("GFLOP/s", lambda r: f"{r['achieved_gflops']:.1f}"),
    ("FLOP ratio", lambda r: _fmt(r["train_flop_ratio"])),
    ("time ratio", lambda r: _fmt(r["train_time_ratio"])),
    ("mem ratio", lambda r: _fmt(r["peak_memory_ratio"])),
)


def point_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fn(r) for _, fn in COLUMNS) + " |" for r in rows]
    return lines


def format_markdown(result: dict[str, Any]) -> str:
    meta, records = result["meta"], result["records"]
    lines = [
        "# Scaling benchmark",
        "",
        (
            f"`{meta['command']}` on {meta['cpu']} ({meta['torch_threads']} torch threads, clock `{meta['clock']}`, "
            f"batch {meta['batch']}, {meta['warmup']} warm-up + {meta['repeats']} timed steps per model, median), "
            f"torch {meta['torch']}, {meta['date']}."
        ),
        "",
        (
            "Ratios are model / dense at the same point, measured in the same run; `peak MiB` is one training step's "
            "rise of the resident set above the weights and AdamW state."
        ),
        "",
    ]
    for point in dict.fromkeys(r["point"] for r in records):
        rows = [r for r in records if r["point"] == point]
        r0 = rows[0]
        lines += [f"## d_model {r0['d_model']}, {r0['n_layers']} layers, seq_len {r0['seq_len']}", ""]
        lines += point_table(rows) + [""]
    trend = seq_len_trend(records)
    if trend:
        lengths = sorted({t for row in trend for t in row["train_time_ratio_by_seq_len"]})
        lines += ["## Train-time ratio vs dense by sequence length", ""]
        lines += ["| d_model | model | cap | " + " | ".join(f"T={t}" for t in lengths) + " | longest / shortest |"]
        lines += ["|" + "---|" * (len(lengths) + 4)]
        for row in trend:
            cells = [_fmt(row["train_time_ratio_by_seq_len"].get(t)) for t in lengths]
            verdict = f"{row['change']:.2f} ({'met' if row['met'] else 'missed'})"
            lines.append(
                f"| {row['d_model']} | {row['model']} | {row['capacity']:g} | " + " | ".join(cells) + f" | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def format_table(records: list[dict[str, Any]]) -> str:
    header = [h for h, _ in COLUMNS]
    rows = [[r["point"]] + [fn(r) for _, fn in COLUMNS] for r in records]
    header = ["point", *header]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *rows])


# ------------------------------------------------------------------------------------------------ run and CLI


def run(s: Settings, command: str = "", out: Path | None = None, markdown: Path | None = None) -> dict[str, Any]:
    pinned = pin_malloc()
    meta = {
        **machine(),
        **dataclasses.asdict(s),
        "grid": [dataclasses.asdict(p) for p in GRIDS[s.grid]],
        "vocab_size": VOCAB,
        "malloc_pinned": pinned,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    result: dict[str, Any] = {"meta": meta, "records": [], "seq_len_trend": [], "complete": False}
    for point in GRIDS[s.grid]:
        started = time.perf_counter()
        records = bench_point(s, point)
        result["records"] += records
        result["seq_len_trend"] = seq_len_trend(result["records"])
        print(format_table(records), flush=True)
        print(f"[{point.key}: {time.perf_counter() - started:.0f} s]", flush=True)
        write(result, out, markdown)
    result["complete"] = True
    write(result, out, markdown)
    return result


def write(result: dict[str, Any], out: Path | None, markdown: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(format_markdown(result))


def parse_args(argv: list[str]) -> tuple[Settings, Path | None, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    p.add_argument(
        "--models", type=csv_of(str), default=ROUTED, help="routed models, comma-separated (dense always runs)"
    )
    p.add_argument("--capacities", type=csv_of(float), default=CAPACITIES, help="comma-separated, each in (0, 1]")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per model; the median is reported")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results, rewritten after every point")
    p.add_argument("--markdown", type=Path, default=None, help="markdown report, rewritten after every point")
    a = p.parse_args(argv)
    check_models_and_capacities(p, a.models, ROUTED, a.capacities)
    for name in ("batch", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    s = Settings(
        grid=a.grid,
        models=tuple(dict.fromkeys(a.models)),
        capacities=tuple(a.capacities),
        batch=a.batch,
        warmup=a.warmup,
        repeats=a.repeats,
        clock=a.clock,
        seed=a.seed,
    )
    return s, a.out, a.markdown


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, out, markdown = parse_args(argv)
    return run(settings, shlex.join(["python", "benchmarks/scaling.py", *argv]), out, markdown)


if __name__ == "__main__":
    main()
