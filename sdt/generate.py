"""Generate from a checkpoint and charge the request for the compute it used.

    python -m sdt.generate ckpt_path=<ckpt> prompt="ROMEO:" [capacity=0.3] [max_new_tokens=200]
    python -m sdt.generate model.init_from=<pretrained checkpoint> prompt="..."

Streams the continuation to stdout, then prints one line with the request's executed fraction (mean over routed
layers), FLOPs and KV-cache bytes, each against a dense model of the same dimensions. Options are `key=value`
(see `DEFAULTS`). Bad input (no checkpoint, a prompt too long for the model, a capacity outside (0, 1], an unknown
option) gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdt.cli import run_task
from sdt.common.errors import UserError
from sdt.evaluation.generation import SAMPLING_DEFAULTS
from sdt.evaluation.loading import check_device, load_model_and_tokenizer, pick_device
from sdt.evaluation.usage import RequestUsage, request_usage
from sdt.models import ModelCache
from sdt.routing.selection import CAUSAL_MODES

DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,  # an sdt training checkpoint (.ckpt); or, instead, model.init_from
    "model": {"init_from": None},  # a pretrained checkpoint: HF directory, .gguf file or hub id
    "prompt": None,
    "capacity": None,  # routed models: run at this capacity in (0, 1] (null: the calibrated one)
    "routing": None,  # threshold | student | budget (null: the model's inference_routing)
    "max_new_tokens": 200,
    **SAMPLING_DEFAULTS,
    "seed": 1337,
    "device": "auto",
}


NUMBERS = {"capacity": float, "temperature": float, "max_new_tokens": int, "top_k": int, "seed": int}
STRINGS = ("ckpt_path", "model.init_from", "prompt", "routing", "device")


def parse_args(argv: Sequence[str]) -> DictConfig:
    """`key=value` arguments over `DEFAULTS`. Values are taken literally (a prompt such as `ROMEO:` is text, not
    YAML), numbers are converted for the numeric options, `null` unsets an option; unknown keys and malformed
    arguments are user errors."""
    cfg = OmegaConf.create(DEFAULTS)
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise UserError(f'arguments are key=value, got {arg!r} (e.g. prompt="ROMEO:" capacity=0.3)')
        key = key.removeprefix("+")
        if key not in NUMBERS and key not in STRINGS:
            raise UserError(f"unknown option(s) [{key!r}]; valid options: {sorted([*NUMBERS, *STRINGS])}")
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            raw = raw[1:-1]  # quotes that reached us (e.g. 'prompt="ROMEO:"')
        value: Any = raw
        if key != "prompt" and raw in ("null", "None", "~"):
            value = None
        elif key in NUMBERS:
            try:
                value = NUMBERS[key](raw)
            except ValueError:
                kind = "an integer" if NUMBERS[key] is int else "a number"
                raise UserError(f"{key} must be {kind}, got {raw!r}") from None
        OmegaConf.update(cfg, key, value)
    return cfg


def check_request(cfg: DictConfig) -> None:
    """Validate what does not need the model (so a bad capacity fails before a checkpoint loads)."""
    capacity = cfg.capacity
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 1
    ):
        raise UserError(f"capacity must be a number in (0, 1], got {capacity!r}")
    if cfg.prompt is None or str(cfg.prompt) == "":
        raise UserError('prompt is required (pass prompt="...")')
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if cfg.routing is not None and cfg.routing not in CAUSAL_MODES:
        raise UserError(f"routing must be one of {', '.join(CAUSAL_MODES)} (decoding is causal), got {cfg.routing!r}")
    check_device(cfg.device)


def format_usage(usage: RequestUsage) -> str:
    return (
        f"[compute] {usage.tokens} tokens, executed {usage.mean_executed_fraction:.3f} of them (mean over routed "
        f"layers), {usage.flops / 1e9:.4f} GFLOPs ({usage.flops_ratio_vs_dense:.3f} x dense), KV cache "
        f"{usage.kv_bytes / 2**10:.1f} KiB ({usage.kv_bytes_ratio_vs_dense:.3f} x dense)"
    )


def generate_request(cfg: DictConfig) -> RequestUsage:
    check_request(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(int(cfg.seed))
    model, tokenizer, valid_vocab, _ = load_model_and_tokenizer(cfg, device)
    ids = tokenizer.encode(str(cfg.prompt)) or [tokenizer.eos_id]
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise UserError(
            f"the prompt is {len(ids)} tokens, too long for model.max_seq_len={model.config.max_seq_len}: shorten it"
        )
    max_new = min(int(cfg.max_new_tokens), room)
    if max_new < cfg.max_new_tokens:
        print(f"note: max_new_tokens capped at {max_new} to fit model.max_seq_len", file=sys.stderr)

    generated: list[int] = []
    shown = 0

    def stream(token_B: torch.Tensor) -> None:
        nonlocal shown
        generated.append(int(token_B[0]))
        # Decode the whole continuation and hold back an unfinished character (a byte-level token may carry only
        # part of one, decoded as U+FFFD until the rest arrives).
        text = tokenizer.decode(generated).rstrip("\ufffd")
        if len(text) > shown:
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    sys.stdout.write(str(cfg.prompt))
    cache = ModelCache()
    model.generate(
        torch.tensor([ids], device=device),
        max_new,
        temperature=float(cfg.temperature),
        top_k=cfg.top_k,
        valid_vocab=valid_vocab,
        generator=torch.Generator(device=device).manual_seed(int(cfg.seed)),
        routing=cfg.routing,
        capacity=cfg.capacity,
        cache=cache,
        on_token=stream,
    )
    usage = request_usage(model, cache, max_new)[0]
    print(tokenizer.decode(generated)[shown:])
    print(format_usage(usage))
    return usage


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run_task(lambda _: generate_request(parse_args(argv)), OmegaConf.create({}))


if __name__ == "__main__":
    main()
