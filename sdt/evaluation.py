"""`evaluate(cfg)`: perplexity, bits per byte, throughput and samples for a checkpoint, written to `eval.json`."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdt.checkpoint import load_checkpoint, model_state_dict
from sdt.data import DataConfig, LMDataModule, Tokenizer
from sdt.errors import UserError
from sdt.models import LanguageModel, ModelConfig, build_model

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(ckpt: dict[str, Any], device: torch.device) -> LanguageModel:
    cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(model_state_dict(ckpt), strict=False)
    # Tied embeddings are stored once; everything else must match exactly.
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not match the model: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


@torch.no_grad()
def split_nll(model: LanguageModel, loader, device: torch.device, max_batches: int | None) -> dict[str, float]:
    """Mean next-token NLL (nats) over a split, and the forward throughput while computing it."""
    nll, tokens, seconds = 0.0, 0, 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        n = int((targets != -100).sum())
        nll += float(out.loss) * n
        tokens += n
    if tokens == 0:
        raise UserError("the evaluation split produced no batches; lower data.seq_len or eval max_batches")
    return {"nll": nll / tokens, "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9)}


def generate_samples(
    model: LanguageModel, tokenizer: Tokenizer, cfg: DictConfig, device: torch.device, valid_vocab: int
) -> list[dict[str, str]]:
    samples = []
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    for prompt in cfg.samples.prompts:
        ids = tokenizer.encode(prompt)
        if not ids:
            ids = [tokenizer.eos_id]
        max_new = min(int(cfg.samples.max_new_tokens), model.config.max_seq_len - len(ids))
        out = model.generate(
            torch.tensor([ids], device=device),
            max_new,
            temperature=float(cfg.samples.temperature),
            top_k=cfg.samples.top_k,
            valid_vocab=valid_vocab,
            generator=generator,
        )
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, len(ids) :].tolist())})
    return samples


def data_config_for_eval(cfg: DictConfig, ckpt: dict[str, Any]) -> DataConfig:
    """The corpus to evaluate on: `data=...` from the command line, else the one the model was trained on."""
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        data = dict(ckpt["sdt"]["config"]["data"])
        # The training run's cache may live on another machine; use this run's cache location.
        data["cache_dir"] = OmegaConf.select(cfg, "paths.cache_dir") or data.get("cache_dir")
    if cfg.get("batch_size"):
        data["batch_size"] = int(cfg.batch_size)
    return DataConfig.from_dict(data)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    ckpt = load_checkpoint(cfg.ckpt_path)
    device = pick_device(cfg.get("device", "auto"))
    torch.manual_seed(int(cfg.seed))
    model = load_model(ckpt, device)
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    valid_vocab = int(ckpt["sdt"].get("tokenizer_vocab_size", tokenizer.vocab_size))

    data_cfg = data_config_for_eval(cfg, ckpt)
    if data_cfg.seq_len > model.config.max_seq_len:
        raise UserError(f"data.seq_len={data_cfg.seq_len} is longer than model.max_seq_len={model.config.max_seq_len}")
    datamodule = LMDataModule(data_cfg, tokenizer=tokenizer)
    datamodule.prepare_data()
    datamodule.setup("test")

    loaders = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}
    splits: dict[str, dict[str, float]] = {}
    for split in cfg.splits:
        if split not in loaders:
            raise UserError(f"unknown split {split!r} in splits; choose from {sorted(loaders)}")
        res = split_nll(model, loaders[split](), device, cfg.get("max_batches"))
        bytes_per_token = datamodule.split_stats[split]["bytes_per_token"]
        res["perplexity"] = math.exp(min(res["nll"], 700.0))
        res["bits_per_byte"] = res["nll"] / math.log(2) / bytes_per_token
        splits[split] = res
    headline = splits.get("test") or next(iter(splits.values()))

    result: dict[str, Any] = {
        "checkpoint": os.path.abspath(cfg.ckpt_path),
        "arch": model.config.arch,
        "global_step": ckpt.get("global_step"),
        "corpus": data_cfg.corpus,
        "seq_len": data_cfg.seq_len,
        "perplexity": headline["perplexity"],
        "bits_per_byte": headline["bits_per_byte"],
        "tokens_per_second": headline["tokens_per_second"],
        "num_parameters": model.num_parameters(),
        "num_parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "splits": splits,
        "device": str(device),
    }
    if cfg.samples.prompts:
        result["samples"] = generate_samples(model, tokenizer, cfg, device, valid_vocab)

    print(format_report(result))
    out_dir = cfg.paths.output_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    log.info("wrote %s", os.path.join(out_dir, "eval.json"))
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"checkpoint   {result['checkpoint']}",
        f"model        {result['arch']}, {result['num_parameters'] / 1e6:.2f}M parameters, step {result['global_step']}",
        f"corpus       {result['corpus']} (seq_len {result['seq_len']})",
        "",
        f"{'split':<8}{'tokens':>10}{'loss':>9}{'ppl':>10}{'bits/byte':>11}{'tok/s':>10}",
    ]
    for name, s in result["splits"].items():
        lines.append(
            f"{name:<8}{s['tokens']:>10}{s['nll']:>9.4f}{s['perplexity']:>10.2f}{s['bits_per_byte']:>11.4f}"
            f"{s['tokens_per_second']:>10.0f}"
        )
    for sample in result.get("samples", []):
        lines += ["", f"--- prompt: {sample['prompt']!r}", sample["prompt"] + sample["completion"]]
    return "\n".join(lines)
