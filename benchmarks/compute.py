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
beside the analytic FLOP ratios of `sdt.compute`. Untrained routers are calibrated to the capacity on random batches
before the causal phases; the routing mode used and the executed fraction measured per routed layer are reported.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Run as a script from a checkout (`python benchmarks/compute.py`): make the repository's `sdt` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdt.compute import block_flops, compute_report
from sdt.models import LanguageModel, ModelCache, ModelConfig, build_model
from sdt.models.layers import Block, RotaryEmbedding
from sdt.optim import OptimConfig, build_optimizer
from sdt.routing import capacity_k, run_routed_block, topk_indices
from sdt.routing.calibration import calibrate_thresholds


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


# --------------------------------------------------------------------------------------------------- helpers


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
    a routed block, which stores only the tokens it executed (selected attention)."""
    routed = dict(model.routed_layers())
    total = 0
    for i, layer in enumerate(model.layers):
        n_blocks = getattr(layer, "n_blocks", 1)
        if i in routed:
            total += (n_blocks - 1) * tokens_fed + executed[i]
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


# --------------------------------------------------------------------------------------------------- benchmark


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
    layer_bench: bool = False
    compare_transformers: bool = False
    clock: str = "wall"  # wall | cpu (see CLOCKS)
    seed: int = 0


def bench_capacity(s: Settings, capacity: float, device: torch.device, amp: Callable) -> list[dict[str, Any]]:
    """Measure dense and the routed models at one capacity; one record per model."""
    timer = Timer(device, s.clock)
    size = SIZES[s.size]
    B, T, P, N = size.batch, size.seq_len, s.prompt_tokens, s.decode_tokens
    max_seq_len = max(T, P + N)  # only sizes the RoPE tables
    names = ["dense", *[a for a in s.models if a != "dense"]]  # dense is always measured: it is the reference
    models: dict[str, LanguageModel] = {}
    for arch in names:
        torch.manual_seed(s.seed)
        models[arch] = build_model(model_config(size, arch, capacity, max_seq_len)).to(device)
    g = torch.Generator().manual_seed(s.seed)
    ids, targets = (torch.randint(0, size.vocab_size, (B, T), generator=g).to(device) for _ in range(2))
    calibration = [torch.randint(0, size.vocab_size, (B, T), generator=g) for _ in range(CALIBRATION_BATCHES)]
    prompt = torch.randint(0, size.vocab_size, (1, P), generator=g).to(device)

    # The optimiser steps of the training phase make the untrained routers' scores nearly constant (they learn the base
    # rate first), which no threshold can split: the causal phases start again from the initial weights.
    initial = {name: copy.deepcopy(m.state_dict()) for name, m in models.items()}
    optimizers = {name: build_optimizer(m, OptimConfig()) for name, m in models.items()}

    def train_step(name: str) -> None:
        model, opt = models[name], optimizers[name]
        with amp():
            out = model(ids, targets, routing="topk")
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for m in models.values():
        m.train()
    train_s = interleaved({n: lambda n=n: train_step(n) for n in names}, s.warmup, s.repeats, timer)
    peak: dict[str, int | None] = {}
    for name in names:
        if device.type == "cuda":
            # What one step allocates on top of the weights and AdamW state: activations, gradients, temporaries.
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            train_step(name)
            sync(device)
            peak[name] = torch.cuda.max_memory_allocated(device) - base
        else:
            peak[name] = None  # see README: no per-step peak exists for torch's CPU allocator
    optimizers.clear()  # free the AdamW state before the inference phases
    for name, m in models.items():
        m.load_state_dict(initial[name])
    del initial

    # Causal modes: calibrate, then keep the model's own mode unless it misses the capacity and another one hits it.
    calibration = [c.to(device) for c in calibration]
    routing: dict[str, str | None] = {"dense": None}
    notes: dict[str, str] = {"dense": ""}
    fwd_fractions: dict[str, dict[str, float]] = {"dense": {}}
    for name, model in models.items():
        model.eval()
        if name == "dense":
            continue
        with amp():
            calibrate_thresholds(model, calibration)  # causal, layer by layer, for every mode
        tried: dict[str, dict[str, float]] = {}
        for mode in dict.fromkeys([model.config.inference_routing, FALLBACK_ROUTING.get(name)]):
            if mode is None:
                continue
            with torch.no_grad(), amp():
                tried[mode] = executed_fractions(model(ids, routing=mode).stats)
            if off_capacity(tried[mode], capacity) <= tolerance(capacity):
                break
        # First within tolerance, else the closest. Modes read separate thresholds, so trying one keeps the other's.
        mode = min(tried, key=lambda m: off_capacity(tried[m], capacity))
        routing[name], fwd_fractions[name] = mode, tried[mode]
        notes[name] = "; ".join(
            f"{m} executes {statistics.mean(f.values()):.3f}"
            + ("" if off_capacity(f, capacity) <= tolerance(capacity) else f" (off capacity {capacity})")
            for m, f in tried.items()
        )

    def forward(name: str) -> None:
        with torch.no_grad(), amp():
            models[name](ids, routing=routing[name], diagnostics=False)

    def prefill(name: str) -> None:
        with torch.no_grad(), amp():
            models[name](prompt, cache=ModelCache(), routing=routing[name], logits_to_keep=1)

    caches: dict[str, ModelCache] = {}

    def decode(name: str, n: int) -> None:
        caches[name] = ModelCache()
        sampler = torch.Generator(device=device).manual_seed(s.seed)  # same stream on every repeat: same KV bytes
        with amp():
            models[name].generate(
                prompt,
                n,
                temperature=s.decode_temperature,
                cache=caches[name],
                routing=routing[name],
                generator=sampler,
            )

    forward_s = interleaved({n: lambda n=n: forward(n) for n in names}, s.warmup, s.repeats, timer)
    prefill_s = interleaved({n: lambda n=n: prefill(n) for n in names}, s.warmup, s.repeats, timer)
    for _ in range(s.warmup):  # a short generation warms the decode kernels; a full one would double the cost
        for name in names:
            decode(name, min(N, 8))
    generate_s = interleaved({n: lambda n=n: decode(n, N) for n in names}, 0, s.repeats, timer)
    # One more, untimed generation per model (same sampler seed, so the same tokens and decisions), counting what each
    # routed layer executes: the KV bytes are then checked against the bytes those tokens need.
    tokens_fed = P + N - 1  # the last generated token is never fed back
    executed_decode: dict[str, dict[int, int]] = {}
    for name in names:
        nbytes = caches[name].nbytes()
        with count_executed(models[name]) as counts:
            decode(name, N)
        executed_decode[name] = {i: int(c) for i, c in counts.items()}
        if caches[name].nbytes() != nbytes:
            raise RuntimeError(f"{name}: a repeated generation with the same seed held different KV bytes")
    dense_entry_bytes = caches["dense"].nbytes() / (size.n_layers * tokens_fed)  # K and V of one token in one block

    med = {
        "train_step_s": {n: statistics.median(v) for n, v in train_s.items()},
        "forward_s": {n: statistics.median(v) for n, v in forward_s.items()},
        "prefill_s": {n: statistics.median(v) for n, v in prefill_s.items()},
        "generate_s": {n: statistics.median(v) for n, v in generate_s.items()},
    }
    # generate() = one prefill of the prompt + the decode loop: the prefill is measured separately and taken out.
    decode_s = {n: max(med["generate_s"][n] - med["prefill_s"][n], 1e-12) / N for n in names}
    records = []
    for name in names:
        if name not in s.models:
            continue
        model, cache = models[name], caches[name]
        train_report = compute_report(model.config, T)
        record: dict[str, Any] = {
            "model": name,
            "capacity": capacity,
            "routing_mode": routing[name],
            "routing_note": notes[name],
            "executed_fraction": {
                "forward": fwd_fractions[name],
                "decode": {str(i): c / tokens_fed for i, c in executed_decode[name].items()},
            },
            # Analytic (sdt.compute), model / dense: FLOPs per token; KV entries after decoding.
            "train_flop_ratio": train_report["train_flops_ratio_vs_dense"],
            "forward_flop_ratio": train_report["flops_ratio_vs_dense"],
            "prefill_flop_ratio": compute_report(model.config, P)["flops_ratio_vs_dense"],
            "analytic_kv_ratio": compute_report(model.config, tokens_fed)["kv_entries_ratio_vs_dense"],
            # The same at the executed fractions counted during decoding: what a cache holding exactly the executed
            # tokens needs. kv_bytes_ratio / this is 1 when the cache stores nothing else.
            "executed_kv_ratio": expected_kv_entries(model, executed_decode[name], tokens_fed)
            / (size.n_layers * tokens_fed),
            # Measured medians.
            "train_step_s": med["train_step_s"][name],
            "forward_s": med["forward_s"][name],
            "prefill_s": med["prefill_s"][name],
            "generate_s": med["generate_s"][name],
            "decode_s_per_token": decode_s[name],
            "decode_tokens_per_s": 1.0 / decode_s[name],
            "kv_bytes": cache.nbytes(),
            "expected_kv_bytes": expected_kv_entries(model, executed_decode[name], tokens_fed) * dense_entry_bytes,
            "kv_entries": cache.num_entries(),
            "peak_memory_bytes": peak[name],
            "samples_s": {
                "train_step": train_s[name],
                "forward": forward_s[name],
                "prefill": prefill_s[name],
                "generate": generate_s[name],
            },
        }
        dense_cache = caches["dense"]
        record.update(
            train_step_ratio=ratio(med["train_step_s"][name], med["train_step_s"]["dense"]),
            forward_ratio=ratio(med["forward_s"][name], med["forward_s"]["dense"]),
            prefill_ratio=ratio(med["prefill_s"][name], med["prefill_s"]["dense"]),
            decode_ratio=ratio(decode_s[name], decode_s["dense"]),
            kv_bytes_ratio=ratio(cache.nbytes(), dense_cache.nbytes()),
            peak_memory_ratio=ratio(peak[name], peak["dense"]),
        )
        records.append(record)
    return records


def bench_layer(s: Settings, device: torch.device, amp: Callable) -> dict[str, Any]:
    """One routed block (Top-K selection + gather + block on k tokens + scatter) vs one block on all T tokens."""
    timer = Timer(device, s.clock)
    size = SIZES[s.size]
    B, T = size.batch, max(LAYER_BENCH_MIN_SEQ_LEN, size.seq_len)
    cfg = model_config(size, "dense", LAYER_BENCH_CAPACITY, T)
    k = capacity_k(T, LAYER_BENCH_CAPACITY)
    torch.manual_seed(s.seed)
    block = Block(cfg).to(device)
    rope = RotaryEmbedding(cfg.head_dim, T, cfg.rope_theta).to(device)
    x = torch.randn(B, T, cfg.d_model, device=device, requires_grad=True)
    positions = torch.arange(T, device=device).expand(B, T)
    scores, gate = torch.rand(B, T, device=device), torch.rand(B, T, device=device, requires_grad=True)

    def dense() -> torch.Tensor:
        with amp():
            return block(x, positions, rope)

    def routed() -> torch.Tensor:
        with amp():
            return run_routed_block(block, x, positions, rope, topk_indices(scores, k), gate, cfg.gate_mode)

    def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def train(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn().float().sum().backward()
            block.zero_grad(set_to_none=True)
            x.grad, gate.grad = None, None

        return run

    fwd = interleaved({"dense": no_grad(dense), "routed": no_grad(routed)}, s.warmup, s.repeats, timer)
    trn = interleaved({"dense": train(dense), "routed": train(routed)}, s.warmup, s.repeats, timer)
    med = {phase: {n: statistics.median(v) for n, v in d.items()} for phase, d in (("forward", fwd), ("train", trn))}
    flops_routed, flops_dense = sum(block_flops(cfg, T, k).values()), sum(block_flops(cfg, T).values())
    return {
        "seq_len": T,
        "batch": B,
        "capacity": LAYER_BENCH_CAPACITY,
        "k": k,
        "flop_ratio": flops_routed / flops_dense,  # forward and backward alike (backward ~ 2x forward for both)
        "dense_forward_s": med["forward"]["dense"],
        "routed_forward_s": med["forward"]["routed"],
        "forward_ratio": med["forward"]["routed"] / med["forward"]["dense"],
        "dense_train_s": med["train"]["dense"],
        "routed_train_s": med["train"]["routed"],
        "train_ratio": med["train"]["routed"] / med["train"]["dense"],
    }


def qwen2_twin(cfg: ModelConfig, device: torch.device) -> tuple[LanguageModel, torch.nn.Module]:
    """Our dense model and `transformers`' Qwen2 of the same config, with the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM  # only this phase needs transformers

    cfg = dataclasses.replace(cfg, arch="dense", qkv_bias=True)  # Qwen2 always has q/k/v biases
    ours = build_model(cfg).to(device).eval()
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    hf = Qwen2ForCausalLM(hf_cfg).to(device).eval()
    # Our names are HF's inside a block; the stack wraps each block as layers.{i}.block.
    state = {
        (name if name.startswith("lm_head.") else "model." + name.replace(".block.", ".")): value
        for name, value in ours.state_dict().items()
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to Qwen2 failed: missing {missing}, unexpected {unexpected}")
    return ours, hf


def bench_transformers(s: Settings, device: torch.device, amp: Callable) -> dict[str, Any]:
    """Our dense forward vs `transformers`' Qwen2 forward of the same config and weights, same batch."""
    timer = Timer(device, s.clock)
    size = SIZES[s.size]
    ours, hf = qwen2_twin(model_config(size, "dense", 1.0, size.seq_len), device)
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, size.vocab_size, (size.batch, size.seq_len), generator=g).to(device)
    with torch.no_grad(), amp():
        # Same weights must give the same logits, or the timing compares different computations.
        diff = (ours(ids).logits.float() - hf(input_ids=ids, use_cache=False).logits.float()).abs().max().item()

    def forward(model: torch.nn.Module, **kw: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), amp():
                model(ids, **kw)

        return run

    # Two models and one cheap phase: three times the repeats, since the two differ by a few percent at most.
    fns = {"sdt": forward(ours), "transformers": forward(hf, use_cache=False)}
    fwd = interleaved(fns, s.warmup, 3 * s.repeats, timer)
    med = {n: statistics.median(v) for n, v in fwd.items()}
    return {
        "model": "Qwen2ForCausalLM (sdpa attention)",
        "transformers": __import__("transformers").__version__,
        "max_abs_logit_diff": diff,
        "sdt_forward_s": med["sdt"],
        "transformers_forward_s": med["transformers"],
        "forward_ratio": med["sdt"] / med["transformers"],
        "samples_s": fwd,
    }


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


# --------------------------------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mean_fraction(fractions: dict[str, float]) -> float | None:
    return statistics.mean(fractions.values()) if fractions else None


TABLE_COLUMNS = (
    # header, how to render a record
    ("model", lambda r: r["model"]),
    ("cap", lambda r: f"{r['capacity']:g}"),
    ("mode", lambda r: r["routing_mode"] or "-"),
    ("exec fwd", lambda r: _fmt(_mean_fraction(r["executed_fraction"]["forward"]), ".3f")),
    ("exec dec", lambda r: _fmt(_mean_fraction(r["executed_fraction"]["decode"]), ".3f")),
    ("train FLOP", lambda r: _fmt(r["train_flop_ratio"])),
    ("train time", lambda r: _fmt(r["train_step_ratio"])),
    ("fwd FLOP", lambda r: _fmt(r["forward_flop_ratio"])),
    ("fwd time", lambda r: _fmt(r["forward_ratio"])),
    ("prefill", lambda r: _fmt(r["prefill_ratio"])),
    ("decode", lambda r: _fmt(r["decode_ratio"])),
    ("KV calc", lambda r: _fmt(r["analytic_kv_ratio"])),
    ("KV exec", lambda r: _fmt(r["executed_kv_ratio"])),
    ("KV bytes", lambda r: _fmt(r["kv_bytes_ratio"])),
    ("peak mem", lambda r: _fmt(r["peak_memory_ratio"])),
    ("train ms", lambda r: _fmt(r["train_step_s"] * 1e3, ".1f")),
    ("decode tok/s", lambda r: _fmt(r["decode_tokens_per_s"], ".1f")),
)


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    return [h for h, _ in TABLE_COLUMNS], [[fn(r) for _, fn in TABLE_COLUMNS] for r in records]


def format_table(result: dict[str, Any]) -> str:
    header, rows = table_rows(result["records"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "ratios: model / dense (time or bytes; < 1 is cheaper); FLOP and KV calc columns: analytic (sdt.compute)"
    )
    layer = result.get("layer_bench")
    if layer:
        lines.append(_layer_line(layer))
    if result.get("transformers"):
        lines.append(_transformers_line(result["transformers"]))
    return "\n".join(lines)


# Issue targets, as ratios measured in one run: (a) a routed layer at capacity 0.25 costs at most 1.2x its FLOP ratio;
# (b) whole-model train-step and forward time ratios at most 1.25x their FLOP ratios; (c) KV bytes equal the analytic
# ratio within 2%; (d) our dense forward no slower than transformers' Qwen2.
LAYER_TARGET, MODEL_TARGET, KV_TARGET, HF_TARGET = 1.2, 1.25, 0.02, 1.0


def target_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target check: what, measured value, bound, whether it holds."""
    rows = []

    def check(target: str, what: str, value: float | None, bound: float, ok: bool | None = None) -> None:
        if value is not None:
            rows.append({"target": target, "what": what, "value": value, "bound": bound,
                         "ok": value <= bound if ok is None else ok})  # fmt: skip

    layer = result.get("layer_bench")
    if layer:
        for phase in ("forward", "train"):
            what = f"routed block {phase} time / FLOP ratio (T={layer['seq_len']}, capacity {layer['capacity']})"
            check("a", what, layer[f"{phase}_ratio"] / layer["flop_ratio"], LAYER_TARGET)
    for r in result["records"]:
        if r["model"] == "dense":
            continue
        name = f"{r['model']} @ {r['capacity']:g}"
        check("b", f"{name}: train-step time / FLOP ratio", ratio(r["train_step_ratio"], r["train_flop_ratio"]),
              MODEL_TARGET)  # fmt: skip
        check("b", f"{name}: forward time / FLOP ratio", ratio(r["forward_ratio"], r["forward_flop_ratio"]),
              MODEL_TARGET)  # fmt: skip
        for key, label in (("executed_kv_ratio", "at the executed fractions"), ("analytic_kv_ratio", "at capacity")):
            rel = abs(r["kv_bytes_ratio"] / r[key] - 1)
            check("c", f"{name}: |KV bytes / analytic {label} - 1|", rel, KV_TARGET)
    hf = result.get("transformers")
    if hf:
        check("d", "dense forward time / transformers Qwen2 forward time", hf["forward_ratio"], HF_TARGET)
    return rows


def format_targets(result: dict[str, Any]) -> list[str]:
    rows = target_checks(result)
    if not rows:
        return []
    lines = ["| target | check | measured | bound | holds |", "|---|---|---|---|---|"]
    lines += [f"| ({r['target']}) | {r['what']} | {r['value']:.3f} | {r['bound']:g} | {'yes' if r['ok'] else '**no**'} |"
              for r in rows]  # fmt: skip
    return lines


def _layer_line(layer: dict[str, Any]) -> str:
    return (
        f"one routed block at capacity {layer['capacity']} (k={layer['k']} of T={layer['seq_len']}, batch "
        f"{layer['batch']}) vs one dense block: forward {layer['forward_ratio']:.3f}, forward+backward "
        f"{layer['train_ratio']:.3f}, analytic FLOPs {layer['flop_ratio']:.3f}"
    )


def _transformers_line(hf: dict[str, Any]) -> str:
    return (
        f"dense forward vs transformers {hf['transformers']} {hf['model']}, same config and weights: "
        f"{hf['forward_ratio']:.3f} ({hf['sdt_forward_s'] * 1e3:.1f} ms vs {hf['transformers_forward_s'] * 1e3:.1f} "
        f"ms; max |logit diff| {hf['max_abs_logit_diff']:.1e})"
    )


def format_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    header, rows = table_rows(result["records"])
    device = meta["device"] + (f" ({meta['cuda_device']})" if meta["device"] == "cuda" else "")
    lines = [
        "# Compute benchmark",
        "",
        (
            f"- Machine: {meta['cpu']}, {meta['cpu_count']} CPUs, {meta['platform']}; torch {meta['torch']} with "
            f"{meta['torch_threads']} threads; device {device}; dtype {meta['dtype']}; clock {meta['clock']}"
        ),
        f"- Command: `{meta['command']}`",
        (
            f"- Size `{meta['size']}`: {', '.join(f'{k}={v}' for k, v in meta['dims'].items())}; prompt "
            f"{meta['prompt_tokens']} tokens, decode {meta['decode_tokens']} tokens (temperature "
            f"{meta['decode_temperature']}); median of {meta['repeats']} repeats after {meta['warmup']} warmup; "
            f"{meta['date']}"
        ),
        f"- Peak memory: {meta['peak_memory_source']}",
        "",
        (
            "Every ratio is model / dense of the same quantity, measured in the same run (< 1 is cheaper). FLOP "
            "and KV calc columns are analytic (`sdt.compute`, at the nominal capacity); `exec fwd` / `exec dec` are "
            "the measured executed fractions of the routed layers (mean over layers) in the forward and in prefill + "
            "decode, in the causal mode of the `mode` column; `KV exec` is the analytic KV ratio at the executed "
            "fractions counted while decoding (what a cache holding exactly the executed tokens needs), beside the "
            "bytes the cache really held (`KV bytes`)."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    notes = [f"- {r['model']} @ {r['capacity']:g}: {r['routing_note']}" for r in result["records"] if r["routing_note"]]
    if notes:
        lines += ["", "Causal modes tried (executed fraction on the benchmark batch, mean over routed layers):", *notes]
    if result.get("layer_bench"):
        lines += ["", f"Per layer: {_layer_line(result['layer_bench'])}."]
    if result.get("transformers"):
        lines += ["", f"Against `transformers`: {_transformers_line(result['transformers'])}."]
    targets = format_targets(result)
    if targets:
        lines += ["", "Targets (benchmarks/README.md):", "", *targets]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- CLI


def _csv(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    return lambda text: tuple(cast(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--models", type=_csv(str), default=ARCHS, help="comma-separated; dense is always measured")
    p.add_argument("--capacities", type=_csv(float), default=CAPACITIES, help="comma-separated, each in (0, 1]")
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
    unknown = sorted(set(a.models) - set(ARCHS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(ARCHS)}")
    if not a.capacities or not all(0 < c <= 1 for c in a.capacities):
        p.error(f"--capacities must be numbers in (0, 1], got {a.capacities}")
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
