"""The text report of a language-model evaluation, and the per-routed-layer table it prints."""

from __future__ import annotations

import math
from typing import Any

from sdt.evaluation.capacity_sweep import format_sweep
from sdt.models import LanguageModel, RoutedLayer

ROUTING_LABELS = {
    "dense": "dense (every token, every layer)",
    "topk": "topk (non-causal oracle; not the model's perplexity)",
    "threshold": "threshold (causal: execute where the gate score >= a calibrated tau)",
    "student": "student (causal router)",
    "budget": "budget (causal: threshold held to the capacity per sequence)",
}


def routing_table(model: LanguageModel, stats: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per routed layer: `layer` (index in the stack), `blocks` (backbone layers it spans) and its stats."""
    table = []
    block = 0
    for i, layer in enumerate(model.layers):
        n_blocks = layer.n_blocks
        if isinstance(layer, RoutedLayer):
            prefix = f"layers.{i}."
            entry = {"layer": i, "blocks": list(range(block, block + n_blocks)), "kind": type(layer).__name__}
            entry.update({k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)})
            table.append(entry)
        block += n_blocks
    return table


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"checkpoint   {result['checkpoint']}",
        f"model        {result['arch']}, {result['num_parameters'] / 1e6:.2f}M parameters, step {result['global_step']}",
        f"corpus       {result['corpus']} (seq_len {result['seq_len']})",
        f"routing      {ROUTING_LABELS[result['routing_mode']]}",
        "",
        f"{'split':<8}{'tokens':>10}{'loss':>9}{'ppl':>10}{'bits/byte':>11}{'tok/s':>10}{'unigram ppl':>13}",
    ]
    for name, s in result["splits"].items():
        lines.append(
            f"{name:<8}{s['tokens']:>10}{s['nll']:>9.4f}{s['perplexity']:>10.2f}{s['bits_per_byte']:>11.4f}"
            f"{s['tokens_per_second']:>10.0f}{s.get('unigram_perplexity', math.nan):>13.2f}"
        )
    if len(result["perplexity_by_routing"]) > 1:
        lines += ["", "perplexity by routing mode:"]
        for r in result["perplexity_by_routing"].values():
            values = "  ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "label")
            lines.append(f"  {r['label']:<55} {values}")
    c = result["compute"]
    lines += [
        "",
        (
            f"compute      {c['flops_per_token'] / 1e6:.2f} MFLOPs/token, {c['flops_ratio_vs_dense']:.3f} x dense FLOPs, "
            f"{c['kv_entries_ratio_vs_dense']:.3f} x dense KV entries"
        ),
    ]
    if "routing" in result:
        lines += [
            "",
            f"{'routed layer':<26}{'executed':>9}{'topk':>7}{'S_CE':>7}{'S_CU':>7}{'g':>7}{'student acc':>13}",
        ]
        for e in result["routing"]:
            lines.append(
                f"{e['layer']:>3} {e['kind']:<22}{e['executed_fraction']:>9.3f}{e['executed_fraction_topk']:>7.3f}"
                f"{e.get('s_ce', float('nan')):>7.3f}{e.get('s_cu', float('nan')):>7.3f}{e.get('g', float('nan')):>7.3f}"
                f"{e.get('student_accuracy', float('nan')):>13.3f}"
            )
        for name, path in result.get("plots", {}).items():
            lines.append(f"plot {name}: {path}")
    if "generation" in result:
        g = result["generation"]
        lines += [
            "",
            (
                f"generation   {g['max_new_tokens']} tokens: KV cache {g['kv_bytes'] / 2**20:.2f} MiB "
                f"({g['kv_bytes_ratio_vs_dense']:.3f} x dense), {g['tokens_per_second']:.0f} tok/s "
                f"({g['tokens_per_second_ratio_vs_dense']:.2f} x dense)"
            ),
        ]
    if "capacity_sweep" in result:
        lines += [
            "",
            f"capacity sweep ({result['routing_mode']} routing, test split):",
            *format_sweep(result["capacity_sweep"])[1:],
        ]
    if "executed_fraction_by_routing" in result and len(result["executed_fraction_by_routing"]) > 1:
        lines += [
            "",
            "executed fraction by routing mode: "
            + ", ".join(f"{k} {v:.3f}" for k, v in result["executed_fraction_by_routing"].items()),
        ]
    if "request_compute" in result:
        d = result["request_compute"]["distribution"]
        lines += [
            "",
            (
                f"per request ({len(result['request_compute']['requests'])} prompts): executed "
                f"{d['mean_executed_fraction']['min']:.3f}-{d['mean_executed_fraction']['max']:.3f}, FLOPs "
                f"{d['flops_ratio_vs_dense']['min']:.3f}-{d['flops_ratio_vs_dense']['max']:.3f} x dense, KV "
                f"{d['kv_bytes_ratio_vs_dense']['min']:.3f}-{d['kv_bytes_ratio_vs_dense']['max']:.3f} x dense"
            ),
        ]
    for sample in result.get("samples", []):
        lines += ["", f"--- prompt: {sample['prompt']!r}", sample["prompt"] + sample["completion"]]
    return "\n".join(lines)
