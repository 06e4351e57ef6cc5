"""The compute benchmark's main phases: dense and routed models of one size and capacity, measured in one process."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch
from compute_common import (
    CALIBRATION_BATCHES,
    FALLBACK_ROUTING,
    SIZES,
    Settings,
    Timer,
    count_executed,
    executed_fractions,
    expected_kv_entries,
    interleaved,
    model_config,
    off_capacity,
    ratio,
    sync,
    tolerance,
)

from sdt.models import LanguageModel, ModelCache, build_model
from sdt.models.calibration import calibrate_thresholds
from sdt.models.compute import compute_report, measured_flops
from sdt.training.optim import OptimConfig, build_optimizer


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
    train_s: dict[str, list[float]] = {n: [] for n in names}
    if s.train_phase:
        train_s = interleaved({n: lambda n=n: train_step(n) for n in names}, s.warmup, s.repeats, timer)
    peak: dict[str, int | None] = {}
    for name in names:
        if device.type == "cuda" and s.train_phase:
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
        "train_step_s": {n: statistics.median(v) if v else None for n, v in train_s.items()},
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
            # Analytic (sdt.models.compute), model / dense: FLOPs per token; KV entries after decoding.
            "train_flop_ratio": train_report["train_flops_ratio_vs_dense"],
            "forward_flop_ratio": train_report["flops_ratio_vs_dense"],
            "prefill_flop_ratio": compute_report(model.config, P)["flops_ratio_vs_dense"],
            # The request's FLOPs (prompt + decoded tokens, logits at the generated positions) at the executed counts
            # of decoding: what the decode time ratio is held against (untrained routers decode off capacity).
            "decode_flop_ratio": measured_flops(
                model.config, tokens_fed, [executed_decode[name][i] for i in sorted(executed_decode[name])], N
            )["flops_ratio_vs_dense"],
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
            "kv_reserved_bytes": cache.reserved_nbytes(),
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
