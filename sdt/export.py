"""`python -m sdt.export ckpt_path=<.ckpt> out=<dir>`: a training checkpoint as a Hugging Face model directory.

Writes `model.safetensors`, `config.json` and the tokenizer (`tokenizer.json`, `tokenizer_config.json`):
- a dense model as a plain Llama checkpoint (Qwen2 when it has q/k/v biases), under Hugging Face names, which
  `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads with its own modeling code;
- a routed model (SDT, STT, MoD) under the package's own weight names, with the code `transformers` runs: the thin
  wrapper `modeling_sdt.py` and the package modules it builds the model from (sdt/transformers_code/: only their
  `from sdt... import` lines are rewritten, to flat sibling imports), registered in `config.json` (`model_type: sdt`,
  `auto_map`), so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs the package's own
  model in its causal routing mode, where `sdt` is not installed too.
Every export stores the full model config under the `sdt` key of `config.json`. `model.init_from=<dir>` reads any
export back (training or evaluate.py) as the model it is. Every export also carries `generation_config.json` and a
model card, `README.md` (sdt/evaluation/model_card.py), with the evaluation figures of
`eval_json=<eval.json of evaluate.py>`.

What the directory would not reproduce is refused before anything is written (`check_reproducible`), with one line
naming the option: a model config that does not survive `config.json`, weights that are not exactly those of the
model the config builds, and code that cannot ship.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sdt.common.errors import EXIT_USER_ERROR, UserError
from sdt.data import Tokenizer
from sdt.evaluation.loading import load_model
from sdt.evaluation.model_card import read_eval_json, write_card_files
from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.pretrained import (
    PACKAGE_WEIGHT_NAMES,
    ROUTED_MODEL_TYPE,
    SDT_CONFIG_KEY,
    WEIGHT_NAMES_KEY,
    export_state_dict,
    hf_config,
)
from sdt.training.checkpoint import load_checkpoint
from sdt.transformers_code import MODELING_FILE, ShippingError, shipped_sources

USAGE = "usage: python -m sdt.export ckpt_path=<path to .ckpt> out=<output directory> [eval_json=<eval.json>]"
REQUIRED = ("ckpt_path", "out")
OPTIONAL = ("eval_json",)
WEIGHTS_FILE = "model.safetensors"


def export(ckpt_path: str, out: str, eval_json: str | None = None) -> str:
    """Write the checkpoint's model, config, tokenizer, generation config and model card into `out` (the card with
    the figures of `eval_json`, an `eval.json` of evaluate.py); returns `out`."""
    eval_result = read_eval_json(eval_json) if eval_json else None
    ckpt = load_checkpoint(ckpt_path)
    model = load_model(ckpt, torch.device("cpu"))
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    code = check_reproducible(model)
    try:
        config = write_export(model, tokenizer, out, code)
        write_card_files(out, model, ckpt, tokenizer.eos_id, eval_result, config["architectures"][0])
    except OSError as e:  # out cannot be created or written (a file in the way, no permission, a full disk)
        raise UserError(f"out={out}: cannot write the export: {e.strerror or e}") from None
    return out


def check_reproducible(model: LanguageModel) -> dict[str, str]:
    """Raise UserError, naming the option, for what an export of `model` would not reproduce; returns the code a
    routed export ships (file name -> text; {} for a dense model, which runs transformers' own Llama/Qwen2)."""
    cfg = model.config
    exported = {}
    for key, value in hf_config(cfg)[SDT_CONFIG_KEY].items():  # what the loader will read
        try:
            exported[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            raise UserError(f"model.{key}={value!r} does not survive config.json (not a JSON value)") from None
    back = ModelConfig.from_dict({**exported, "init_from": cfg.init_from, "init_layers": cfg.init_layers})
    changed = [k for k, v in cfg.to_dict().items() if json.dumps(back.to_dict()[k]) != json.dumps(v)]
    if changed:
        raise UserError(
            f"model.{changed[0]}={getattr(cfg, changed[0])!r} does not survive config.json "
            f"(reads back as {getattr(back, changed[0])!r}): the export would be another model"
        )
    if not model.is_routed:
        return {}
    with torch.device("meta"):  # the model the export's loader builds, to compare names and shapes only
        loaded = build_model(back)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise UserError(
            f"the model's tensors are not those model.arch={cfg.arch} builds from its config ({', '.join(differ[:5])}"
            f"{' ...' if len(differ) > 5 else ''}): the export would load another model"
        )
    try:
        return shipped_sources()
    except ShippingError as e:
        raise UserError(f"the routed model's code cannot ship with the export: {e}") from None


def write_export(model: LanguageModel, tokenizer: Tokenizer, out: str, code: dict[str, str] | None = None) -> dict:
    """Weights, config.json (returned), tokenizer and, for a routed model, `code` (file name -> text; default: the
    code `check_reproducible` ships)."""
    from safetensors.torch import save_file

    if code is None:
        code = check_reproducible(model)
    os.makedirs(out, exist_ok=True)
    save_file(export_state_dict(model), os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(model.config, eos_token_id=tokenizer.eos_id)
    if model.is_routed:
        config.update(routed_config_keys())
    for name, text in code.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tokenizer.save(out)
    return config


def routed_config_keys() -> dict:
    """config.json keys that make transformers load a routed export with the shipped modeling code."""
    module = os.path.splitext(os.path.basename(MODELING_FILE))[0]
    return {
        "model_type": ROUTED_MODEL_TYPE,
        "architectures": ["SDTForCausalLM"],
        "auto_map": {"AutoConfig": f"{module}.SDTConfig", "AutoModelForCausalLM": f"{module}.SDTForCausalLM"},
        WEIGHT_NAMES_KEY: PACKAGE_WEIGHT_NAMES,
    }


def parse_args(argv: list[str]) -> dict[str, str]:
    """`key=value` arguments, as for train.py and evaluate.py; ckpt_path and out are required."""
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in REQUIRED + OPTIONAL or not value:
            raise UserError(f"unexpected argument {arg!r}; {USAGE}")
        args[key] = value
    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required; {USAGE}")
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out = export(args["ckpt_path"], args["out"], args.get("eval_json"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(f"exported {args['ckpt_path']} to {out}")


if __name__ == "__main__":
    main()
