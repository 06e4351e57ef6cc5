"""Distillation: the KL term, the teachers, and its place in training and compute accounting."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdt.common.errors import UserError
from sdt.models import ModelConfig, build_model
from sdt.models.compute import compute_report
from sdt.training.distill import DistillConfig, distillation_loss, load_teacher, teacher_logits
from tests.conftest import tiny_model_config


def test_kl_is_zero_for_identical_logits_and_matches_a_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert float(distillation_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    temp = 2.0
    p = F.softmax(t / temp, dim=-1)
    hand = (p * (p.log() - F.log_softmax(s / temp, dim=-1))).sum(-1).mean() * temp**2
    assert float(distillation_loss(s, t, temp)) == pytest.approx(float(hand), rel=1e-5)


def test_kl_ignores_unscored_positions_and_padded_vocabulary():
    torch.manual_seed(1)
    s, t = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    targets = torch.tensor([[1, -100, 2, -100]])
    expected = distillation_loss(s[:, [0, 2]], t[:, [0, 2]], 1.0)
    assert float(distillation_loss(s, t, 1.0, targets)) == pytest.approx(float(expected), rel=1e-6)
    # A student whose embedding table is padded to more entries compares on the shared ones only.
    padded = torch.cat([s, torch.full((1, 4, 2), 30.0)], dim=-1)
    assert float(distillation_loss(padded, t, 1.0)) == pytest.approx(float(distillation_loss(s, t, 1.0)), rel=1e-6)


def test_self_teacher_is_the_students_dense_function_without_gradients():
    torch.manual_seed(0)
    cfg = tiny_model_config("sdt")
    model = build_model(cfg)
    ids = torch.randint(0, 64, (2, 16))
    logits = teacher_logits(None, model, ids)
    assert not logits.requires_grad
    assert torch.equal(logits, model(ids, routing="full").logits.detach())


def test_a_checkpoint_teacher_is_frozen(trained_run):
    teacher = load_teacher(str(trained_run / "checkpoints" / "last.ckpt"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("d,match", [({"weight": -1.0}, "distill.weight"), ({"temperature": 0}, "distill.temperature"),
                                     ({"alpha": 1}, "unknown distill option")])  # fmt: skip
def test_bad_distill_options_name_their_key(d, match):
    with pytest.raises(UserError, match=match):
        DistillConfig.from_dict(d)


def test_the_teacher_pass_counts_once_in_training_flops():
    cfg = ModelConfig(arch="sdt", vocab_size=4096, d_model=128, n_layers=4, n_heads=4, capacity=0.5)
    plain = compute_report(cfg, 256)
    distilled = compute_report(cfg, 256, teacher=cfg)
    dense_forward = compute_report(ModelConfig(arch="dense", vocab_size=4096, d_model=128, n_layers=4, n_heads=4), 256)
    extra = (distilled["train_flops_ratio_vs_dense"] - plain["train_flops_ratio_vs_dense"]) * 3
    # One dense forward = a third of a dense training step.
    assert math.isclose(extra, dense_forward["flops_ratio_vs_dense"], rel_tol=1e-9)
    assert distilled["flops_ratio_vs_dense"] == plain["flops_ratio_vs_dense"]  # inference is unchanged
