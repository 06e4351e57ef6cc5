"""Compute per request: what each generated sequence really spent, read from the cache its generation filled.

A request is one sequence of a `generate` batch. Its usage is counted from what ran, not from the capacity: the
tokens each routed layer executed (recorded by the model in the `ModelCache` on every cached forward), the FLOPs
those counts cost (sdt.models.compute), and the bytes of the K/V entries the cache holds for it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from sdt.models import LanguageModel, ModelCache
from sdt.models.compute import measured_flops


@dataclass
class RequestUsage:
    tokens: int  # tokens the model processed for this sequence: real prompt tokens and the generated ones fed back
    executed_fraction: dict[int, float]  # routed layer index -> share of the tokens it executed
    mean_executed_fraction: float  # over routed layers (1.0 for a dense model)
    flops: float  # forward FLOPs spent, prefill and decoding
    flops_ratio_vs_dense: float  # against a dense model of the same dimensions on the same tokens
    kv_bytes: int  # bytes of the K/V entries held for this sequence
    kv_bytes_ratio_vs_dense: float  # against every layer holding every token

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["executed_fraction"] = {str(k): v for k, v in self.executed_fraction.items()}
        return d


def request_usage(model: LanguageModel, cache: ModelCache, generated: int) -> list[RequestUsage]:
    """One entry per sequence of the batch whose generation filled `cache`; `generated` is max_new_tokens (the
    number of positions whose logits were computed)."""
    per_seq = cache.nbytes_per_sequence()
    if per_seq is None:
        raise ValueError("the cache is empty: pass the cache a generation filled")
    cfg = model.config
    # Every sequence passes the first layer (dense or routed): its K/V entries count the tokens processed.
    first = cache.layers[(0, 0)]
    tokens = first.valid.sum(dim=1).tolist()
    entry_bytes = first.k.shape[1] * first.k.shape[3] * (first.k.element_size() + first.v.element_size())
    routed = [i for i, _ in model.routed_layers()]
    usages = []
    for b, n in enumerate(tokens):
        fractions = {
            i: float(cache.routed_executed[i][b]) / max(1, int(cache.routed_tokens[i][b]))
            for i in routed
            if i in cache.routed_executed
        }
        executed = [fractions.get(i, 1.0) * n for i in routed]
        flops = measured_flops(cfg, n, executed, logits_positions=generated)
        kv = int(per_seq[b])
        dense_kv = cfg.n_layers * n * entry_bytes
        usages.append(
            RequestUsage(
                tokens=n,
                executed_fraction=fractions,
                mean_executed_fraction=statistics.fmean(fractions.values()) if fractions else 1.0,
                flops=flops["flops"],
                flops_ratio_vs_dense=flops["flops_ratio_vs_dense"],
                kv_bytes=kv,
                kv_bytes_ratio_vs_dense=kv / dense_kv,
            )
        )
    return usages


def distribution(values: list[float]) -> dict[str, float]:
    """min, median, mean, p90 and max of a list of numbers."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "p90": p90,
        "max": ordered[-1],
    }


def usage_distribution(usages: list[RequestUsage]) -> dict[str, dict[str, float]]:
    """The distribution over requests of each usage figure (the compute report `evaluate.py` writes)."""
    keys = ("tokens", "mean_executed_fraction", "flops", "flops_ratio_vs_dense", "kv_bytes", "kv_bytes_ratio_vs_dense")
    return {key: distribution([float(getattr(u, key)) for u in usages]) for key in keys}
