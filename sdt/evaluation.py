"""`evaluate(cfg)`: perplexity, bits per byte, throughput and samples for a checkpoint, written to `eval.json`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sdt.checkpoint import load_checkpoint, model_state_dict
from sdt.compute import compute_report
from sdt.data import DataConfig, LMDataModule, Tokenizer
from sdt.errors import UserError
from sdt.models import LanguageModel, ModelCache, ModelConfig, build_model
from sdt.models.pretrained import Pretrained
from sdt.resolvers import register_resolvers
from sdt.routing.calibration import calibrate_thresholds
from sdt.usage import RequestUsage, request_usage, usage_distribution
from sdt.whole_file import read_documents, window_batches

register_resolvers()  # configs may use ${package_file:...}; register before Hydra composes them

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(ckpt: dict[str, Any], device: torch.device) -> LanguageModel:
    cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(model_state_dict(ckpt), strict=False)
    # Tied embeddings are stored once; checkpoints from before the capacity dial lack the quantile grids (they stay
    # uncalibrated: `recalibrate=true` fills them); everything else must match exactly.
    missing = [
        k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight") and not k.endswith(".quantiles")
    ]
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not match the model: missing {missing}, unexpected {unexpected}")
    return _ready(model, device)


def load_pretrained_model(pretrained: Pretrained, device: torch.device) -> LanguageModel:
    """The model a pretrained checkpoint is (model.init_from, no training): dense, or an sdt export's own arch."""
    model = build_model(ModelConfig.from_dict(pretrained.own_model_dict()))
    pretrained.load_into(model)
    return _ready(model, device)


def _ready(model: LanguageModel, device: torch.device) -> LanguageModel:
    model = model.to(device).eval()
    if model.config.compile:
        model.compile()
    return model


ROUTING_LABELS = {
    "dense": "dense (every token, every layer)",
    "topk": "topk (non-causal oracle; not the model's perplexity)",
    "threshold": "threshold (causal: execute where the gate score >= a calibrated tau)",
    "student": "student (causal router)",
    "budget": "budget (causal: threshold held to the capacity per sequence)",
}


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
    from sdt.capacity_sweep import mean_executed_fraction

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
    """`inference_capacity=[...]`: the split in the headline causal mode at each capacity (sdt.capacity_sweep)."""
    from sdt.capacity_sweep import capacity_sweep

    if not model.is_routed:
        raise UserError("inference_capacity needs a routed model (sdt, stt or mod): a dense model has no capacity")
    return capacity_sweep(
        model, capacities, lambda m: run_split(model, loader_fn(), device, cfg.get("max_batches"), m), mode, seq_len
    )


def sweep_plot(sweep: list[dict[str, Any]], out_dir: str, arch: str) -> str:
    from sdt.capacity_sweep import sweep_plot as plot

    return plot(sweep, out_dir, arch)


def unigram_perplexity(datamodule: LMDataModule, split: str, vocab_size: int) -> float:
    """Perplexity on `split` of a unigram model fit on the train split (add-one smoothed): the floor to beat."""
    counts = np.bincount(np.asarray(datamodule.token_stream("train")), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    tokens = np.asarray(datamodule.token_stream(split))[1:]  # the targets
    return float(np.exp(-log_p[tokens].mean()))


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
    dense = build_model(dataclasses.replace(model.config, arch="dense")).to(device).eval()
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


def routing_table(model: LanguageModel, stats: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per routed layer: `layer` (index in the stack), `blocks` (backbone layers it spans) and its stats."""
    table = []
    block = 0
    for i, layer in enumerate(model.layers):
        n_blocks = getattr(layer, "n_blocks", 1)
        if hasattr(layer, "thresholds"):
            prefix = f"layers.{i}."
            entry = {"layer": i, "blocks": list(range(block, block + n_blocks)), "kind": type(layer).__name__}
            entry.update({k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)})
            table.append(entry)
        block += n_blocks
    return table


@torch.no_grad()
def routing_plots(
    model: LanguageModel,
    tokenizer: Tokenizer,
    passage: Tensor,
    routing: str,
    table: list[dict],
    training_csv: str | None,
    out_dir: str,
    device: torch.device,
    n_tokens: int = 96,
) -> dict[str, str]:
    """(a) token-by-layer decisions on a test passage, (b) executed fraction per layer, (c) S_CE/S_CU over training."""
    from sdt.analysis import plot_executed_fraction, plot_gate_contributions, plot_routing_heatmap

    plots: dict[str, str] = {}
    ids = passage[:1, :n_tokens].to(device)  # (1, n): the start of a test passage
    out = model(ids, routing=routing)
    labels = [f"layer {e['layer']}\n{e['kind']}" for e in table]
    decisions = np.stack([out.decisions[e["layer"]][0].float().cpu().numpy() for e in table])  # (layers, n)
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    plots["heatmap"] = plot_routing_heatmap(
        decisions,
        tokens,
        labels,
        os.path.join(out_dir, "routing_heatmap.png"),
        title=f"Executed tokens per routed layer ({routing} routing)",
    )
    plots["executed_fraction"] = plot_executed_fraction(
        [e["executed_fraction"] for e in table],
        labels,
        os.path.join(out_dir, "executed_fraction.png"),
        capacity=model.config.capacity,
        title=f"Executed fraction per routed layer ({routing} routing)",
    )
    if training_csv and os.path.isfile(training_csv):
        path = plot_gate_contributions(training_csv, os.path.join(out_dir, "gate_contributions.png"))
        if path:
            plots["gate_contributions"] = path
    return plots


def training_metrics_csv(ckpt_path: str, ckpt: dict[str, Any]) -> str | None:
    """The CSV log of the run that wrote the checkpoint, if it is still next to it."""
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "csv", "metrics.csv")]
    out_dir = (ckpt["sdt"].get("config") or {}).get("paths", {}).get("output_dir")
    if out_dir:
        candidates.append(os.path.join(out_dir, "csv", "metrics.csv"))
    return next((c for c in candidates if os.path.isfile(c)), None)


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


def data_dict_for_eval(cfg: DictConfig, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    """The `data` config to evaluate on: `data=...` from the command line, else the one the model was trained on."""
    if cfg.get("data") is not None:
        return OmegaConf.to_container(cfg.data, resolve=True)
    if ckpt is None:
        raise UserError("model.init_from evaluates a pretrained model on a corpus you name: pass data=<corpus>")
    data = dict(ckpt["sdt"]["config"]["data"])
    # The training run's cache may live on another machine; use this run's cache location.
    data["cache_dir"] = OmegaConf.select(cfg, "paths.cache_dir") or data.get("cache_dir")
    return data


def data_config_for_eval(cfg: DictConfig, ckpt: dict[str, Any] | None) -> DataConfig:
    """The corpus to evaluate on: `data=...` from the command line, else the one the model was trained on."""
    data = data_dict_for_eval(cfg, ckpt)
    if cfg.get("batch_size"):
        data["batch_size"] = int(cfg.batch_size)
    return DataConfig.from_dict(data)


def load_model_and_tokenizer(
    cfg: DictConfig, device: torch.device
) -> tuple[LanguageModel, Tokenizer, int, dict[str, Any] | None]:
    """The model to evaluate (`ckpt_path=` or `model.init_from=`), its tokenizer, the number of real vocabulary
    entries, and the training checkpoint (None for a pretrained one)."""
    init_from = OmegaConf.select(cfg, "model.init_from")
    if cfg.get("ckpt_path") and init_from:
        raise UserError("pass either ckpt_path=<.ckpt> or model.init_from=<pretrained checkpoint>, not both")
    if init_from:
        # A pretrained checkpoint as it is, no training: its weights and its own tokenizer.
        pretrained = Pretrained(init_from)
        model = load_pretrained_model(pretrained, device)
        tokenizer = Tokenizer.from_pretrained(*pretrained.tokenizer_source())
        return model, tokenizer, tokenizer.vocab_size, None
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required (pass ckpt_path=<.ckpt>, or model.init_from=<pretrained checkpoint>)")
    ckpt = load_checkpoint(cfg.ckpt_path)
    model = load_model(ckpt, device)
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    return model, tokenizer, int(ckpt["sdt"].get("tokenizer_vocab_size", tokenizer.vocab_size)), ckpt


SPLIT_NAMES = ("val", "test", "all")  # all: every token of data=text_files' files (sdt/whole_file.py)


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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.get("search"):
        from sdt.search.evaluate import evaluate_search

        return evaluate_search(cfg)
    task = cfg.get("task", "lm")
    if task == "reasoning":
        from sdt.reasoning.evaluate import evaluate_reasoning

        return evaluate_reasoning(cfg)
    if task != "lm":
        raise UserError(f"task must be lm or reasoning, got {task!r}")
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
    modes = ["topk", "threshold", "student", "budget"] if model.is_routed else ["dense"]
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
    if cfg.samples.prompts:
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
        from sdt.capacity_sweep import format_sweep

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
