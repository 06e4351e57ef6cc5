"""Shared pieces of the compute benchmark (benchmarks/compute.py): sizes, settings, timing, executed-token counts."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdt.models import LanguageModel, ModelConfig


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    batch: int
    vocab_size: int = 4096


SIZES = {
    "tiny": Size(d_model=64, n_layers=4, n_heads=2, n_kv_heads=1, seq_len=64, batch=2, vocab_size=256),
    "small": Size(d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, seq_len=256, batch=8),
    "large": Size(d_model=512, n_layers=12, n_heads=8, n_kv_heads=4, seq_len=1024, batch=2),
}
ARCHS = ("dense", "mod", "sdt", "stt")
CAPACITIES = (0.125, 0.25, 0.5, 1.0)
LAYER_BENCH_CAPACITY = 0.25
LAYER_BENCH_MIN_SEQ_LEN = 512
CALIBRATION_BATCHES = 4
# A causal mode "hits" the capacity when every routed layer executes within this of it; otherwise the other causal
# mode is tried (untrained SDT gates are nearly constant, so a threshold on them executes far more or far fewer
# tokens than the capacity).
FRACTION_TOLERANCE_ABS, FRACTION_TOLERANCE_REL = 0.05, 0.25
# Other causal modes an architecture can fall back to (STT's threshold mode needs a dense teacher pass: no cache).
FALLBACK_ROUTING = {"sdt": "student", "mod": "threshold"}


def model_config(size: Size, arch: str, capacity: float, max_seq_len: int) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        vocab_size=size.vocab_size,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        n_kv_heads=size.n_kv_heads,
        max_seq_len=max_seq_len,
        capacity=capacity,
    )


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the timer would stop before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {
    # Wall time: what a user waits for; needs a quiet machine.
    "wall": time.perf_counter,
    # CPU time of this process: on a shared machine, time spent descheduled is not counted. Meaningful with one
    # thread (--threads 1): with more, it also counts threads spinning while they wait for work.
    "cpu": time.process_time,
}


@dataclass(frozen=True)
class Timer:
    device: torch.device
    clock: str = "wall"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds that fn takes on this clock."""
        now = CLOCKS[self.clock]
        sync(self.device)
        start = now()
        fn()
        sync(self.device)
        return now() - start


def interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, timer: Timer
) -> dict[str, list[float]]:
    """Seconds of each fn per repeat. Models take turns within every repeat (order reversed on odd repeats), so slow
    drift in machine load lands on all of them instead of on whichever model happened to be measured last."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            samples[name].append(timer(fns[name]))
    return samples


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def executed_fractions(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """{layer index: executed fraction} from a forward's stats ("layers.{i}.executed_fraction")."""
    out = {}
    for name, value in stats.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[2] == "executed_fraction":
            out[parts[1]] = float(value)
    return out


@contextlib.contextmanager
def count_executed(model: LanguageModel) -> Iterator[dict[int, torch.Tensor]]:
    """Count, per routed layer, the tokens its routed block executes, from the layer's own decisions (not from the
    KV cache, so the cache can be checked against it)."""
    counts: dict[int, torch.Tensor] = {}

    def hook(i: int) -> Callable:
        def add(module: torch.nn.Module, args: Any, out: Any) -> None:
            counts[i] = counts.get(i, 0) + out.decisions.sum()

        return add

    handles = [layer.register_forward_hook(hook(i)) for i, layer in model.routed_layers()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def expected_kv_entries(model: LanguageModel, executed: dict[int, int], tokens_fed: int) -> int:
    """KV entries a cache holding exactly the executed tokens must have: every block stores each fed token, except
    a routed block with routed, selected attention, which stores only the tokens it executed."""
    routed = dict(model.routed_layers())
    total = 0
    for i, layer in enumerate(model.layers):
        n_blocks = getattr(layer, "n_blocks", 1)
        if i in routed:
            stored = tokens_fed if layer.full_context or layer.routed_sublayer == "mlp" else executed[i]
            total += (n_blocks - 1) * tokens_fed + stored
        else:
            total += n_blocks * tokens_fed
    return total


def off_capacity(fractions: dict[str, float], capacity: float) -> float:
    """Largest distance of a routed layer's executed fraction from the capacity."""
    return max((abs(f - capacity) for f in fractions.values()), default=0.0)


def tolerance(capacity: float) -> float:
    return max(FRACTION_TOLERANCE_ABS, FRACTION_TOLERANCE_REL * capacity)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):  # Linux names the CPU here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


@dataclass
class Settings:
    size: str = "small"
    models: tuple[str, ...] = ARCHS
    capacities: tuple[float, ...] = CAPACITIES
    repeats: int = 5
    warmup: int = 2
    dtype: str = "fp32"
    device: str = "cpu"
    decode_tokens: int = 256
    prompt_tokens: int = 64
    # Sampled, not greedy, by default: a random-weight model with tied embeddings greedily repeats the last prompt
    # token forever, so every routed layer would execute either none or all of the decoded tokens.
    decode_temperature: float = 1.0
    train_phase: bool = True  # False: inference phases only (forward, prefill, decode)
    layer_bench: bool = False
    compare_transformers: bool = False
    clock: str = "wall"  # wall | cpu (see CLOCKS)
    seed: int = 0


def csv_of(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse type: comma-separated values, each through `cast`."""
    return lambda text: tuple(cast(x) for x in text.split(",") if x.strip())


def check_models_and_capacities(
    p: argparse.ArgumentParser, models: tuple[str, ...], known: tuple[str, ...], capacities: tuple[float, ...]
) -> None:
    """--models must name known models and --capacities be numbers in (0, 1]; argparse's usage error otherwise."""
    unknown = sorted(set(models) - set(known))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(known)}")
    if not capacities or not all(0 < c <= 1 for c in capacities):
        p.error(f"--capacities must be numbers in (0, 1], got {capacities}")
