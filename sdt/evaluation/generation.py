"""Measured generation: KV-cache bytes and decode throughput against a dense twin, and sampled continuations."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from sdt.data import Tokenizer
from sdt.evaluation.usage import RequestUsage, request_usage
from sdt.models import LanguageModel, ModelCache, build_model

# How `python -m sdt.generate` samples unless told otherwise; an export's generation_config.json says the same.
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 50}  # temperature 0: greedy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _timed_generate(model: LanguageModel, prompt: Tensor, max_new_tokens: int) -> tuple[float, ModelCache]:
    cache = ModelCache()
    _sync(prompt.device)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens, temperature=0.0, cache=cache)
    _sync(prompt.device)
    return time.perf_counter() - start, cache


def measure_generation(model: LanguageModel, prompt: Tensor, max_new_tokens: int) -> dict[str, float]:
    """Greedy decoding of one sequence: measured KV-cache bytes, and decode throughput without the prefill
    (time for N tokens minus time for one token, which is the prefill plus the first step)."""
    first, _ = _timed_generate(model, prompt, 1)
    total, cache = _timed_generate(model, prompt, max_new_tokens)
    per_token = max(total - first, 1e-9) / max(max_new_tokens - 1, 1)
    return {
        "kv_bytes": cache.nbytes(),
        "kv_entries": cache.num_entries(),
        "tokens_per_second": 1.0 / per_token,
        "prefill_seconds": first,
    }


def generation_stats(
    model: LanguageModel,
    prompt_tokens: Any,
    device: torch.device,
    max_new_tokens: int,
    prompt_len: int = 16,
    repeats: int = 3,
) -> dict[str, Any]:
    """Real generation against a dense model of the same dimensions (random weights: cost does not depend on them).

    Batch size 1, greedy, in the model's causal mode, so a routed layer's cache holds only the tokens it executed.
    The two models are timed alternately, `repeats` times each, and the median is kept, so background load on
    the machine affects both alike.
    """
    prompt = torch.as_tensor(np.asarray(prompt_tokens[:prompt_len], dtype=np.int64))[None].to(device)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - prompt_len)
    dense = build_model(model.config.as_dense()).to(device).eval()
    measure_generation(model, prompt, 8)  # warm up kernels and allocator before timing either model
    measure_generation(dense, prompt, 8)
    runs: dict[str, list[dict[str, float]]] = {"model": [], "dense": []}
    for _ in range(max(1, repeats)):
        runs["model"].append(measure_generation(model, prompt, max_new_tokens))
        runs["dense"].append(measure_generation(dense, prompt, max_new_tokens))
    ours, ref = runs["model"][-1], runs["dense"][-1]  # cache sizes are deterministic: any run will do
    speed = {name: statistics.median(r["tokens_per_second"] for r in rs) for name, rs in runs.items()}
    return {
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": prompt_len,
        "repeats": repeats,
        "kv_bytes": ours["kv_bytes"],
        "kv_entries": ours["kv_entries"],
        "dense_kv_bytes": ref["kv_bytes"],
        "kv_bytes_ratio_vs_dense": ours["kv_bytes"] / ref["kv_bytes"],
        "tokens_per_second": speed["model"],
        "dense_tokens_per_second": speed["dense"],
        "tokens_per_second_ratio_vs_dense": speed["model"] / speed["dense"],
    }


def generate_samples(
    model: LanguageModel,
    tokenizer: Tokenizer,
    cfg: DictConfig,
    device: torch.device,
    valid_vocab: int,
    usages: list[RequestUsage] | None = None,
) -> list[dict[str, str]]:
    """One sampled continuation per prompt of `samples.prompts`; `usages` collects each request's compute."""
    samples = []
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    for prompt in cfg.samples.prompts:
        ids = tokenizer.encode(prompt)
        if not ids:
            ids = [tokenizer.eos_id]
        max_new = min(int(cfg.samples.max_new_tokens), model.config.max_seq_len - len(ids))
        cache = ModelCache()
        out = model.generate(
            torch.tensor([ids], device=device),
            max_new,
            temperature=float(cfg.samples.temperature),
            top_k=cfg.samples.top_k,
            valid_vocab=valid_vocab,
            generator=generator,
            cache=cache,
        )
        if usages is not None and max_new > 0:
            usages.append(request_usage(model, cache, max_new)[0])
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, len(ids) :].tolist())})
    return samples
