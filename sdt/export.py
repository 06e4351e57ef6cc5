"""`python -m sdt.export ckpt_path=<.ckpt> out=<dir>`: a training checkpoint as a Hugging Face model directory.

Writes `model.safetensors`, `config.json` and the tokenizer (`tokenizer.json`, `tokenizer_config.json`):
- the backbone under Hugging Face Llama names (Qwen2 when the model has q/k/v biases), so a dense export is a plain
  Llama/Qwen2 checkpoint that `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads;
- for routed models (SDT, STT, MoD) also the routing tensors (priors, transition networks, routers, gate scalars,
  calibrated thresholds) under `sdt.`-prefixed names, and the code `transformers` runs: `modeling_sdt.py`, the
  `layers_sdt.py` it imports and the package files both build on, copied verbatim (SHIPPED_FILES of
  sdt/transformers_code/; they import only torch, transformers and each other), registered in `config.json`
  (`model_type: sdt`, `auto_map`) so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
  loads the routed model in its causal mode.
Every export stores the full model config under the `sdt` key of `config.json`. `model.init_from=<dir>` reads any
export back (training or evaluate.py) as the model it is. Every export also carries `generation_config.json` and a
model card, `README.md` (sdt/model_card.py), with the evaluation figures of `eval_json=<eval.json of evaluate.py>`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from sdt.checkpoint import load_checkpoint
from sdt.cli import EXIT_USER_ERROR
from sdt.data import Tokenizer
from sdt.errors import UserError
from sdt.evaluation.loading import load_model
from sdt.model_card import read_eval_json, write_card_files
from sdt.models import LanguageModel
from sdt.models.pretrained import ROUTED_MODEL_TYPE, export_state_dict, hf_config
from sdt.transformers_code import MODELING_FILE, SHIPPED_FILES

USAGE = "usage: python -m sdt.export ckpt_path=<path to .ckpt> out=<output directory> [eval_json=<eval.json>]"
REQUIRED = ("ckpt_path", "out")
OPTIONAL = ("eval_json",)
WEIGHTS_FILE = "model.safetensors"
# Options of routed models that the shipped modeling code does not reproduce yet, with the value it assumes: a
# checkpoint with another value is refused rather than exported as a model that computes something else.
UNEXPORTED_OPTIONS = {"routed_sublayer": "block"}


def export(ckpt_path: str, out: str, eval_json: str | None = None) -> str:
    """Write the checkpoint's model, config, tokenizer, generation config and model card into `out` (the card with
    the figures of `eval_json`, an `eval.json` of evaluate.py); returns `out`."""
    eval_result = read_eval_json(eval_json) if eval_json else None
    ckpt = load_checkpoint(ckpt_path)
    model = load_model(ckpt, torch.device("cpu"))
    check_exportable(model)
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    try:
        config = write_export(model, tokenizer, out)
        write_card_files(out, model, ckpt, tokenizer.eos_id, eval_result, config["architectures"][0])
    except OSError as e:  # out cannot be created or written (a file in the way, no permission, a full disk)
        raise UserError(f"out={out}: cannot write the export: {e.strerror or e}") from None
    return out


def check_exportable(model: LanguageModel) -> None:
    """Raise UserError, naming the key, for a routed model whose options the exported code would not reproduce."""
    if not model.is_routed:
        return
    for key, assumed in UNEXPORTED_OPTIONS.items():
        value = getattr(model.config, key)
        if value != assumed:
            raise UserError(
                f"model.{key}={value}: the exported modeling code does not reproduce it yet (it runs {key}={assumed})"
            )


def write_export(model: LanguageModel, tokenizer: Tokenizer, out: str) -> dict:
    """Weights, config.json (returned), tokenizer and, for a routed model, its modeling code."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(export_state_dict(model), os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(model.config, eos_token_id=tokenizer.eos_id)
    if model.is_routed:
        config.update(routed_config_keys())
        for path in SHIPPED_FILES:
            shutil.copyfile(path, os.path.join(out, os.path.basename(path)))
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
