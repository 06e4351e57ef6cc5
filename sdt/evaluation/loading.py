"""Loading what an evaluation runs on: the model of a training checkpoint or a pretrained one, its tokenizer, the
device, and the data config to evaluate on."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import torch
from omegaconf import DictConfig, OmegaConf

from sdt.common.errors import UserError
from sdt.data import DataConfig, Tokenizer
from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.pretrained import Pretrained
from sdt.training.checkpoint import load_checkpoint, model_state_dict

# auto: CUDA when available, else the CPU; a CUDA device may also be named by index (cuda:<index>)
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = get_args(Device)


def is_device_name(name: object) -> bool:
    """Whether `name` names a device evaluation runs on: one of DEVICES or cuda:<index>."""
    if not isinstance(name, str):
        return False
    kind, sep, index = name.partition(":")
    return name in DEVICES or (sep == ":" and kind == "cuda" and index.isdigit())


def check_device(name: object, key: str = "device") -> None:
    if not is_device_name(name):
        raise UserError(f"{key} must be one of {', '.join(DEVICES)} (or cuda:<index>), got {name!r}")


def pick_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(ckpt: dict[str, Any], device: torch.device) -> LanguageModel:
    cfg = ModelConfig.from_saved(ckpt["hyper_parameters"]["model"])
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
    model = build_model(ModelConfig.from_saved(pretrained.own_model_dict()))
    pretrained.load_into(model)
    return _ready(model, device)


def _ready(model: LanguageModel, device: torch.device) -> LanguageModel:
    model = model.to(device).eval()
    if model.config.compile:
        model.compile()
    return model


def training_metrics_csv(ckpt_path: str, ckpt: dict[str, Any]) -> str | None:
    """The CSV log of the run that wrote the checkpoint, if it is still next to it."""
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "csv", "metrics.csv")]
    out_dir = (ckpt["sdt"].get("config") or {}).get("paths", {}).get("output_dir")
    if out_dir:
        candidates.append(os.path.join(out_dir, "csv", "metrics.csv"))
    return next((c for c in candidates if os.path.isfile(c)), None)


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
