"""Activation checkpointing benchmark: peak training memory and step time with `model.activation_checkpointing` on
against off, per architecture, and the gradients of the two compared.

    python benchmarks/activation_checkpointing.py                      # d_model 512, T 2048, batch 1, 4 layers
    python benchmarks/activation_checkpointing.py --device cuda --dtype bf16 --n-layers 12 --out ac.json

Every (architecture, checkpointing) measurement runs in a fresh process, so that one's memory cannot hide in
another's, and the repeats are interleaved across all of them (background load hits each alike); the median of
`--repeats` is reported, with the ratio on / off of the same architecture measured in the same run.

Peak memory is what one training step (forward + backward, Top-K routing) adds on top of the weights and their
gradients: on CUDA `torch.cuda.max_memory_allocated` minus the memory allocated before the step; on CPU the process's
resident-set high-water mark (`ru_maxrss`) minus its resident set before the step (after a short warm-up step, so
one-time loading is not counted), with glibc told to return every
allocation of 64 KiB or more to the system when freed (`MALLOC_MMAP_THRESHOLD_`), so the resident set follows the live
tensors. The gradient check runs both variants on the same weights and batch in fp32 and reports the largest
absolute difference of any parameter's gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch

from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.training.activation_checkpointing import apply_activation_checkpointing

ARCHS = ("dense", "mod", "sdt", "stt")
TARGET_MEMORY_RATIO = 0.6  # issue 31: peak memory with checkpointing at most 0.6x without, at d_model 512, T 2048
GRAD_TOLERANCE = 1e-6


def model_config(args: argparse.Namespace, arch: str, checkpointing: bool) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.d_model // 64,
        n_kv_heads=max(1, args.d_model // 128),
        max_seq_len=args.seq_len,
        capacity=args.capacity,
        activation_checkpointing=checkpointing,
    )


def build(args: argparse.Namespace, arch: str, checkpointing: bool, device: torch.device) -> LanguageModel:
    torch.manual_seed(0)
    model = build_model(model_config(args, arch, checkpointing)).to(device).train()
    return apply_activation_checkpointing(model) if checkpointing else model


def batch(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab_size, (args.batch, args.seq_len), generator=g).to(device)


def step(model: LanguageModel, ids: torch.Tensor, dtype: str) -> None:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(ids, ids)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    loss.backward()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One architecture, checkpointing on or off: peak memory of the first step, then the time of `--steps`."""
    device = torch.device(args.device)
    model = build(args, args.worker_arch, args.worker_ac, device)
    ids = batch(args, device)
    # A short step first: what the first call loads once (checkpointing's machinery, kernels) is not activations.
    step(model, ids[:, :16], args.dtype)
    for p in model.parameters():  # gradients allocated up front: the same in both variants, not activations
        p.grad = torch.zeros_like(p)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, ids, args.dtype)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resident_bytes()
        step(model, ids, args.dtype)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, ids, args.dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "step_s": statistics.median(times)}


def measure(args: argparse.Namespace, arch: str, checkpointing: bool) -> dict[str, Any]:
    argv = [sys.executable, __file__, *sys.argv[1:], "--worker-arch", arch] + (["--worker-ac"] if checkpointing else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gradient_difference(args: argparse.Namespace, arch: str) -> float:
    """Largest |grad with checkpointing - grad without| over every parameter, fp32, same weights and batch."""
    device = torch.device(args.device)
    ids = batch(args, device)
    grads = []
    for checkpointing in (False, True):
        model = build(args, arch, checkpointing, device)
        step(model, ids, "fp32")
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        del model
    return max(float((grads[1][n] - g).abs().max()) for n, g in grads[0].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--capacity", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement, after the memory step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-grad-check", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker-arch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-ac", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_arch:
        print(json.dumps(worker(args)))
        return

    archs = args.archs.split(",")
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {(a, c): [] for a in archs for c in (False, True)}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for arch, checkpointing in order:
            runs[arch, checkpointing].append(measure(args, arch, checkpointing))
    results = []
    print(
        f"d_model {args.d_model}, {args.n_layers} layers, T {args.seq_len}, batch {args.batch}, vocab "
        f"{args.vocab_size}, capacity {args.capacity}, {args.device} {args.dtype}, median of {args.repeats}"
    )
    print(f"{'arch':6} {'peak off MiB':>12} {'peak on MiB':>12} {'mem ratio':>9} {'step off s':>10} "
          f"{'step on s':>10} {'time ratio':>10} {'max |dgrad|':>11}")  # fmt: skip
    for arch in archs:
        off = {k: statistics.median(m[k] for m in runs[arch, False]) for k in ("peak_bytes", "step_s")}
        on = {k: statistics.median(m[k] for m in runs[arch, True]) for k in ("peak_bytes", "step_s")}
        diff = None if args.skip_grad_check else gradient_difference(args, arch)
        row = {
            "arch": arch,
            "peak_mib_off": off["peak_bytes"] / 2**20,
            "peak_mib_on": on["peak_bytes"] / 2**20,
            "memory_ratio": on["peak_bytes"] / off["peak_bytes"],
            "step_s_off": off["step_s"],
            "step_s_on": on["step_s"],
            "time_ratio": on["step_s"] / off["step_s"],
            "max_grad_abs_diff": diff,
        }
        results.append(row)
        print(
            f"{arch:6} {row['peak_mib_off']:12.1f} {row['peak_mib_on']:12.1f} {row['memory_ratio']:9.3f} "
            f"{row['step_s_off']:10.3f} {row['step_s_on']:10.3f} {row['time_ratio']:10.3f} "
            f"{'n/a' if diff is None else f'{diff:.1e}':>11}"
        )
    worst = max(r["memory_ratio"] for r in results)
    grads_ok = all(r["max_grad_abs_diff"] is None or r["max_grad_abs_diff"] <= GRAD_TOLERANCE for r in results)
    print(
        f"target: peak memory <= {TARGET_MEMORY_RATIO}x without checkpointing: worst {worst:.3f}x "
        f"({'met' if worst <= TARGET_MEMORY_RATIO else 'MISSED'}); gradients within {GRAD_TOLERANCE}: "
        f"{'yes' if grads_ok else 'NO'}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
