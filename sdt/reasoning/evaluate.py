"""`python evaluate.py task=reasoning ckpt_path=...`: answer held-out problems and measure overthinking.

Greedy (by default) generation from each held-out question's prompt, up to `reasoning.max_new_tokens` new tokens.
Per run, written to `reasoning.json`:

* accuracy: share of problems whose final answer (after `</think>`) equals the reference exactly;
* mean_thinking_tokens: model tokens from the start of the generation to the closing `</think>` (all generated
  tokens when the think block never closes), over all problems;
* self_stop_share: share of generations that close the think block and end (emit the end-of-text token) before
  the token limit;
* overthink_score (with efficiency_ratio and marker_ratio): means over the generations that closed the think
  block and state the correct answer in some step (`num_scored` of them); the others have no efficiency ratio.

A plot of accuracy against mean thinking tokens lands next to it (`accuracy_vs_tokens.png`), with this run and the
runs listed in `reasoning.compare` (their reasoning.json files).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from typing import Any

import torch
from omegaconf import DictConfig

from sdt.common.errors import UserError
from sdt.data.reasoning.answers import answer_checker, extract_answer
from sdt.data.reasoning.datamodule import REASONING_CORPORA, ReasoningDataConfig, ReasoningDataModule
from sdt.data.reasoning.metrics import THINK_CLOSE, TraceError, split_steps, split_trace, steps_metrics
from sdt.data.tokenizer import Tokenizer
from sdt.evaluation.loading import data_dict_for_eval, load_model, pick_device
from sdt.models import LanguageModel
from sdt.models.transformer import left_pad
from sdt.reasoning.plot import VARIANT_LABELS, plot_accuracy_vs_tokens
from sdt.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def reasoning_data_config(cfg: DictConfig, ckpt: dict[str, Any]) -> ReasoningDataConfig:
    """The reasoning data to evaluate on: `data=...` from the command line, else the checkpoint's."""
    data = data_dict_for_eval(cfg, ckpt)
    if data.get("corpus") not in REASONING_CORPORA:
        raise UserError(
            f"task=reasoning needs a reasoning corpus ({', '.join(REASONING_CORPORA)}); the checkpoint was trained on "
            f"{data.get('corpus')!r}: pass data=reasoning_synthetic (or data=reasoning_hub ...)"
        )
    return ReasoningDataConfig.from_dict(data)


def count_thinking_tokens(tokenizer: Tokenizer, ids: list[int], text: str) -> int:
    """Generated tokens up to the end of the closing think tag (all of them when it never closes)."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        return len(ids)
    end = close + len(THINK_CLOSE)
    lo, hi = 0, len(ids)  # smallest n with len(decode(ids[:n])) >= end; decoding is monotone in n
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid])) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo


def score_generation(text: str, reference: str, markers: list[str]) -> dict[str, Any]:
    """Correctness and overthinking metrics of one generation (the completion after the prompt)."""
    row: dict[str, Any] = {"closed_think": THINK_CLOSE in text, "answer": None, "correct": False}
    try:
        thinking, final = split_trace(text)
    except TraceError:
        return row
    row["answer"] = extract_answer(final)
    row["correct"] = answer_checker(reference)(final)
    try:
        m = steps_metrics(split_steps(thinking), answer_checker(reference), markers)
    except TraceError:
        return row
    row.update(num_steps=len(m.steps), efficiency=m.efficiency, marker=m.marker, overthink=m.score)
    return row


@torch.no_grad()
def generate_batch(
    model: LanguageModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    temperature: float,
    valid_vocab: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> list[tuple[list[int], bool]]:
    """(new token ids up to the end-of-text token, whether it was emitted) for each prompt; left-padded batch."""
    ids, pad_mask = left_pad(prompts, pad_id=eos_id)
    out = model.generate(
        ids.to(device),
        max_new_tokens,
        temperature=temperature,
        pad_mask=pad_mask.to(device),
        eos_id=eos_id,
        valid_vocab=valid_vocab,
        generator=generator,
    )[:, ids.shape[1] :].tolist()
    results = []
    for row in out:
        stopped = eos_id in row
        results.append((row[: row.index(eos_id)] if stopped else row, stopped))
    return results


def evaluate_reasoning(cfg: DictConfig) -> dict[str, Any]:
    rcfg = cfg.reasoning
    ckpt = load_checkpoint(cfg.ckpt_path)
    device = pick_device(cfg.get("device", "auto"))
    torch.manual_seed(int(cfg.seed))
    model = load_model(ckpt, device)
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    valid_vocab = int(ckpt["sdt"].get("tokenizer_vocab_size", tokenizer.vocab_size))
    data_cfg = reasoning_data_config(cfg, ckpt)
    datamodule = ReasoningDataModule(data_cfg, tokenizer=tokenizer)

    problems = datamodule.test_problems(str(rcfg.split))[: int(rcfg.num_problems)]
    longest_prompt = max(len(p) for _, p, _ in problems)
    max_new = min(int(rcfg.max_new_tokens), model.config.max_seq_len - longest_prompt)
    if max_new <= 0:
        raise UserError(f"prompts of {longest_prompt} tokens leave no room under model.max_seq_len")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    rows = []
    batch_size = int(rcfg.batch_size)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        outs = generate_batch(
            model, [p for _, p, _ in chunk], max_new, tokenizer.eos_id, float(rcfg.temperature), valid_vocab,
            generator, device,
        )  # fmt: skip
        for (question, _, reference), (ids, stopped) in zip(chunk, outs, strict=True):
            text = tokenizer.decode(ids)
            row = score_generation(text, reference, data_cfg.markers)
            row.update(
                question=question,
                reference=reference,
                generation=text,
                thinking_tokens=count_thinking_tokens(tokenizer, ids, text),
                new_tokens=len(ids),
                self_stop=bool(stopped and row["closed_think"]),
            )
            rows.append(row)

    scored = [r for r in rows if "overthink" in r]
    reference_tokens = [
        count_thinking_tokens(tokenizer, tokenizer.encode(r.trace), r.trace) for r in datamodule.records[rcfg.split]
    ][: len(rows)]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    result: dict[str, Any] = {
        "checkpoint": os.path.abspath(cfg.ckpt_path),
        "global_step": ckpt.get("global_step"),
        "variant": data_cfg.braking,
        "label": VARIANT_LABELS.get(data_cfg.braking, data_cfg.braking),
        "corpus": data_cfg.corpus,
        "split": str(rcfg.split),
        "num_problems": len(rows),
        "max_new_tokens": max_new,
        "temperature": float(rcfg.temperature),
        "accuracy": mean([float(r["correct"]) for r in rows]),
        "mean_thinking_tokens": mean([r["thinking_tokens"] for r in rows]),
        "mean_thinking_tokens_correct": mean([r["thinking_tokens"] for r in rows if r["correct"]]),
        "mean_new_tokens": mean([r["new_tokens"] for r in rows]),
        "self_stop_share": mean([float(r["self_stop"]) for r in rows]),
        "closed_think_share": mean([float(r["closed_think"]) for r in rows]),
        "overthink_score": mean([r["overthink"] for r in scored]),
        "efficiency_ratio": mean([r["efficiency"] for r in scored]),
        "marker_ratio": mean([r["marker"] for r in scored]),
        "num_scored": len(scored),
        "reference_mean_thinking_tokens": mean(reference_tokens),
        "generations": rows,
    }
    out_dir = str(cfg.paths.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "reasoning.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    others = []
    for other in rcfg.get("compare") or []:
        with open(other) as f:
            others.append(json.load(f))
    result["plot"] = plot_accuracy_vs_tokens([result, *others], os.path.join(out_dir, "accuracy_vs_tokens.png"))
    print(format_reasoning_report(result))
    log.info("wrote %s", path)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_reasoning_report(r: dict[str, Any]) -> str:
    lines = [
        f"checkpoint        {r['checkpoint']} (step {r['global_step']})",
        (
            f"data              {r['corpus']} {r['split']}, braking={r['variant']}, {r['num_problems']} problems, "
            f"<= {r['max_new_tokens']} new tokens, temperature {r['temperature']}"
        ),
        f"accuracy          {_fmt(r['accuracy'], '.3f')}",
        (
            f"thinking tokens   {_fmt(r['mean_thinking_tokens'], '.1f')} (correct answers: "
            f"{_fmt(r['mean_thinking_tokens_correct'], '.1f')}; reference traces: "
            f"{_fmt(r['reference_mean_thinking_tokens'], '.1f')})"
        ),
        f"self-stop share   {_fmt(r['self_stop_share'], '.3f')}",
        (
            f"overthink score   {_fmt(r['overthink_score'], '.3f')} (efficiency {_fmt(r['efficiency_ratio'], '.3f')}, "
            f"markers {_fmt(r['marker_ratio'], '.3f')}; over {r['num_scored']} generations)"
        ),
    ]
    for g in r["generations"][:2]:
        lines += ["", f"--- {g['question']} (reference {g['reference']})", g["generation"]]
    return "\n".join(lines)
