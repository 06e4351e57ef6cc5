import pytest

from sdt.errors import UserError
from sdt.models import ModelConfig, build_model
from sdt.optim import OptimConfig, param_groups, warmup_cosine


def test_weight_decay_only_on_matrices_and_each_param_once():
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, qkv_bias=True))
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] > 0) == (p.ndim >= 2)


def test_group_lr_applies_to_declared_roles():
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2))
    model.layers[0].param_role = "router"  # a module declaring a role makes its parameters that role
    groups = param_groups(model, OptimConfig(lr=1e-3, group_lr={"router": 5e-2}))
    router = [g for g in groups if g["name"].startswith("router")]
    assert router and all(g["lr"] == 5e-2 for g in router)
    assert all(g["lr"] == 1e-3 for g in groups if not g["name"].startswith("router"))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine(55, 10, 100, 0.1)
    assert 0.1 < mid < 1.0


def test_bad_optim_values():
    with pytest.raises(UserError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(UserError, match="unknown optim option"):
        OptimConfig.from_dict({"learning_rate": 1.0})
