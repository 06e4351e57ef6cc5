"""Comparison phases of the compute benchmark: one routed block against one dense block, and our dense model
against `transformers`' Qwen2 with the same weights (built through the export mapping of `sdt.models.pretrained`)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch
from compute_common import (
    LAYER_BENCH_CAPACITY,
    LAYER_BENCH_MIN_SEQ_LEN,
    SIZES,
    Settings,
    Timer,
    interleaved,
    model_config,
)

from sdt.blocks.layers import Block, RotaryEmbedding
from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.compute import block_flops
from sdt.models.pretrained import SDT_CONFIG_KEY, export_state_dict, hf_config
from sdt.routing import capacity_k, run_routed_block, topk_indices


def bench_layer(s: Settings, device: torch.device, amp: Callable) -> dict[str, Any]:
    """One routed block (Top-K selection + gather + block on k tokens + scatter) vs one block on all T tokens."""
    timer = Timer(device, s.clock)
    size = SIZES[s.size]
    B, T = size.batch, max(LAYER_BENCH_MIN_SEQ_LEN, size.seq_len)
    cfg = model_config(size, "dense", LAYER_BENCH_CAPACITY, T)
    k = capacity_k(T, LAYER_BENCH_CAPACITY)
    torch.manual_seed(s.seed)
    block = Block(cfg).to(device)
    rope = RotaryEmbedding(cfg.head_dim, T, cfg.rope_theta).to(device)
    x = torch.randn(B, T, cfg.d_model, device=device, requires_grad=True)
    positions = torch.arange(T, device=device).expand(B, T)
    scores, gate = torch.rand(B, T, device=device), torch.rand(B, T, device=device, requires_grad=True)

    def dense() -> torch.Tensor:
        with amp():
            return block(x, positions, rope)

    def routed() -> torch.Tensor:
        with amp():
            return run_routed_block(block, x, positions, rope, topk_indices(scores, k), gate, cfg.gate_mode)

    def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def train(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn().float().sum().backward()
            block.zero_grad(set_to_none=True)
            x.grad, gate.grad = None, None

        return run

    fwd = interleaved({"dense": no_grad(dense), "routed": no_grad(routed)}, s.warmup, s.repeats, timer)
    trn = interleaved({"dense": train(dense), "routed": train(routed)}, s.warmup, s.repeats, timer)
    med = {phase: {n: statistics.median(v) for n, v in d.items()} for phase, d in (("forward", fwd), ("train", trn))}
    flops_routed, flops_dense = sum(block_flops(cfg, T, k).values()), sum(block_flops(cfg, T).values())
    return {
        "seq_len": T,
        "batch": B,
        "capacity": LAYER_BENCH_CAPACITY,
        "k": k,
        "flop_ratio": flops_routed / flops_dense,  # forward and backward alike (backward ~ 2x forward for both)
        "dense_forward_s": med["forward"]["dense"],
        "routed_forward_s": med["forward"]["routed"],
        "forward_ratio": med["forward"]["routed"] / med["forward"]["dense"],
        "dense_train_s": med["train"]["dense"],
        "routed_train_s": med["train"]["routed"],
        "train_ratio": med["train"]["routed"] / med["train"]["dense"],
    }


def qwen2_twin(cfg: ModelConfig, device: torch.device) -> tuple[LanguageModel, torch.nn.Module]:
    """Our dense model and `transformers`' Qwen2 of the same config, with the same weights, both built through the
    export mapping (`sdt.models.pretrained.hf_config` / `export_state_dict`, what `sdt.export` writes)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # only this phase needs transformers

    cfg = dataclasses.replace(cfg, arch="dense", qkv_bias=True)  # Qwen2 always has q/k/v biases
    ours = build_model(cfg).to(device).eval()
    exported = {k: v for k, v in hf_config(cfg).items() if k not in ("model_type", "architectures", SDT_CONFIG_KEY)}
    hf_cfg = AutoConfig.for_model("qwen2", **exported)
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").to(device).eval()
    missing, unexpected = hf.load_state_dict(export_state_dict(ours), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"the export mapping does not fill Qwen2: missing {missing}, unexpected {unexpected}")
    return ours, hf


def bench_transformers(s: Settings, device: torch.device, amp: Callable) -> dict[str, Any]:
    """Our dense model vs `transformers`' Qwen2 of the same config and weights: the forward of the same batch, and
    greedy decoding (our `generate` vs its `generate()`) from the same prompt."""
    timer = Timer(device, s.clock)
    size = SIZES[s.size]
    ours, hf = qwen2_twin(
        model_config(size, "dense", 1.0, max(size.seq_len, s.prompt_tokens + s.decode_tokens)), device
    )
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, size.vocab_size, (size.batch, size.seq_len), generator=g).to(device)
    with torch.no_grad(), amp():
        # Same weights must give the same logits, or the timing compares different computations.
        diff = (ours(ids).logits.float() - hf(input_ids=ids, use_cache=False).logits.float()).abs().max().item()

    def forward(model: torch.nn.Module, **kw: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), amp():
                model(ids, **kw)

        return run

    # Two models and one cheap phase: three times the repeats, since the two differ by a few percent at most.
    fns = {"sdt": forward(ours), "transformers": forward(hf, use_cache=False)}
    fwd = interleaved(fns, s.warmup, 3 * s.repeats, timer)
    med = {n: statistics.median(v) for n, v in fwd.items()}

    # Decoding: greedy generation at batch 1, the whole call (prefill included) for both, the same number of tokens.
    P, N = s.prompt_tokens, s.decode_tokens
    prompt = torch.randint(0, size.vocab_size, (1, P), generator=g).to(device)
    hf_kw = {"max_new_tokens": N, "min_new_tokens": N, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    outputs: dict[str, torch.Tensor] = {}

    def decode(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), amp():
                if name == "sdt":
                    outputs[name] = ours.generate(prompt, N, temperature=0.0)
                else:
                    outputs[name] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **hf_kw)

        return run

    dec = interleaved({n: decode(n) for n in ("sdt", "transformers")}, min(s.warmup, 1), s.repeats, timer)
    dec_med = {n: statistics.median(v) for n, v in dec.items()}
    tps = {n: N / dec_med[n] for n in dec_med}
    return {
        "model": "Qwen2ForCausalLM (sdpa attention)",
        "transformers": __import__("transformers").__version__,
        "max_abs_logit_diff": diff,
        "sdt_forward_s": med["sdt"],
        "transformers_forward_s": med["transformers"],
        "forward_ratio": med["sdt"] / med["transformers"],
        "samples_s": fwd,
        "prompt_tokens": P,
        "decode_tokens": N,
        "sdt_decode_tokens_per_s": tps["sdt"],
        "transformers_decode_tokens_per_s": tps["transformers"],
        "decode_tokens_per_s_ratio": tps["sdt"] / tps["transformers"],  # > 1: ours decodes faster
        "same_tokens": bool(torch.equal(outputs["sdt"], outputs["transformers"])),
        "decode_samples_s": dec,
    }
