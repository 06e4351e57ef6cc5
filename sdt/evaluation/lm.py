"""`evaluate_lm(cfg)`: perplexity, bits per byte, throughput and samples for a checkpoint, written to `eval.json`."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Literal, get_args

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sdt.common.errors import UserError
from sdt.data import DataConfig, LMDataModule, ShardedTokens
from sdt.evaluation.capacity_sweep import capacity_sweep, mean_executed_fraction
from sdt.evaluation.generation import generate_samples, generation_stats
from sdt.evaluation.loading import data_config_for_eval, load_model_and_tokenizer, pick_device, training_metrics_csv
from sdt.evaluation.plots import routing_plots, sweep_plot
from sdt.evaluation.report import ROUTING_LABELS, format_report, routing_table
from sdt.evaluation.usage import RequestUsage, usage_distribution
from sdt.evaluation.whole_file import read_documents, window_batches
from sdt.models import LanguageModel
from sdt.models.calibration import calibrate_thresholds
from sdt.models.compute import compute_report
from sdt.routing.selection import ROUTING_MODES

log = logging.getLogger(__name__)


@torch.no_grad()
def run_split(
    model: LanguageModel, loader, device: torch.device, max_batches: int | None, routing: str = "topk"
) -> dict[str, Any]:
    """Mean next-token NLL (nats) over a split under one routing mode, the forward throughput, and the mean of
    every routing statistic (token-weighted over batches)."""
    nll, tokens, seconds = 0.0, 0, 0.0
    stat_sums: dict[str, float] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, targets, routing=routing)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        n = int((targets != -100).sum())
        nll += float(out.loss) * n
        tokens += n
        for name, value in out.stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + float(value) * n
    if tokens == 0:
        raise UserError("the evaluation split produced no batches; lower data.seq_len or eval max_batches")
    return {
        "nll": nll / tokens,
        "tokens": tokens,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "stats": {name: value / tokens for name, value in stat_sums.items()},
    }


def executed_fraction_by_routing(
    model: LanguageModel, by_mode: dict[str, dict[str, dict[str, Any]]], split: str
) -> dict[str, float]:
    """Routing mode -> executed fraction on `split`, the mean over routed layers (1.0 for a dense model)."""
    if not model.is_routed:
        return dict.fromkeys(by_mode, 1.0)
    return {mode: mean_executed_fraction(model, res[split]["stats"]) for mode, res in by_mode.items() if split in res}


def run_capacity_sweep(
    model: LanguageModel,
    cfg: DictConfig,
    capacities: list[float],
    loader_fn,
    device: torch.device,
    mode: str,
    seq_len: int,
) -> list[dict[str, Any]]:
    """`inference_capacity=[...]`: the split in the headline causal mode at each capacity
    (sdt.evaluation.capacity_sweep)."""
    if not model.is_routed:
        raise UserError("inference_capacity needs a routed model (sdt, stt or mod): a dense model has no capacity")
    return capacity_sweep(
        model, capacities, lambda m: run_split(model, loader_fn(), device, cfg.get("max_batches"), m), mode, seq_len
    )


def unigram_perplexity(datamodule: LMDataModule, split: str, vocab_size: int) -> float:
    """Perplexity on `split` of a unigram model fit on the train split (add-one smoothed): the floor to beat."""
    train = datamodule.token_stream("train")
    counts = np.ones(vocab_size, dtype=np.float64)
    for part in train.chunks() if isinstance(train, ShardedTokens) else [train]:  # shards: one at a time
        counts += np.bincount(np.asarray(part), minlength=vocab_size)
    log_p = np.log(counts / counts.sum())
    tokens = np.asarray(datamodule.token_stream(split))[1:]  # the targets
    return float(np.exp(-log_p[tokens].mean()))


Split = Literal["val", "test", "all"]  # all: every token of data=text_files' files (sdt/evaluation/whole_file.py)
SPLIT_NAMES: tuple[Split, ...] = get_args(Split)


def check_stride(stride: Any, seq_len: int, splits: list[str]) -> int:
    """The window stride of splits=[all]: default seq_len (disjoint windows), else an integer in [1, seq_len]."""
    if stride is None:
        return seq_len
    if "all" not in splits:
        raise UserError("stride applies to whole-file perplexity: pass splits=[all] with data=text_files")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise UserError(f"stride must be an integer in [1, data.seq_len={seq_len}], got {stride!r}")
    return stride


def score_files(
    model: LanguageModel,
    files: list[dict[str, Any]],
    eos_id: int,
    data_cfg: DataConfig,
    stride: int,
    device: torch.device,
    routing: str,
) -> dict[str, Any]:
    """Whole-file perplexity: each file's documents in sliding windows, with per-file figures under `files`."""
    per_file, nll, tokens, seconds, n_bytes = [], 0.0, 0, 0.0, 0
    stat_sums: dict[str, float] = {}
    for f in files:
        batches = window_batches(
            f["documents"], eos_id, data_cfg.seq_len, stride, data_cfg.eval_batch_size or data_cfg.batch_size
        )
        res = run_split(model, batches, device, None, routing)
        per_file.append(
            {
                "file": f["file"],
                "tokens": res["tokens"],
                "perplexity": math.exp(min(res["nll"], 700.0)),
                "bits_per_byte": res["nll"] * res["tokens"] / math.log(2) / f["bytes"],
            }
        )
        nll += res["nll"] * res["tokens"]
        tokens += res["tokens"]
        seconds += res["tokens"] / res["tokens_per_second"]
        n_bytes += f["bytes"]
        for name, value in res["stats"].items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value * res["tokens"]
    return {
        "nll": nll / tokens,
        "tokens": tokens,
        "bytes": n_bytes,
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "stride": stride,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "files": per_file,
        "stats": {name: value / tokens for name, value in stat_sums.items()},
    }


def files_first_window(files: list[dict[str, Any]], eos_id: int, seq_len: int) -> Tensor:
    """(1, <= seq_len) the start of the first document: the passage for plots and the generation prompt."""
    return torch.tensor([[eos_id, *files[0]["documents"][0]][:seq_len]], dtype=torch.long)


def evaluate_lm(cfg: DictConfig) -> dict[str, Any]:
    """task=lm: every split and routing mode of `cfg.splits`, the routing table, plots, generation and samples."""
    device = pick_device(cfg.get("device", "auto"))
    torch.manual_seed(int(cfg.seed))
    init_from = OmegaConf.select(cfg, "model.init_from")
    model, tokenizer, valid_vocab, ckpt = load_model_and_tokenizer(cfg, device)

    data_cfg = data_config_for_eval(cfg, ckpt)
    if data_cfg.seq_len > model.config.max_seq_len:
        raise UserError(f"data.seq_len={data_cfg.seq_len} is longer than model.max_seq_len={model.config.max_seq_len}")
    splits_wanted = list(cfg.splits)
    for split in splits_wanted:
        if split not in SPLIT_NAMES:
            raise UserError(f"unknown split {split!r} in splits; choose from {list(SPLIT_NAMES)}")
    stride = check_stride(cfg.get("stride"), data_cfg.seq_len, splits_wanted)
    datamodule = None
    if any(split != "all" for split in splits_wanted) or (model.is_routed and cfg.get("recalibrate")):
        datamodule = LMDataModule(data_cfg, tokenizer=tokenizer)
        datamodule.prepare_data()
        datamodule.setup("test")
    files = read_documents(data_cfg, tokenizer) if "all" in splits_wanted else None

    if model.is_routed and cfg.get("recalibrate"):
        calibration = datamodule.calibration_dataloader()
        if calibration is None:
            raise UserError("recalibrate=true needs calibration blocks; the corpus is too small")
        calibrate_thresholds(model, (b["input_ids"] for b in calibration))

    unigram = {
        split: unigram_perplexity(datamodule, split, model.config.vocab_size)
        for split in splits_wanted
        if split != "all"
    }
    # Routed models: every mode, labelled; the headline perplexity is the causal inference mode's.
    modes = list(ROUTING_MODES) if model.is_routed else ["dense"]
    headline_mode = model.config.inference_routing if model.is_routed else "dense"
    by_mode: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in modes:
        routing = "topk" if mode == "dense" else mode
        by_mode[mode] = {}
        for split in splits_wanted:
            if split == "all":
                res = score_files(model, files, tokenizer.eos_id, data_cfg, stride, device, routing)
            else:
                loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
                res = run_split(model, loader, device, cfg.get("max_batches"), routing)
                res["bits_per_byte"] = res["nll"] / math.log(2) / datamodule.split_stats[split]["bytes_per_token"]
                res["unigram_perplexity"] = unigram[split]
            res["perplexity"] = math.exp(min(res["nll"], 700.0))  # capped: a diverged model must not overflow
            by_mode[mode][split] = res
    splits = {split: {k: v for k, v in res.items() if k != "stats"} for split, res in by_mode[headline_mode].items()}
    headline = splits.get("all") or splits.get("test") or next(iter(splits.values()))
    first_window = files_first_window(files, tokenizer.eos_id, data_cfg.seq_len) if files else None

    result: dict[str, Any] = {
        "checkpoint": os.path.abspath(cfg.ckpt_path) if ckpt is not None else init_from,
        "arch": model.config.arch,
        "global_step": ckpt.get("global_step") if ckpt is not None else 0,
        "corpus": data_cfg.corpus,
        "seq_len": data_cfg.seq_len,
        "routing_mode": headline_mode,
        "perplexity": headline["perplexity"],
        "bits_per_byte": headline["bits_per_byte"],
        "tokens_per_second": headline["tokens_per_second"],
        "num_parameters": model.num_parameters(),
        "num_parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "splits": splits,
        "perplexity_by_routing": {
            mode: {"label": ROUTING_LABELS[mode], **{s: r["perplexity"] for s, r in res.items()}}
            for mode, res in by_mode.items()
        },
        "compute": compute_report(model.config, data_cfg.seq_len),
        "device": str(device),
    }
    out_dir = cfg.paths.output_dir
    os.makedirs(out_dir, exist_ok=True)
    stats_split = next(s for s in ("all", "test", "val") if s in by_mode[headline_mode])
    result["executed_fraction_by_routing"] = executed_fraction_by_routing(model, by_mode, stats_split)
    if cfg.get("inference_capacity"):
        sweep_split = next((s for s in ("test", "val") if s in splits_wanted), None)
        if sweep_split is None:
            raise UserError("inference_capacity sweeps a val or test split: add it to splits")
        loader_fn = datamodule.test_dataloader if sweep_split == "test" else datamodule.val_dataloader
        result["capacity_sweep"] = run_capacity_sweep(
            model, cfg, list(cfg.inference_capacity), loader_fn, device, headline_mode, data_cfg.seq_len
        )
        if cfg.get("plots", True):
            result.setdefault("plots", {})["capacity_sweep"] = sweep_plot(
                result["capacity_sweep"], out_dir, model.config.arch
            )
    if model.is_routed:
        table = routing_table(model, by_mode[headline_mode][stats_split]["stats"])
        oracle = routing_table(model, by_mode["topk"][stats_split]["stats"])
        for entry, top in zip(table, oracle, strict=True):
            entry["executed_fraction_topk"] = top["executed_fraction"]
            # A causal mode without a teacher pass (STT's student) computes no surprise signals and cannot score
            # itself against Top-K: take those from the oracle pass.
            for key, value in top.items():
                entry.setdefault(key, value)
        result["routing"] = table
        result["student"] = {
            key: sum(e.get(f"student_{key}", 0.0) for e in table) / len(table)
            for key in ("accuracy", "precision", "recall")
        }
        if cfg.get("plots", True):
            plots = routing_plots(
                model,
                tokenizer,
                first_window if first_window is not None else next(iter(datamodule.test_dataloader()))["input_ids"],
                headline_mode,
                table,
                training_metrics_csv(cfg.ckpt_path, ckpt) if ckpt is not None else None,
                out_dir,
                device,
            )
            result.setdefault("plots", {}).update(plots)
    if cfg.generation.max_new_tokens > 0:
        prompt_tokens = first_window[0].tolist() if first_window is not None else datamodule.token_stream("test")
        result["generation"] = generation_stats(
            model, prompt_tokens, device, int(cfg.generation.max_new_tokens), repeats=int(cfg.generation.repeats)
        )
    if cfg.samples.prompts and cfg.samples.max_new_tokens > 0:
        usages: list[RequestUsage] = []
        result["samples"] = generate_samples(model, tokenizer, cfg, device, valid_vocab, usages)
        result["request_compute"] = {
            "requests": [u.to_dict() for u in usages],
            "distribution": usage_distribution(usages),
        }

    print(format_report(result))
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    log.info("wrote %s", os.path.join(out_dir, "eval.json"))
    return result
