"""GPU-hours of the presets at real scale, projected from their FLOPs (`sdt.models.compute`) at a stated utilisation.

    python benchmarks/gpu_hours.py                                        # 40% of an H100's bf16 dense peak
    python benchmarks/gpu_hours.py --efficiency scaling.json              # routed MFU scaled by measured efficiency
    python benchmarks/gpu_hours.py --mfu 0.35 --peak-tflops 312           # e.g. an A100

For each preset (`conf/experiment/paper_transfer_*.yaml`, `pretrain_125m_*.yaml`) the model is composed as the preset
writes it (a hub checkpoint's backbone from its config.json, below, since this runs offline), its training FLOPs per
token taken from `sdt.models.compute.compute_report` (3x forward, STT's no-grad teacher pass 1x) and multiplied by the
run's tokens (batch x seq_len x accumulate_grad_batches x max_steps, validation left out). GPU-hours = FLOPs / (MFU x peak) / 3600.

Routed models move the same matmuls through gathers, scatters and smaller shapes, so they reach a lower MFU than
dense. `--efficiency <scaling.json>` (from benchmarks/scaling.py) sets each routed model's MFU to the dense MFU times
its measured efficiency against dense (FLOP ratio / train-time ratio, the median over the points measured at that
capacity); without it every model is projected at the dense MFU.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sdt.models import ModelConfig
from sdt.models.compute import compute_report
from sdt.models.pretrained import backbone_config
from sdt.training.train import VOCAB_MULTIPLE, round_up

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRESETS = ("paper_transfer_sdt", "paper_transfer_stt") + tuple(
    f"pretrain_125m_{a}" for a in ("dense", "mod", "sdt", "stt")
)
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 tensor cores without sparsity (NVIDIA's data sheet)
DEFAULT_MFU = 0.40
# config.json of the hub checkpoints the presets load (their model cards), read through the loader's own mapping.
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
}
TOKENIZER_VOCAB = {"openai-community/gpt2": 50257}


@functools.cache  # composing is the slow part; a preset's file does not change within a run
def preset(name: str) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    GlobalHydra.instance().clear()
    return cfg


def preset_model(cfg: Any) -> ModelConfig:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["init_from"]:
        model.update(backbone_config(HUB_CONFIGS[model["init_from"]], model["init_from"]))
    elif model["vocab_size"] is None:
        model["vocab_size"] = round_up(TOKENIZER_VOCAB[cfg.data.tokenizer.path], VOCAB_MULTIPLE)
    return ModelConfig.from_dict(model)


def efficiencies(path: Path) -> dict[tuple[str, float], float]:
    """(model, capacity) -> median measured FLOP efficiency against dense, from a benchmarks/scaling.py JSON."""
    records = json.loads(path.read_text())["records"]
    out: dict[tuple[str, float], list[float]] = {}
    for r in records:
        if r["model"] != "dense" and r["flop_efficiency_vs_dense"] is not None:
            out.setdefault((r["model"], r["capacity"]), []).append(r["flop_efficiency_vs_dense"])
    return {k: statistics.median(v) for k, v in out.items()}


def project(
    mfu: float, peak_tflops: float, efficiency: dict[tuple[str, float], float] | None = None
) -> list[dict[str, Any]]:
    rows = []
    for name in PRESETS:
        cfg = preset(name)
        model = preset_model(cfg)
        seq_len = cfg.data.seq_len
        tokens = cfg.data.batch_size * seq_len * cfg.trainer.accumulate_grad_batches * cfg.trainer.max_steps
        report = compute_report(model, seq_len)
        model_mfu = mfu
        eff = None
        if efficiency and model.arch != "dense":
            # The measured capacity nearest to the preset's.
            same_arch = {c: e for (a, c), e in efficiency.items() if a == model.arch}
            if same_arch:
                eff = same_arch[min(same_arch, key=lambda c: abs(c - model.capacity))]
                model_mfu = mfu * min(1.0, eff)
        flops = report["train_flops_per_token"] * tokens
        rows.append(
            {
                "preset": name,
                "arch": model.arch,
                "capacity": None if model.arch == "dense" else model.capacity,
                "seq_len": seq_len,
                "tokens": tokens,
                "train_flops_per_token": report["train_flops_per_token"],
                "train_flop_ratio_vs_dense": report["train_flops_ratio_vs_dense"],
                "train_flops": flops,
                "efficiency_vs_dense": eff,
                "mfu": model_mfu,
                "gpu_hours": flops / (model_mfu * peak_tflops * 1e12) / 3600,
            }
        )
    return rows


def format_markdown(rows: list[dict[str, Any]], peak_tflops: float) -> str:
    header = "| preset | arch | cap | tokens | train GFLOP/token | vs dense | total PFLOP | MFU | GPU-hours at "
    lines = [
        header + f"{peak_tflops:g} TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = "-" if r["capacity"] is None else f"{r['capacity']:g}"
        lines.append(
            f"| {r['preset']} | {r['arch']} | {cap} | {r['tokens'] / 1e9:.2f}B | {r['train_flops_per_token'] / 1e9:.3f} "
            f"| {r['train_flop_ratio_vs_dense']:.3f} | {r['train_flops'] / 1e15:,.0f} | {r['mfu']:.0%} "
            f"| {r['gpu_hours']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="dense model-FLOPs utilisation, in (0, 1]")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="the GPU's peak bf16 TFLOP/s")
    p.add_argument("--efficiency", type=Path, default=None, help="a benchmarks/scaling.py JSON: routed MFU from it")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < a.mfu <= 1:
        p.error(f"--mfu must be in (0, 1], got {a.mfu}")
    if a.peak_tflops <= 0:
        p.error(f"--peak-tflops must be positive, got {a.peak_tflops}")
    if a.efficiency is not None and not a.efficiency.is_file():
        p.error(f"--efficiency: no such file {a.efficiency}")
    rows = project(a.mfu, a.peak_tflops, efficiencies(a.efficiency) if a.efficiency else None)
    print(format_markdown(rows, a.peak_tflops))
    if a.out is not None:
        a.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
