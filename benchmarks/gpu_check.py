"""GPU check: what the first GPU run of the project should confirm, in under 8 minutes on one GPU.

    scripts/gpu_check.sh                       # CUDA, ~100M parameters; writes gpu_check.json
    scripts/gpu_check.sh --tiny                # any machine, tiny dimensions, about a minute: the pipeline end to end

Phases, in this order (a model that would start after `--budget-s` is skipped and says so in the JSON, which is
rewritten after every model so that a run stopped by the timeout keeps what it measured):

1. train: dense, MoD, SDT and STT at the same dimensions, each trained `--steps` steps in bf16 autocast (what
   `trainer.precision=bf16-mixed` runs) with AdamW on a fixed pool of random sequences (so the loss must fall: the
   models memorise it). Per model: step time, tokens/s and peak memory (CUDA: `max_memory_allocated`; CPU: the rise
   of the resident set during one step), each also as a ratio to dense, and the loss at the start and the end.
2. explain: `torch._dynamo.explain` of each model's training forward (graph and graph-break counts, break reasons).
3. decode: our dense model's greedy `generate` against `transformers`' `generate()` on its Qwen2 export (the same
   weights, through the export mapping of `sdt.models.pretrained`), and each trained routed model's decoding in its
   causal mode (thresholds calibrated on the training pool) against dense, tokens/s at batch 1.
4. compile: `torch.compile(fullgraph=True)` training steps (fails on any graph break), timed against eager; last,
   because compiling takes minutes.

The JSON holds every figure and a `checks` section; the exit status is 1 when a check fails (a non-finite or
non-falling loss, a graph break), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run as a script from a checkout: make the repository's `sdt` and the sibling benchmark modules importable.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch
from compute_common import machine, ratio, sync
from compute_twins import qwen2_twin
from scaling import pin_malloc, step_peak_bytes

from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds
from sdt.models.compute import compute_report
from sdt.training.optim import OptimConfig, build_optimizer

ARCHS = ("dense", "mod", "sdt", "stt")


@dataclasses.dataclass(frozen=True)
class Scale:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    batch: int
    steps: int
    pool: int  # distinct batches the training cycles through
    compile_steps: int
    prompt_tokens: int
    decode_tokens: int


SCALES = {
    # pretrain_125m's shape (GPT-2 small) with a 32K vocabulary: 110M parameters dense; 16K tokens a step.
    "gpu": Scale(768, 12, 12, 4, 32768, 1024, 16, 300, 8, 30, 64, 256),
    "tiny": Scale(64, 2, 2, 1, 256, 64, 2, 8, 2, 3, 8, 8),
}


@dataclasses.dataclass
class Settings:
    scale: str = "gpu"
    device: str = "cuda"
    capacity: float = 0.5
    steps: int | None = None  # None: the scale's
    compile_backend: str = "inductor"
    budget_s: float = 450.0
    seed: int = 0


def model_config(sc: Scale, arch: str, capacity: float) -> ModelConfig:
    """The model= defaults a user trains (skip maps for MoD and SDT, as conf/model/*.yaml) at the check's dims."""
    skip_map = "linear" if arch in ("mod", "sdt") else "none"
    return ModelConfig(
        arch=arch,
        vocab_size=sc.vocab_size,
        d_model=sc.d_model,
        n_layers=sc.n_layers,
        n_heads=sc.n_heads,
        n_kv_heads=sc.n_kv_heads,
        max_seq_len=max(sc.seq_len, sc.prompt_tokens + sc.decode_tokens),
        capacity=1.0 if arch == "dense" else capacity,
        skip_map=skip_map,
    )


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.monotonic(), seconds

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _train_step(model: LanguageModel, opt: torch.optim.Optimizer, ids: torch.Tensor, amp: Callable) -> torch.Tensor:
    with amp():
        out = model(ids, ids, routing="topk")  # labels are shifted inside the model
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def bench_train(
    s: Settings,
    sc: Scale,
    device: torch.device,
    amp: Callable,
    pool: list[torch.Tensor],
    budget: Budget,
    records: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, LanguageModel]:
    """Fills `records` (one entry per model, saved as each finishes); returns the trained models."""
    steps = s.steps or sc.steps
    warmup = min(10, steps // 4)
    models: dict[str, LanguageModel] = {}
    for arch in ARCHS:
        if arch != "dense" and budget.left() < 0:
            records[arch] = {"skipped": f"budget of {s.budget_s:.0f} s spent"}
            continue
        budget.log(f"train {arch}: {steps} steps")
        torch.manual_seed(s.seed)
        cfg = model_config(sc, arch, s.capacity)
        model = build_model(cfg).to(device).train()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
        losses = []
        for i in range(warmup):
            losses.append(_train_step(model, opt, pool[i % len(pool)], amp))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        for i in range(warmup, steps):
            losses.append(_train_step(model, opt, pool[i % len(pool)], amp))
        sync(device)
        step_s = (time.perf_counter() - start) / max(1, steps - warmup)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)  # weights, AdamW state and the step's activations
        else:
            peak = step_peak_bytes(lambda m=model, o=opt: _train_step(m, o, pool[0], amp))
        loss = torch.stack(losses).float().cpu().tolist()
        window = max(1, len(loss) // 10)
        report = compute_report(cfg, sc.seq_len)
        records[arch] = {
            "params": model.num_parameters(),
            "steps": steps,
            "step_s": step_s,
            "tokens_per_s": sc.batch * sc.seq_len / step_s,
            "peak_memory_bytes": peak,
            "train_flops_per_token": report["train_flops_per_token"],
            "train_flop_ratio": report["train_flops_ratio_vs_dense"],
            "achieved_tflops": report["train_flops_per_token"] * sc.batch * sc.seq_len / step_s / 1e12,
            "loss_first": statistics.mean(loss[:window]),
            "loss_last": statistics.mean(loss[-window:]),
            "loss_finite": all(math.isfinite(v) for v in loss),
        }
        opt.zero_grad(set_to_none=True)
        del opt
        models[arch] = model.eval()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dense, rec = records["dense"], records[arch]
        rec["step_time_ratio"] = ratio(rec["step_s"], dense["step_s"])
        rec["tokens_per_s_ratio"] = ratio(rec["tokens_per_s"], dense["tokens_per_s"])
        rec["peak_memory_ratio"] = ratio(rec["peak_memory_bytes"], dense["peak_memory_bytes"])
        save()
    return models


def _timed_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, pool: list[torch.Tensor], amp: Callable, n: int
) -> float:
    device = pool[0].device
    sync(device)
    start = time.perf_counter()
    for i in range(n):
        _train_step(model, opt, pool[i % len(pool)], amp)
    sync(device)
    return (time.perf_counter() - start) / n


def _compiled_vs_eager(
    s: Settings, sc: Scale, device: torch.device, amp: Callable, pool: list[torch.Tensor], model: torch.nn.Module
) -> dict[str, Any]:
    """Training steps of `torch.compile(model, fullgraph=True)` (which raises on any graph break) against eager."""
    compiled = torch.compile(model, fullgraph=True, backend=s.compile_backend)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    rec: dict[str, Any] = {}
    try:
        rec["compile_s"] = _timed_steps(compiled, opt, pool, amp, 1)  # the first call compiles forward and backward
    except RuntimeError as e:  # dynamo's Unsupported (a graph break) and backend failures are RuntimeErrors
        first_line = str(e).splitlines()[0] if str(e) else ""
        return {"fullgraph": False, "error": f"{type(e).__name__}: {first_line}"}
    timed = max(1, sc.compile_steps - 1)
    _timed_steps(model, opt, pool, amp, 1)  # eager warm-up after the compile's allocations
    rec["compiled_step_s"] = _timed_steps(compiled, opt, pool, amp, timed)
    rec["eager_step_s"] = _timed_steps(model, opt, pool, amp, timed)
    rec["speedup"] = rec["eager_step_s"] / rec["compiled_step_s"]
    rec["fullgraph"] = True
    return rec


def bench_explain(
    s: Settings,
    sc: Scale,
    device: torch.device,
    amp: Callable,
    pool: list[torch.Tensor],
    budget: Budget,
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """`torch._dynamo.explain` of each model's training forward (tracing only, no backend: seconds)."""
    for arch in ARCHS:
        budget.log(f"explain {arch}")
        torch.manual_seed(s.seed)
        model = build_model(model_config(sc, arch, s.capacity)).to(device).train()
        torch._dynamo.reset()
        with amp():
            explained = torch._dynamo.explain(model)(pool[0], pool[0], routing="topk")
        out[arch] = {
            "graph_count": explained.graph_count,
            "graph_break_count": explained.graph_break_count,
            "break_reasons": [str(r.reason) for r in explained.break_reasons],
        }
        torch._dynamo.reset()
        save()


def bench_compiled(
    s: Settings,
    sc: Scale,
    device: torch.device,
    amp: Callable,
    pool: list[torch.Tensor],
    budget: Budget,
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Each model's `torch.compile(fullgraph=True)` training steps against eager, while the budget lasts."""
    for arch in ARCHS:
        if budget.left() < 0:
            out[arch]["compiled"] = {"skipped": f"budget of {s.budget_s:.0f} s spent"}
            continue
        budget.log(f"compile {arch}: fullgraph training steps ({s.compile_backend})")
        torch.manual_seed(s.seed)
        model = build_model(model_config(sc, arch, s.capacity)).to(device).train()
        torch._dynamo.reset()
        out[arch]["compiled"] = _compiled_vs_eager(s, sc, device, amp, pool, model)
        torch._dynamo.reset()
        save()


def bench_decode(
    s: Settings,
    sc: Scale,
    device: torch.device,
    amp: Callable,
    pool: list[torch.Tensor],
    models: dict[str, LanguageModel],
    budget: Budget,
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    P, N = sc.prompt_tokens, sc.decode_tokens
    prompt = pool[0][:1, :P]

    def timed(fn: Callable[[], torch.Tensor], repeats: int = 3) -> tuple[float, torch.Tensor]:
        fn()  # warm-up
        times, out = [], None
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), amp():
                out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    budget.log("decode: ours against transformers' generate()")
    # Ours against transformers on the same weights: greedy, the whole call (prefill included), N tokens.
    ours, hf = qwen2_twin(model_config(sc, "dense", 1.0), device)
    hf_kw = {"max_new_tokens": N, "min_new_tokens": N, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    ours_s, ours_out = timed(lambda: ours.generate(prompt, N, temperature=0.0))
    hf_s, hf_out = timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), **hf_kw))
    same = bool(torch.equal(ours_out, hf_out))
    out.update(prompt_tokens=P, decode_tokens=N)
    out["transformers"] = {
        "version": __import__("transformers").__version__,
        "model": "Qwen2ForCausalLM (sdpa attention), weights from our export mapping",
        "sdt_tokens_per_s": N / ours_s,
        "transformers_tokens_per_s": N / hf_s,
        "tokens_per_s_ratio": hf_s / ours_s,  # > 1: ours decodes faster
        "same_tokens": same,
    }
    save()
    # The trained models in their causal modes, against the trained dense model.
    rates: dict[str, Any] = {}
    out["trained_models"] = rates
    calibration = pool[: min(4, len(pool))]
    for arch, model in models.items():
        if budget.left() < 0:
            rates[arch] = {"skipped": f"budget of {s.budget_s:.0f} s spent"}
            continue
        budget.log(f"decode {arch}")
        if arch != "dense":
            with amp():
                calibrate_thresholds(model, calibration)
        gen = torch.Generator(device=device)
        seconds, _ = timed(lambda m=model, g=gen: m.generate(prompt, N, temperature=1.0, generator=g.manual_seed(0)))
        rates[arch] = {
            "routing": model.config.inference_routing if arch != "dense" else None,
            "tokens_per_s": N / seconds,
        }
        save()
    for rec in rates.values():
        if "tokens_per_s" in rec and "tokens_per_s" in rates.get("dense", {}):
            rec["tokens_per_s_ratio"] = rec["tokens_per_s"] / rates["dense"]["tokens_per_s"]
    save()


def checks(result: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for arch, rec in result["train"].items():
        if "loss_last" in rec:
            out[f"train/{arch}/loss_finite"] = rec["loss_finite"]
            out[f"train/{arch}/loss_falls"] = rec["loss_last"] < rec["loss_first"]
    for arch, rec in (result.get("compile") or {}).items():
        if isinstance(rec, dict) and "graph_break_count" in rec:
            # explain finds no break, and fullgraph=True compiled (where that phase ran within the budget).
            fullgraph = rec.get("compiled", {}).get("fullgraph", True)
            out[f"compile/{arch}/no_graph_break"] = rec["graph_break_count"] == 0 and fullgraph
    return out


def run(s: Settings, command: str = "", out: Path | None = None) -> dict[str, Any]:
    budget = Budget(s.budget_s)
    sc = SCALES[s.scale]
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU run uses for any fp32 matmul left under autocast
        torch.backends.cudnn.allow_tf32 = True
    else:
        pin_malloc()

    @contextlib.contextmanager
    def amp() -> Iterator[None]:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield

    g = torch.Generator().manual_seed(s.seed)
    pool = [torch.randint(0, sc.vocab_size, (sc.batch, sc.seq_len), generator=g).to(device) for _ in range(sc.pool)]
    result: dict[str, Any] = {
        "meta": {
            **machine(),
            **dataclasses.asdict(s),
            "dims": dataclasses.asdict(sc),
            "dtype": "bf16 autocast",
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
    }

    def save() -> None:
        # After every model of every phase: a run stopped by the timeout keeps what it measured.
        result["checks"] = checks(result)
        result["passed"] = all(result["checks"].values())
        result["elapsed_s"] = budget.elapsed()
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")

    # Order: what matters most first. Tracing for graph breaks takes seconds; compiling takes minutes, so it is last.
    result["train"], result["compile"], result["decode"] = {}, {"backend": s.compile_backend}, {}
    models = bench_train(s, sc, device, amp, pool, budget, result["train"], save)
    bench_explain(s, sc, device, amp, pool, budget, result["compile"], save)
    if budget.left() > 0:
        bench_decode(s, sc, device, amp, pool, models, budget, result["decode"], save)
    else:
        result["decode"] = {"skipped": f"budget of {s.budget_s:.0f} s spent"}
    bench_compiled(s, sc, device, amp, pool, budget, result["compile"], save)
    save()
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"{'model':>6} {'params':>9} {'step ms':>8} {'tok/s':>9} {'peak MiB':>9} {'time x':>7} {'mem x':>6} loss"]
    for arch, r in result["train"].items():
        if "step_s" not in r:
            lines.append(f"{arch:>6} {r.get('skipped', '')}")
            continue
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        mem = "n/a" if r["peak_memory_ratio"] is None else f"{r['peak_memory_ratio']:.2f}"
        lines.append(
            f"{arch:>6} {r['params'] / 1e6:8.1f}M {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} {peak:>9} "
            f"{r['step_time_ratio']:7.2f} {mem:>6} {r['loss_first']:.2f} -> {r['loss_last']:.2f}"
        )
    for arch, r in result["compile"].items():
        if isinstance(r, dict) and "graph_break_count" in r:
            c = r.get("compiled", {})
            extra = (
                f", compiled {c['speedup']:.2f}x eager" if "speedup" in c else f", {c.get('error') or c.get('skipped')}"
            )
            lines.append(f"compile {arch}: {r['graph_count']} graph(s), {r['graph_break_count']} break(s){extra}")
    hf = result["decode"].get("transformers") if isinstance(result["decode"], dict) else None
    if hf:
        lines.append(
            f"decode: ours {hf['sdt_tokens_per_s']:.0f} tok/s, transformers {hf['transformers_tokens_per_s']:.0f} "
            f"tok/s (x{hf['tokens_per_s_ratio']:.2f}, same tokens: {hf['same_tokens']})"
        )
    failed = [k for k, ok in result["checks"].items() if not ok]
    lines.append(
        f"checks: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)} ({result['elapsed_s']:.0f} s)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny dimensions and steps, on the CPU unless --device cuda")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: 300; --tiny: 8)")
    p.add_argument("--capacity", type=float, default=0.5, help="capacity of the routed models")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default: inductor; --tiny: aot_eager)"
    )
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the phases that would start after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON of the figures")
    a = p.parse_args(argv)
    device = a.device or ("cpu" if a.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is available: run on a GPU machine, or pass --tiny for the CPU dry run")
    if not 0 < a.capacity <= 1:
        p.error(f"--capacity must be in (0, 1], got {a.capacity}")
    if a.steps is not None and a.steps < 2:
        p.error("--steps must be >= 2")
    backend = a.compile_backend or ("aot_eager" if a.tiny else "inductor")
    s = Settings("tiny" if a.tiny else "gpu", device, a.capacity, a.steps, backend, a.budget_s, a.seed)
    return s, a.out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, out = parse_args(argv)
    result = run(settings, shlex.join(["python", "benchmarks/gpu_check.py", *argv]), out)
    print(summary(result))
    print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
