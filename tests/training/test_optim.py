import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import build_model
from sdt.training.optim import OptimConfig, clip_grad_norm_by_role, param_groups, warmup_cosine
from tests.conftest import tiny_model_config


def test_weight_decay_only_on_matrices_and_each_param_once():
    model = build_model(tiny_model_config(qkv_bias=True))
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] > 0) == (p.ndim >= 2)


def test_group_lr_applies_to_declared_roles():
    model = build_model(tiny_model_config())
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


def test_a_huge_auxiliary_gradient_does_not_shrink_the_backbone_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_model_config("sdt"))
    optimizer = torch.optim.AdamW(param_groups(model, OptimConfig()))
    ids = torch.randint(0, 64, (2, 16))
    out = model(ids, ids)
    out.loss.backward()
    backbone = model.embed_tokens.weight
    before = backbone.grad.clone()
    for p in model.layers[0].prior.parameters():  # an auxiliary loss a million times larger than the LM's
        p.grad = torch.full_like(p, 1e6)
    norms = clip_grad_norm_by_role(optimizer, max_norm=1e3)
    assert norms["prior"] > 1e6 and norms["base"] < 1e3
    torch.testing.assert_close(backbone.grad, before)  # a global clip would have scaled it by ~1e-6
    assert (
        torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.layers[0].prior.parameters()])) <= 1e3 + 1
    )


def test_the_prior_and_surprise_never_send_gradient_into_the_backbone():
    torch.manual_seed(0)
    model = build_model(tiny_model_config("sdt"))
    out = model(torch.randint(0, 64, (2, 16)))
    out.aux_losses["prior"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".prior." not in n)
