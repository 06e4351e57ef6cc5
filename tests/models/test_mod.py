"""MoD: Top-K keeps exactly k tokens, capacity 1.0 computes every token, causal modes are causal, router learns."""

from __future__ import annotations

import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import LanguageModel, ModelCache, ModelConfig
from sdt.routing.topk import capacity_k
from tests.models.conftest import calibrate_on_random_text, spread_routers, tiny_model


def mod(**kw) -> LanguageModel:
    """A tiny MoD whose router and student have some spread, calibrated on random text."""
    return calibrate_on_random_text(spread_routers(tiny_model("mod", **kw)))


@pytest.mark.parametrize("T, capacity", [(16, 0.125), (24, 0.25), (9, 0.5)])
def test_topk_keeps_exactly_k_tokens(T, capacity):
    out = mod(capacity=capacity)(torch.randint(0, 61, (3, T)), routing="topk")
    k = capacity_k(T, capacity)
    assert out.decisions and all(d.sum(1).tolist() == [k] * 3 for d in out.decisions.values())


def test_capacity_one_computes_every_token_scaled_by_the_router():
    model = mod(capacity=1.0)
    layer = model.layers[1]
    x = torch.randn(2, 10, 32)
    from sdt.models.transformer import ForwardContext

    ctx = ForwardContext(positions=torch.arange(10).expand(2, 10), rope=model.rope)
    out = layer(x, ctx)
    assert out.decisions.all()
    f = layer.block(x, ctx.positions, model.rope) - x
    expected = x + torch.sigmoid(layer.router(x)).unsqueeze(-1) * f
    torch.testing.assert_close(out.hidden, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sublayer", ["block", "attention", "mlp"])
@pytest.mark.parametrize("routing", ["threshold", "student", "budget"])
def test_causal_modes_are_causal_and_decode_like_the_full_forward(routing, sublayer):
    model = mod(routed_sublayer=sublayer)
    ids = torch.randint(0, 61, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 5) % 61
    a, b = model(ids, routing=routing), model(changed, routing=routing)
    torch.testing.assert_close(a.logits[:, :12], b.logits[:, :12])
    for i in a.decisions:  # the predictor's decisions for earlier tokens do not see the future
        assert torch.equal(a.decisions[i][:, :12], b.decisions[i][:, :12])
    cache = ModelCache()
    steps = [model(ids[:, :5], cache=cache, routing=routing).logits]
    for t in range(5, 20):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, routing=routing).logits)
    torch.testing.assert_close(torch.cat(steps, 1), a.logits, atol=1e-5, rtol=1e-4)
    for i in a.decisions:  # a routed attention stores the executed tokens' K/V only; a routed MLP stores all
        stored = int(cache.layers[(i, 0)].valid.sum())
        assert stored == (2 * 20 if sublayer == "mlp" else int(a.decisions[i].sum())) and 0 < a.decisions[i].sum() < 40


def test_router_gets_gradient_from_the_lm_loss_and_aux_losses_are_reported():
    model = mod().train()
    ids = torch.randint(0, 61, (2, 16))
    out = model(ids, ids)
    out.loss.backward()  # the LM loss alone
    assert model.layers[1].router.proj.weight.grad.abs().sum() > 0
    assert {"mod_router_bce", "zloss", "router"} <= set(out.aux_losses)


@pytest.mark.parametrize("capacity", [0.0, -0.1, 1.01, "half"])
def test_bad_capacity_is_a_clear_error(capacity):
    with pytest.raises(UserError, match="model.capacity"):
        ModelConfig(arch="mod", n_layers=4, capacity=capacity)
