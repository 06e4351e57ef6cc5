"""`train(cfg)`: everything `python train.py` does, callable from tests with a composed config."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sdt.common.errors import UserError
from sdt.data import LMDataModule, Tokenizer
from sdt.data.datamodules import build_datamodule
from sdt.models import LanguageModel, ModelConfig
from sdt.models.compute import compute_report
from sdt.models.pretrained import Pretrained
from sdt.models.skip_map_fit import fit_skip_maps
from sdt.training.callbacks import CheckpointOnSignal, Float32MatmulPrecision, MatmulPrecision, ValidateAtEnd
from sdt.training.checkpoint import (
    SHARDED_METADATA,
    AtomicCheckpointIO,
    checkpoint_exists,
    load_checkpoint,
    resolve_resume_path,
)
from sdt.training.experiment_logging import finish_loggers, log_run_config
from sdt.training.fit_loop import install_finishing_fit_loop
from sdt.training.lit_module import LitLM
from sdt.training.resolvers import register_resolvers
from sdt.training.sweeps import make_multirun_safe, release_distributed

register_resolvers()  # configs may use ${package_file:...}; register before Hydra composes them

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64  # pad the embedding table so matmuls use aligned shapes; padded ids are never produced


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def to_dict(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def resolve_model_config(
    model: Mapping[str, Any], tokenizer_vocab: int, seq_len: int, saved: bool = False
) -> ModelConfig:
    """The run's model config, built once and handed to the model: `model.*` (or, `saved`, a checkpoint's config)
    with what the data decides (the vocabulary size) filled in and what must agree with the data checked."""
    model = dict(model)
    if model.get("vocab_size") is None:
        model["vocab_size"] = round_up(tokenizer_vocab, VOCAB_MULTIPLE)
    elif model["vocab_size"] < tokenizer_vocab:
        raise UserError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab}")
    max_len = model.get("max_seq_len", ModelConfig.max_seq_len)
    if seq_len > max_len:
        raise UserError(f"data.seq_len={seq_len} is longer than model.max_seq_len={max_len}")
    return ModelConfig.from_saved(model) if saved else ModelConfig.from_dict(model)


def fit_converted_skip_maps(model: LanguageModel, datamodule: L.LightningDataModule) -> None:
    """A conversion's skip maps, fitted to the pretrained blocks on `model.skip_map_fit_blocks` training blocks."""
    n = model.config.skip_map_fit_blocks
    if n == 0 or not model.is_routed:
        return
    if not isinstance(datamodule, LMDataModule):
        raise UserError(
            "model.skip_map_fit_blocks fits on language-model blocks: use a text corpus, not reasoning data"
        )
    blocks = datamodule.spread_train_blocks(n)
    explained = fit_skip_maps(model, blocks.split(datamodule.cfg.eval_batch_size))
    log.info(
        "skip maps fitted on %d training blocks; explained variance of the block updates per routed layer: %s",
        len(blocks),
        ", ".join(f"{i}: {v:.2f}" for i, v in explained.items()),
    )


def split_trainer_config(trainer: DictConfig) -> tuple[dict[str, Any], MatmulPrecision | None]:
    """The `trainer` config as Lightning's Trainer takes it, and `trainer.float32_matmul_precision`, which is not a
    Trainer argument: a callback applies it in every training process (`Float32MatmulPrecision`)."""
    trainer_cfg = OmegaConf.to_container(trainer, resolve=True)
    return trainer_cfg, trainer_cfg.pop("float32_matmul_precision", None)


def build_trainer(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(ValidateAtEnd())
    trainer_cfg, matmul_precision = split_trainer_config(cfg.trainer)
    if matmul_precision is not None:
        callbacks.append(Float32MatmulPrecision(matmul_precision))
    callbacks += extra_callbacks or []
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer = instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=loggers if loggers else False,
        gradient_clip_val=cfg.optim.grad_clip or None,
        plugins=[AtomicCheckpointIO()],  # a crash mid-write never leaves a truncated checkpoint
    )
    install_finishing_fit_loop(trainer)  # a run resumed at its last step still validates, calibrates and saves
    return trainer


def log_compute(
    trainer: L.Trainer, model_cfg: ModelConfig, seq_len: int, teacher: ModelConfig | None = None
) -> dict[str, float]:
    """Analytic compute of the configured model against dense, logged once at step 0 (`compute/...`)."""
    report = compute_report(model_cfg, seq_len, teacher=teacher)
    metrics = {
        f"compute/{k}": float(report[k])
        for k in ("flops_per_token", "flops_ratio_vs_dense", "train_flops_ratio_vs_dense", "kv_entries_ratio_vs_dense")
    }
    log.info(
        "compute: %.2f MFLOPs/token, %.3f x dense FLOPs (training %.3f x), %.3f x dense KV entries",
        report["flops_per_token"] / 1e6,
        report["flops_ratio_vs_dense"],
        report["train_flops_ratio_vs_dense"],
        report["kv_entries_ratio_vs_dense"],
    )
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=0)
    return metrics


def final_step(trainer: L.Trainer, last_checkpoint: str | None) -> int:
    if trainer.global_step == 0 and last_checkpoint and checkpoint_exists(last_checkpoint):
        metadata = (
            os.path.join(last_checkpoint, SHARDED_METADATA) if os.path.isdir(last_checkpoint) else last_checkpoint
        )
        return int(torch.load(metadata, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    return trainer.global_step


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured model; return the final metrics and the checkpoint paths."""
    make_multirun_safe(cfg)
    ckpt_path = resolve_resume_path(cfg.get("ckpt_path"), str(cfg.paths.output_dir))
    pretrained, tokenizer = None, None
    if ckpt_path:
        # Resume: the architecture comes from the checkpoint, not from the command line.
        ckpt = load_checkpoint(ckpt_path)
        model_dict = ckpt["hyper_parameters"]["model"]
        log.info("resuming from %s (step %s)", ckpt_path, ckpt.get("global_step"))
        if model_dict.get("init_from"):  # the pretrained tokenizer the run started with, not data.tokenizer
            tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    else:
        model_dict = to_dict(cfg.model)
        if model_dict.get("init_from"):
            # Backbone dimensions and tokenizer come from the pretrained checkpoint; its weights load below.
            pretrained = Pretrained(model_dict["init_from"])
            model_dict = pretrained.model_dict(model_dict)
            tokenizer = Tokenizer.from_pretrained(*pretrained.tokenizer_source())
            log.info("model.init_from: using the checkpoint's tokenizer (%r), not data.tokenizer", tokenizer)

    L.seed_everything(cfg.seed, workers=True)
    data_cfg, datamodule = build_datamodule(to_dict(cfg.data), tokenizer=tokenizer)
    datamodule.prepare_data()
    datamodule.setup("fit")

    model_cfg = resolve_model_config(model_dict, datamodule.vocab_size, data_cfg.seq_len, saved=bool(ckpt_path))
    lit = LitLM(model=model_cfg, optim=to_dict(cfg.optim), distill=to_dict(cfg.get("distill")))
    if pretrained is not None:
        pretrained.load_into(lit.model)
        fit_converted_skip_maps(lit.model, datamodule)
    lit.extra_state = {
        "config": to_dict(cfg),
        "tokenizer": datamodule.tokenizer.to_json(),
        "tokenizer_vocab_size": datamodule.vocab_size,
        "data_stats": datamodule.split_stats,
    }
    log.info(
        "model %s: %.2fM parameters (%.2fM without embeddings)",
        model_cfg.arch,
        lit.model.num_parameters() / 1e6,
        lit.model.num_parameters(exclude_embeddings=True) / 1e6,
    )

    trainer = build_trainer(cfg)
    failed = True
    try:
        log_run_config(trainer, cfg)
        log_compute(trainer, model_cfg, data_cfg.seq_len, teacher=lit.teacher_config)
        with warnings.catch_warnings():
            # Lightning warns that a mid-epoch resume replays data unless the loader is stateful; ours continues
            # from the data module's saved position (LMDataModule.state_dict), so the warning does not apply.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
        failed = False
    except SIGTERMException:
        failed = False  # CheckpointOnSignal saved last.ckpt and logged how to resume: a clean stop
    finally:
        # Also when the job failed: the next job of a multirun (same process) must start its own W&B run.
        finish_loggers(trainer, failed=failed)
        release_distributed()
    signalled = next((c.received for c in trainer.callbacks if isinstance(c, CheckpointOnSignal)), None)

    # With those restored from the checkpoint: a run resumed at its last step logs only its final validation.
    metrics = next(c for c in trainer.callbacks if isinstance(c, ValidateAtEnd)).metrics(trainer)
    # The monitored callback keeps best.ckpt; the unmonitored one always holds the latest (last.ckpt).
    best_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)
    last_cb = next((c for c in trainer.checkpoint_callbacks if not c.monitor), None)
    last_path = getattr(last_cb, "best_model_path", None) or None
    if last_path is None and last_cb is not None and last_cb.dirpath:  # ddp_spawn: only rank 0's callbacks saw it
        candidate = os.path.join(last_cb.dirpath, "last.ckpt")
        last_path = candidate if checkpoint_exists(candidate) else None
    result = {
        "metrics": metrics,
        # Under ddp_spawn the training ran in child processes and this trainer never stepped: the final checkpoint,
        # written by rank 0, knows the step.
        "global_step": final_step(trainer, last_path),
        "world_size": trainer.world_size,
        "best_checkpoint": getattr(best_cb, "best_model_path", None) or None,
        "last_checkpoint": last_path,
        "stopped_by_signal": signalled,  # e.g. "SIGTERM": preempted, resume from last_checkpoint
    }
    if trainer.is_global_zero:
        if result["last_checkpoint"]:
            log.info("last checkpoint: %s", os.path.relpath(result["last_checkpoint"]))
        # A machine-readable summary next to the checkpoints: what sweeps and reports read.
        os.makedirs(str(cfg.paths.output_dir), exist_ok=True)
        with open(os.path.join(str(cfg.paths.output_dir), "train_result.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
