"""What an export tells whoever receives it: `generation_config.json` (the sampling defaults of `sdt.generate`) and
a model card, `README.md`, written from the checkpoint: what the model is, its architecture and compute, how it was
trained (steps, tokens, data, optimiser), its evaluation figures when an `eval.json` of `evaluate.py` is given, and
the exact commands that load and score it."""

from __future__ import annotations

import json
import os
from typing import Any

from sdt.common.errors import UserError
from sdt.evaluation.generation import SAMPLING_DEFAULTS
from sdt.models import LanguageModel
from sdt.models.compute import compute_report

GENERATION_FILE = "generation_config.json"
CARD_FILE = "README.md"

PAPERS = {
    "sdt": "[arXiv:2511.21408](https://arxiv.org/abs/2511.21408)",
    "stt": "[arXiv:2511.21408](https://arxiv.org/abs/2511.21408)",
    "mod": "[arXiv:2404.02258](https://arxiv.org/abs/2404.02258)",
}
WHAT_IT_IS = {
    "dense": "a dense decoder-only transformer (every block runs on every token), stored as a plain {hf_arch} "
    "checkpoint.",
    "sdt": "an SDT (Subjective Depth Transformer, {paper}): decision layers run every token and score its surprise "
    "against a cheap prior; the dynamic layer after each runs its block only on the most surprising tokens, about "
    "{capacity:.0%} of them.",
    "stt": "an STT (Subjective Timescale Transformer, {paper}): a transition network predicts each token's update from "
    "the previous token, and a causal router runs the block (and stores its K/V) only for the tokens whose change "
    "was not predictable, about {capacity:.0%} of them.",
    "mod": "a Mixture-of-Depths transformer ({paper}): a learned router sends about {capacity:.0%} of the tokens "
    "through each routed block; the others skip it.",
}


def generation_config(model: LanguageModel, eos_token_id: int, valid_vocab: int | None = None) -> dict[str, Any]:
    """`generation_config.json`: stop and pad on the end-of-text token (the tokenizer has no pad token), at most the
    model's context, sampling as `sdt.generate` does; the ids from `valid_vocab` up (the vocabulary's padded tail,
    which no token maps to) are never generated, as `sdt.generate` masks them."""
    config = {
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "max_length": model.config.max_seq_len,
        # The sampling defaults of `python -m sdt.generate`, so an export samples as sdt does.
        "do_sample": SAMPLING_DEFAULTS["temperature"] > 0,
        "temperature": SAMPLING_DEFAULTS["temperature"],
        "top_k": SAMPLING_DEFAULTS["top_k"],
    }
    if valid_vocab is not None and valid_vocab < model.config.vocab_size:
        config["suppress_tokens"] = list(range(valid_vocab, model.config.vocab_size))
    return config


def read_eval_json(path: str) -> dict[str, Any]:
    """An `eval.json` written by `evaluate.py`; refused with the key named when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except FileNotFoundError:
        raise UserError(f"eval_json={path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"eval_json={path}: not JSON ({e})") from None
    if not isinstance(result, dict) or "perplexity" not in result or "splits" not in result:
        raise UserError(f"eval_json={path}: not an eval.json of evaluate.py (no perplexity and splits)")
    return result


def training_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Steps, tokens and the data and optimiser settings of the run that wrote `ckpt`.

    Tokens are the positions trained on (batches x batch size x sequence length x ranks), from the fit loop's count
    of batches (gradient accumulation included) and the data module's record of the ranks."""
    config = ckpt.get("sdt", {}).get("config") or {}
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    optim = ckpt.get("hyper_parameters", {}).get("optim") or config.get("optim") or {}
    step = ckpt.get("global_step")
    batches = (
        ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("total", {}).get("processed")
    )
    if batches is None and step is not None:
        batches = step * int(trainer.get("accumulate_grad_batches") or 1)
    world = int((ckpt.get("LMDataModule") or {}).get("world_size") or 1)
    batch, seq_len = data.get("batch_size"), data.get("seq_len")
    tokens = batches * batch * seq_len * world if batches is not None and batch and seq_len else None
    return {
        "steps": step,
        "tokens": tokens,
        "corpus": data.get("corpus") or data.get("name"),
        "seq_len": seq_len,
        "batch_size": batch,
        "world_size": world,
        "lr": optim.get("lr"),
        "group_lr": optim.get("group_lr") or {},
        "precision": trainer.get("precision"),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 else f"{value:.3g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _architecture(model: LanguageModel, seq_len: int) -> list[str]:
    cfg = model.config
    report = compute_report(cfg, seq_len)
    total, backbone = model.num_parameters() / 1e6, model.num_parameters(exclude_embeddings=True) / 1e6
    rows = [
        ("architecture", f"`{cfg.arch}`"),
        ("parameters", f"{total:.2f}M ({backbone:.2f}M without embeddings)"),
        ("layers", cfg.n_layers),
        ("d_model", cfg.d_model),
        ("attention heads / KV heads", f"{cfg.n_heads} / {cfg.n_kv_heads}"),
        ("vocabulary", cfg.vocab_size),
        ("context (max_seq_len)", cfg.max_seq_len),
    ]  # fmt: skip
    if model.is_routed:
        rows += [
            ("capacity", str(cfg.capacity)),
            ("routing at inference", f"`{cfg.inference_routing}`"),
            ("dense first / last layers", f"{cfg.dense_first} / {cfg.dense_last}"),
        ]
    rows += [
        (f"FLOPs per token vs dense (at {seq_len} tokens)", f"{report['flops_ratio_vs_dense']:.3f}x"),
        ("KV-cache entries vs dense", f"{report['kv_entries_ratio_vs_dense']:.3f}x"),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]


def _training(summary: dict[str, Any]) -> list[str]:
    rows = [
        ("optimizer steps", summary["steps"]),
        ("training tokens", summary["tokens"]),
        ("corpus", summary["corpus"]),
        ("sequence length", summary["seq_len"]),
        ("batch size per rank x ranks", f"{_fmt(summary['batch_size'])} x {summary['world_size']}"),
        ("learning rate", f"{summary['lr']:g}" if summary["lr"] is not None else None),
    ]
    if summary["group_lr"]:
        rows.append(("learning rate per role", ", ".join(f"{k}: {v}" for k, v in summary["group_lr"].items())))
    if summary["precision"]:
        rows.append(("precision", summary["precision"]))
    return ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]


def _evaluation(result: dict[str, Any] | None) -> list[str]:
    if result is None:
        return [
            (
                "Not evaluated with this export. `python evaluate.py ckpt_path=<checkpoint>` writes an `eval.json`; "
                "pass it as `eval_json=<path>` to `python -m sdt.export` to put its figures here."
            ),
        ]
    lines = [
        (
            f"`evaluate.py` on `{result.get('corpus')}` at sequence length {result.get('seq_len')}, routing mode "
            f"`{result.get('routing_mode')}` (step {result.get('global_step')}):"
        ),
        "",
        "| split | perplexity | bits per byte |",
        "|---|---|---|",
    ]
    for split, figures in result["splits"].items():
        lines.append(f"| {split} | {_fmt(figures.get('perplexity'))} | {_fmt(figures.get('bits_per_byte'), 3)} |")
    by_routing = result.get("perplexity_by_routing") or {}
    if len(by_routing) > 1:
        lines += ["", "Perplexity by routing mode (Top-K is the non-causal oracle, not usable for generation):", ""]
        lines += [f"- {v.get('label', mode)}: " + ", ".join(
            f"{s} {_fmt(p)}" for s, p in v.items() if s != "label") for mode, v in by_routing.items()]  # fmt: skip
    return lines


def model_card(
    model: LanguageModel,
    ckpt: dict[str, Any],
    out: str,
    eval_result: dict[str, Any] | None = None,
    hf_architecture: str = "LlamaForCausalLM",
) -> str:
    """The export's README.md (a Hugging Face model card, with its metadata header)."""
    cfg = model.config
    summary = training_summary(ckpt)
    seq_len = summary["seq_len"] or cfg.max_seq_len
    remote = model.is_routed
    trust = ", trust_remote_code=True" if remote else ""
    what = WHAT_IT_IS[cfg.arch].format(
        hf_arch=hf_architecture.removesuffix("ForCausalLM"), paper=PAPERS.get(cfg.arch, ""), capacity=cfg.capacity
    )
    tags = dict.fromkeys(["sdt", cfg.arch, "adaptive-compute" if remote else "dense"])  # unique, in order
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
        "",
        f"# {cfg.arch.upper()} language model ({model.num_parameters() / 1e6:.3g}M parameters)",
        "",
        (
            f"This is {what} It was trained and exported with `sdt`, a training "
            "framework for adaptive-compute transformers (SDT, STT, Mixture-of-Depths and dense baselines)."
        ),
        "",
        "## Architecture",
        "",
        *_architecture(model, seq_len),
        "",
        "## Training",
        "",
        *_training(summary),
        "",
        "## Evaluation",
        "",
        *_evaluation(eval_result),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{out}"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("{out}"{trust})',
        'ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
        "",
    ]
    if remote:
        lines += [
            (
                "`trust_remote_code=True` runs the modeling code shipped in this directory (`modeling_sdt.py`, a thin "
                "wrapper, and the `sdt` modules it builds the model from; torch and transformers only), which executes "
                f"the routed layers in their causal routing mode (`{cfg.inference_routing}`); without it transformers "
                "refuses to load the model."
            ),
            "",
        ]
    lines += [
        "Score it with lm-evaluation-harness's own Hugging Face model:",
        "",
        "```bash",
        (
            f"lm_eval --model hf --model_args pretrained={out}{',trust_remote_code=True' if remote else ''} "
            "--tasks <tasks> --batch_size 8"
        ),
        "```",
        "",
        (
            f"With `sdt` installed, `model.init_from={out}` reads it back for training or `evaluate.py`, as the model "
            "it is."
        ),
        "",
    ]
    return "\n".join(lines)


def write_card_files(
    out: str,
    model: LanguageModel,
    ckpt: dict[str, Any],
    eos_token_id: int,
    eval_result: dict[str, Any] | None,
    hf_architecture: str,
) -> None:
    with open(os.path.join(out, GENERATION_FILE), "w", encoding="utf-8") as f:
        valid_vocab = ckpt["sdt"].get("tokenizer_vocab_size")
        json.dump(generation_config(model, eos_token_id, valid_vocab), f, indent=2)
    with open(os.path.join(out, CARD_FILE), "w", encoding="utf-8") as f:
        f.write(model_card(model, ckpt, out, eval_result, hf_architecture))
