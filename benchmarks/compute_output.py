"""Output of the compute benchmark: the ratio table, the target checks and the markdown report."""

from __future__ import annotations

import statistics
from typing import Any

from compute_common import ratio


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
    ("dec FLOP", lambda r: _fmt(r["decode_flop_ratio"])),
    ("decode", lambda r: _fmt(r["decode_ratio"])),
    ("KV calc", lambda r: _fmt(r["analytic_kv_ratio"])),
    ("KV exec", lambda r: _fmt(r["executed_kv_ratio"])),
    ("KV bytes", lambda r: _fmt(r["kv_bytes_ratio"])),
    ("peak mem", lambda r: _fmt(r["peak_memory_ratio"])),
    ("train ms", lambda r: _fmt(None if r["train_step_s"] is None else r["train_step_s"] * 1e3, ".1f")),
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
        "ratios: model / dense (time or bytes; < 1 is cheaper); FLOP and KV calc columns: analytic (sdt.models.compute)"
    )
    layer = result.get("layer_bench")
    if layer:
        lines.append(_layer_line(layer))
    if result.get("transformers"):
        lines.append(_transformers_line(result["transformers"]))
    return "\n".join(lines)


# Targets, as ratios measured in one run: (a) a routed layer at capacity 0.25 costs at most 1.2x its FLOP ratio;
# (b) whole-model train-step and forward time ratios at most 1.25x their FLOP ratios; (c) KV bytes equal the analytic
# ratio within 2%; (d) our dense forward no slower than transformers' Qwen2; decoding: (e) every routed model decodes
# no slower than dense at the small size, (f) its decode time ratio is at most 1.25x its decode FLOP ratio at the
# large size, (g) our dense decoding at least as fast as transformers' generate() (tokens/s ratio >= 1).
LAYER_TARGET, MODEL_TARGET, KV_TARGET, HF_TARGET = 1.2, 1.25, 0.02, 1.0
DECODE_SMALL_TARGET, DECODE_FLOP_TARGET, HF_DECODE_TARGET = 1.0, 1.25, 1.0


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
    size = result["meta"]["size"]
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
        if size == "small":
            check("e", f"{name}: decode time ratio (small size)", r["decode_ratio"], DECODE_SMALL_TARGET)
        if size == "large":
            check("f", f"{name}: decode time / decode FLOP ratio (large size)",
                  ratio(r["decode_ratio"], r["decode_flop_ratio"]), DECODE_FLOP_TARGET)  # fmt: skip
    hf = result.get("transformers")
    if hf:
        check("d", "dense forward time / transformers Qwen2 forward time", hf["forward_ratio"], HF_TARGET)
        # Higher is better here: the check holds when our tokens/s are at least transformers'.
        value = hf["decode_tokens_per_s_ratio"]
        check("g", "dense decode tokens/s / transformers generate() tokens/s (at least)", value, HF_DECODE_TARGET,
              ok=value >= HF_DECODE_TARGET)  # fmt: skip
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
        f"ms; max |logit diff| {hf['max_abs_logit_diff']:.1e}); greedy decoding of {hf['decode_tokens']} tokens "
        f"after a {hf['prompt_tokens']}-token prompt, our generate vs its generate(): "
        f"{hf['decode_tokens_per_s_ratio']:.3f} x its tokens/s ({hf['sdt_decode_tokens_per_s']:.1f} vs "
        f"{hf['transformers_decode_tokens_per_s']:.1f}; same tokens: {hf['same_tokens']})"
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
            "and KV calc columns are analytic (`sdt.models.compute`, at the nominal capacity); `exec fwd` / `exec dec` "
            "are the measured executed fractions of the routed layers (mean over layers) in the forward and in "
            "prefill + decode, in the causal mode of the `mode` column; `KV exec` is the analytic KV ratio at the "
            "executed fractions counted while decoding (what a cache holding exactly the executed tokens needs), "
            "beside the bytes the cache really held (`KV bytes`)."
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
