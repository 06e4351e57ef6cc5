"""Causal student routers: BCE against the Top-K mask, accuracy/precision/recall, detached inputs."""

import pytest
import torch
import torch.nn.functional as F

from sdt.models import build_model
from sdt.routing import CausalRouter, classification_stats, router_bce
from tests.conftest import tiny_model_config


def test_router_shape_is_d_to_half_d_to_one():
    router = CausalRouter(32, 16)
    assert (router.fc1.in_features, router.fc1.out_features, router.fc2.out_features) == (32, 16, 1)
    assert router(torch.randn(2, 5, 32)).shape == (2, 5)


def test_router_bce_equals_torch_bce():
    torch.manual_seed(0)
    logits = torch.randn(3, 7) * 3
    target = torch.rand(3, 7) > 0.5
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target.float())
    torch.testing.assert_close(router_bce(logits, target), expected)
    valid = torch.rand(3, 7) > 0.3
    logits_junk = logits.masked_fill(~valid, 1e4)  # invalid slots with absurd logits must not count
    expected = F.binary_cross_entropy(torch.sigmoid(logits[valid]), target[valid].float())
    torch.testing.assert_close(router_bce(logits_junk, target, valid), expected)


def test_classification_stats_by_hand():
    pred = torch.tensor([[True, True, False, False, True]])
    target = torch.tensor([[True, False, True, False, True]])
    stats = classification_stats(pred, target)
    torch.testing.assert_close(stats["accuracy"], torch.tensor(3 / 5))
    torch.testing.assert_close(stats["precision"], torch.tensor(2 / 3))  # 2 of 3 predicted are right
    torch.testing.assert_close(stats["recall"], torch.tensor(2 / 3))  # 2 of 3 targets found
    stats = classification_stats(torch.zeros(1, 4, dtype=torch.bool), torch.tensor([[True, False, False, False]]))
    assert stats["precision"] == 0 and stats["recall"] == 0 and stats["accuracy"] == 0.75  # no NaN without positives


def test_router_input_is_detached():
    router = CausalRouter(8, 4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    router(x).sum().backward()
    assert x.grad is None
    assert router.fc1.weight.grad.abs().sum() > 0


def sdt_model(**kw):
    """Two decision/dynamic pairs (4 layers): the router loss is an average over more than one routed layer."""
    torch.manual_seed(0)
    return build_model(tiny_model_config(**{"arch": "sdt", "vocab_size": 97, "n_layers": 4, "init_std": 0.2, **kw}))


def test_router_loss_reaches_only_the_students():
    model = sdt_model()
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, routing="topk")
    out.aux_losses["router"].backward()
    for name, p in model.named_parameters():
        if ".student." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name  # no gradient into the backbone or the gate


@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_student_target_is_the_topk_mask(capacity):
    """The router loss and the student's accuracy are measured against the Top-K mask of the same forward pass."""
    model = sdt_model(capacity=capacity).eval()
    out = model(torch.randint(0, 97, (3, 16)), routing="topk")
    losses = []
    for i, layer in model.routed_layers():
        prob, topk = out.scores[i]["student"], out.decisions[i]
        assert topk.sum(dim=1).tolist() == [int(capacity * 16)] * 3
        losses.append(F.binary_cross_entropy(prob, topk.float()))
        accuracy = ((prob >= layer.student.threshold) == topk).float().mean()
        torch.testing.assert_close(out.stats[f"layers.{i}.student_accuracy"], accuracy)
    torch.testing.assert_close(out.aux_losses["router"], torch.stack(losses).mean())  # averaged over routed layers
