"""Perplexity of a pretrained checkpoint computed by `transformers` itself and by our dense load of it, on exactly
the token blocks `evaluate.py` reads (same corpus, tokenizer, seq_len, batch size and batch cap).

    python benchmarks/pretrained_perplexity.py --init-from <HF dir | .gguf | hub id> --corpus shakespeare \
        --split val --seq-len 256 --batch-size 4 --max-batches 8 --out hf_ppl.json

Prints one JSON object: both perplexities, the number of tokens, and the largest absolute logit difference.

With `--arch sdt|stt|mod [--capacity C] [--model-option KEY=VALUE ...]` the "sdt" side is instead the checkpoint transferred into that
architecture at step 0 (new modules at their initialisation), evaluated in Top-K routing, the training mode: what
`model.init_from` starts training from. (Top-K is the non-causal oracle; causal modes need calibrated thresholds and,
for STT and MoD, a trained student.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from sdt.data import DataConfig, LMDataModule, Tokenizer
from sdt.models import ModelConfig, build_model
from sdt.models.pretrained import Pretrained


def load_hf_model(pretrained: Pretrained) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    directory, gguf_file = pretrained.tokenizer_source()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def compare(
    init_from: str,
    corpus: str,
    split: str,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    arch: str = "dense",
    capacity: float = 0.5,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    pretrained = Pretrained(init_from)
    model_dict = pretrained.own_model_dict() if arch == "dense" else pretrained.model_dict({"arch": arch})
    if arch != "dense":
        model_dict.update(capacity=capacity, **(options or {}))
    ours = build_model(ModelConfig.from_dict(model_dict))
    pretrained.load_into(ours)
    ours.eval()
    hf = load_hf_model(pretrained)
    tokenizer = Tokenizer.from_pretrained(*pretrained.tokenizer_source())
    data_cfg = DataConfig(
        corpus=corpus, seq_len=seq_len, batch_size=batch_size, cache_dir=os.environ.get("SDT_CACHE_DIR", ".cache/sdt")
    )
    datamodule = LMDataModule(data_cfg, tokenizer=tokenizer)
    datamodule.setup()
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()

    nll = {"transformers": 0.0, "sdt": 0.0}
    seconds = {"transformers": 0.0, "sdt": 0.0}
    tokens, batches, max_diff = 0, 0, 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids, targets = batch["input_ids"], batch["targets"]
        t0 = time.perf_counter()
        hf_logits = hf(input_ids=ids).logits.float()  # (B, T, V)
        t1 = time.perf_counter()
        our_logits = ours(ids, routing="topk").logits.float()
        t2 = time.perf_counter()
        seconds["transformers"] += t1 - t0
        seconds["sdt"] += t2 - t1
        n = int(targets.numel())
        for name, logits in (("transformers", hf_logits), ("sdt", our_logits)):
            nll[name] += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))) * n
        tokens += n
        batches += 1
        max_diff = max(max_diff, float((hf_logits - our_logits).abs().max()))
    return {
        "init_from": init_from,
        "arch": arch,
        "capacity": capacity if arch != "dense" else 1.0,
        "routing": "topk" if arch != "dense" else "dense",
        "model_options": options or {},
        "corpus": corpus,
        "split": split,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "batches": batches,
        "tokens": tokens,
        "perplexity_transformers": math.exp(nll["transformers"] / tokens),
        "perplexity_sdt": math.exp(nll["sdt"] / tokens),
        "max_abs_logit_diff": max_diff,
        "seconds_transformers": seconds["transformers"],
        "seconds_sdt": seconds["sdt"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", required=True, help="HF model directory, .gguf file or hub id")
    parser.add_argument("--corpus", default="shakespeare", help="shakespeare (the default corpus)")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-batches", type=int, default=None, help="cap, as evaluate.py max_batches")
    parser.add_argument("--arch", default="dense", choices=["dense", "sdt", "stt", "mod"], help="transfer into")
    parser.add_argument("--capacity", type=float, default=0.5, help="routed architectures' capacity")
    parser.add_argument(
        "--model-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. routed_attention=full"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.model_option)}
    result = compare(
        args.init_from,
        args.corpus,
        args.split,
        args.seq_len,
        args.batch_size,
        args.max_batches,
        args.arch,
        args.capacity,
        options,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
