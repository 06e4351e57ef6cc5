"""The presets at real scale (conf/experiment/paper_transfer*.yaml, pretrain_125m*.yaml): they compose, validate and
build their models at the dimensions as written; in the slow suite each trains two steps on a local shard.

The real runs read the hub (Qwen2.5-0.5B, the GPT-2 tokenizer, FineWeb-edu); tests have no network, so a preset that
loads a checkpoint is built from that checkpoint's config.json (kept in benchmarks/gpu_hours.py; random weights)
through the mapping the loader uses, and the data is swapped for a local JSONL shard with batch and sequence shrunk.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from sdt.data import DataConfig
from sdt.models import ModelConfig, build_model
from sdt.training.optim import OptimConfig
from sdt.training.train import train
from tests.conftest import ROOT, compose_cfg
from tests.data.data_helpers import write_jsonl
from tests.test_configs import options

QWEN2_5_0_5B_PARAMS = 494_032_768  # the model card's 0.49B, counted exactly
GPT2_SMALL_PARAMS = 124e6  # pretrain_125m's dense model: GPT-2 small's 124M (with a 50304-token embedding)

PRESETS = [n for n in options("experiment") if n.startswith(("paper_transfer", "pretrain_125m"))]
PER_ARCH = [n for n in PRESETS if n.rsplit("_", 1)[-1] in ("dense", "mod", "sdt", "stt")]


def load_gpu_hours():
    """benchmarks/gpu_hours.py, which keeps the hub checkpoints' config.json (its model card) for offline use."""
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_hours", ROOT / "benchmarks" / "gpu_hours.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_HOURS = load_gpu_hours()


def preset_model(cfg: Any) -> dict[str, Any]:
    """The model a preset builds, without the network: a checkpoint's backbone from its config.json through the
    loader's mapping (what `Pretrained.model_dict` does once the file is downloaded), else the vocabulary of the
    preset's tokenizer."""
    if cfg.model.init_from:
        assert cfg.model.init_from == "Qwen/Qwen2.5-0.5B"
    else:
        assert cfg.data.tokenizer.path == "openai-community/gpt2" and cfg.model.vocab_size is None
    return {**GPU_HOURS.preset_model(cfg).to_dict(), "init_from": None}


def n_params(model: dict[str, Any]) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return sum(p.numel() for p in build_model(ModelConfig.from_dict(model)).parameters())


def test_every_preset_is_covered():
    assert set(PER_ARCH) == {
        *(f"paper_transfer_{a}" for a in ("sdt", "stt")),
        *(f"pretrain_125m_{a}" for a in ("dense", "mod", "sdt", "stt")),
    }


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_has_its_size(name, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path, tmp_path)
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    optim = OptimConfig.from_dict(OmegaConf.to_container(cfg.optim, resolve=True))
    model = preset_model(cfg)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert data.corpus == "hf_hub" and data.name == "HuggingFaceFW/fineweb-edu"
    arch = name.rsplit("_", 1)[-1]
    assert model["arch"] == (arch if arch in ("dense", "mod", "sdt", "stt") else "sdt")  # the bases: train.yaml's sdt
    dense = n_params({**model, "arch": "dense"})
    routed = n_params(model)
    assert dense <= routed <= 1.06 * dense  # routing modules (and skip maps) are small next to the backbone
    tokens_per_step = data.batch_size * data.seq_len * cfg.trainer.accumulate_grad_batches
    tokens = tokens_per_step * cfg.trainer.max_steps
    assert optim.warmup_steps < cfg.trainer.max_steps
    if name.startswith("paper_transfer"):
        # The paper's setting: Qwen2.5-0.5B at ~1M tokens per step for ~0.7B tokens, new modules at faster rates.
        assert dense == QWEN2_5_0_5B_PARAMS
        assert (model["d_model"], model["n_layers"], model["n_kv_heads"], model["qkv_bias"]) == (896, 24, 2, True)
        assert tokens_per_step == 2**20 and abs(tokens / 0.7e9 - 1) < 0.01
        assert optim.lr == 1e-5 and optim.group_lr == {"prior": 1e-3, "surprise": 1e-2, "router": 1e-3}
        assert (model["beta_mode"], model["beta_start"], model["beta_end"]) == ("cosine", 0.1, 100.0)
    else:
        # GPT-2 small's size, 0.5M tokens per step, Chinchilla's 20 tokens per parameter.
        assert abs(dense / GPT2_SMALL_PARAMS - 1) < 0.01
        assert tokens_per_step == 2**19 and abs(tokens / (20 * dense) - 1) < 0.02
    # Enough documents for the tokens (FineWeb-edu: ~1,030 tokens per document).
    assert data.max_train_docs * 1000 >= tokens


# ------------------------------------------------------------------------------------------------ slow: two steps


@pytest.fixture(scope="module")
def local_shard(tmp_path_factory, corpus_files) -> Path:
    """A local stand-in for a FineWeb-edu shard: a directory with one JSONL file of documents."""
    docs = []
    for path in corpus_files:
        text = Path(path).read_text(encoding="utf-8")
        docs += [text[i : i + 2000] for i in range(0, len(text), 2000)]
    out = tmp_path_factory.mktemp("fineweb-shard")
    write_jsonl(out / "train.jsonl", docs)
    return out


def shrunk(cfg: Any, shard: Path) -> list[str]:
    """Overrides that keep the preset's model dimensions and swap the data for the shard, shrinking batch, length,
    steps and validation to fit a 2-core CPU."""
    model = preset_model(cfg)
    keep = ("init_from", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim")
    keep += ("intermediate_size", "max_seq_len", "rope_theta", "rms_norm_eps", "qkv_bias", "tie_embeddings")
    overrides = [f"model.{k}={'null' if model[k] is None else model[k]}" for k in keep]
    overrides += [
        f"data.name={shard}",
        "data.config_name=null",
        "data.max_train_docs=null",
        "data.max_eval_docs=4",
        "data.seq_len=32",
        "data.batch_size=1",
        "data.calibration_blocks=2",
        "data.tokenizer.kind=bpe",
        "data.tokenizer.path=null",
        "data.tokenizer.vocab_size=320",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.accumulate_grad_batches=1",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "~callbacks.model_checkpoint",  # best.ckpt would be a second multi-GB copy of last.ckpt
    ]
    return overrides


@pytest.mark.slow  # real dimensions: 124M-126M (pretrain_125m) and 494M+ (paper_transfer) parameters on 2 cores
@pytest.mark.parametrize("name", PER_ARCH)
def test_preset_trains_two_steps_on_a_local_shard(name, tmp_path, local_shard, cache_dir):
    preset = compose_cfg("train", [f"experiment={name}"], tmp_path, cache_dir)
    cfg = compose_cfg("train", [f"experiment={name}", *shrunk(preset, local_shard)], tmp_path, cache_dir)
    result = train(cfg)
    assert result["global_step"] == 2 and math.isfinite(float(result["metrics"]["val/loss"]))
    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True, mmap=True)
    built = ckpt["hyper_parameters"]["model"]
    expected = preset_model(preset)
    for key in ("arch", "d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size", "capacity"):
        assert built[key] == expected[key], key
    # The trained weights are the preset's model, tensor for tensor.
    with torch.device("meta"):
        reference = build_model(ModelConfig.from_dict(expected)).state_dict()
    stored = {k.removeprefix("model."): tuple(v.shape) for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert stored == {k: tuple(v.shape) for k, v in reference.items()}
