"""ModelConfig: its sections, the options of each architecture, and configs saved before the sections existed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import ModelConfig, build_model
from sdt.models.config import ARCH_SECTIONS, ARCHS, ROUTED_ARCHS, Recipe, Routing, foreign_options, model_options
from sdt.training.lit_module import LitLM

# The flat hyper_parameters["model"] of a checkpoint written before the config had sections (and before the capacity
# schedule was removed), as that version's ModelConfig.to_dict() wrote it: SDT trained with the schedule.
OLD_CHECKPOINT_MODEL = {
    "arch": "sdt", "vocab_size": 64, "d_model": 32, "n_layers": 4, "n_heads": 2, "n_kv_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "max_seq_len": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "qkv_bias": False,
    "tie_embeddings": True, "dropout": 0.0, "init_std": 0.02, "compile": False, "activation_checkpointing": False,
    "init_from": None, "init_layers": None, "capacity": 0.5, "capacity_start": 1.0, "capacity_warmup": 0.3,
    "capacity_schedule": "linear", "capacity_levels": 4, "always_execute_first": 1, "gate_rule": "or",
    "gate_mode": "ste", "change_surprise": "mse", "beta_mode": "learnable", "beta_init": 0.5, "beta_start": 0.5,
    "beta_end": 5.0, "o_ce_init": 1.025, "m_cu_init": 1.1, "learn_o_ce": True, "learn_m_cu": True, "ma_window": 100,
    "prior_factor": 0.0625, "routed_attention": "selected", "dense_first": 0, "dense_last": 0,
    "prior_loss_weight": 0.05, "router_loss_weight": 0.01, "inference_routing": "threshold", "student_input": "x",
    "mod_gate": "sigmoid", "student_norm": False, "mod_zloss_weight": 0.0001, "skip_map": "linear",
    "skip_map_rank": 0, "skip_map_fit_blocks": 0,
}  # fmt: skip
OLD_CHECKPOINT_OPTIM = {
    "lr": 0.002, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-08, "warmup_steps": 30, "min_lr_ratio": 0.1,
    "grad_clip": 1.0, "group_lr": {}, "router_warmup_steps": 0,
}  # fmt: skip


def test_every_field_belongs_to_exactly_one_section():
    sections = {section for sections in ARCH_SECTIONS.values() for section in sections}
    owners = [f.name for section in sections for f in dataclasses.fields(section)]
    assert sorted(owners) == sorted(f.name for f in dataclasses.fields(ModelConfig))
    assert len(owners) == len(set(owners))


def test_dense_has_no_routed_option_and_every_routed_model_has_the_routing_and_the_recipe():
    dense = set(model_options("dense"))
    for name in (f.name for f in dataclasses.fields(Routing) + dataclasses.fields(Recipe)):
        assert name not in dense
        assert all(name in model_options(arch) for arch in ROUTED_ARCHS)
    assert "mod_gate" in model_options("mod") and "mod_gate" not in model_options("sdt")
    assert "student_input" in model_options("stt") and "student_input" not in model_options("sdt")


def test_a_checkpoint_from_before_the_sections_loads_as_the_model_it_was():
    cfg = ModelConfig.from_saved(OLD_CHECKPOINT_MODEL)
    assert cfg.arch == "sdt" and cfg.capacity == 0.5 and cfg.always_execute_first == 1 and cfg.skip_map == "linear"
    removed = set(ModelConfig.REMOVED)  # the capacity schedule (its run ended at `capacity`), rank-0 skip maps
    kept = {k: v for k, v in OLD_CHECKPOINT_MODEL.items() if k not in removed}
    # every other key means what it meant; options added since take their defaults (which reproduce the old model)
    assert cfg.to_dict() == {**kept, "routed_sublayer": "block"}
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 64, (1, 12))
    assert model(ids).logits.shape == (1, 12, 64)
    # As Lightning rebuilds a module from a checkpoint (LitLM(**hyper_parameters)).
    lit = LitLM(model=OLD_CHECKPOINT_MODEL, optim=OLD_CHECKPOINT_OPTIM, distill=None)
    assert lit.model_config == cfg and lit.optim_config.lr == 0.002
    # A user's config may not ask for what was removed.
    with pytest.raises(UserError, match="model.capacity_start was removed"):
        ModelConfig.from_dict(OLD_CHECKPOINT_MODEL)


@pytest.mark.parametrize("arch", ARCHS)
def test_to_dict_is_flat_and_from_dict_rebuilds_the_same_config(arch):
    cfg = ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=4, n_heads=2, init_std=0.01)
    d = cfg.to_dict()
    assert all(not isinstance(v, dict) for v in d.values())
    assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert ModelConfig.from_dict(d) == cfg == ModelConfig.from_saved(d)


def test_a_run_config_may_not_set_an_option_its_model_does_not_have():
    assert foreign_options({"arch": "dense", "capacity": 0.25, "d_model": 64}) == {"capacity": 0.25}
    assert foreign_options({"arch": "dense", "inference_routing": "threshold"}) == {}  # dense's resolved default
    assert foreign_options({"arch": "sdt", "mod_gate": "ste"}) == {"mod_gate": "ste"}
    assert foreign_options({"arch": "mod", "mod_gate": "ste", "capacity": 0.25}) == {}
    assert foreign_options(ModelConfig(arch="dense").to_dict()) == {}  # every field at its default: nothing asked


def test_the_dense_twin_keeps_the_backbone_and_drops_the_routing():
    cfg = ModelConfig(arch="sdt", d_model=64, n_layers=6, n_heads=4, capacity=0.25, dense_first=2, skip_map="linear")
    dense = cfg.as_dense(n_layers=3)
    assert dense.arch == "dense" and dense.d_model == 64 and dense.n_layers == 3
    assert foreign_options(dense.to_dict()) == {}
