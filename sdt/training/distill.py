"""Distillation from a teacher's logits: the KL term that keeps a converted routed model close to a dense one.

The teacher is either the model's own dense function (`teacher: self`: every block on every token, no gates, no
gradients; `routing="full"`), or a frozen model loaded from an `sdt` checkpoint or any `model.init_from` source
(e.g. the pretrained model the run started from). The loss is the mean over predicted tokens of
temperature^2 * KL(p_teacher || p_student) on temperature-softened distributions (Hinton et al.), so its gradient
scale does not depend on the temperature. It is logged as `train/aux/distill`, apart from the LM loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdt.common.config_checks import from_mapping
from sdt.common.errors import UserError
from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.pretrained import Pretrained
from sdt.training.checkpoint import load_checkpoint, model_state_dict


@dataclass
class DistillConfig:
    weight: float = 0.0  # 0 disables distillation
    temperature: float = 1.0
    teacher: str = "self"  # self | path to an sdt .ckpt | a model.init_from source (HF dir, .gguf, hub id)

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise UserError(f"distill.weight must be a number >= 0, got {self.weight!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise UserError(f"distill.temperature must be positive, got {self.temperature!r}")
        if not isinstance(self.teacher, str) or not self.teacher:
            raise UserError(
                f"distill.teacher must be 'self', a checkpoint path or a pretrained source, got {self.teacher!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DistillConfig:
        return from_mapping(cls, d, "distill")


def distillation_loss(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, temperature: float, targets_BT: Tensor | None = None
) -> Tensor:
    """temperature^2 * KL(teacher || student), averaged over the positions with a target (targets != -100).

    Only the vocabulary both models share is compared (embedding tables may be padded to different sizes).
    """
    v = min(student_logits_BTV.shape[-1], teacher_logits_BTV.shape[-1])
    s = F.log_softmax(student_logits_BTV[..., :v].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits_BTV[..., :v].float() / temperature, dim=-1)
    kl_BT = (t.exp() * (t - s)).sum(dim=-1)
    if targets_BT is None:
        return kl_BT.mean() * temperature**2
    w = (targets_BT != -100).float()
    return (kl_BT * w).sum() / w.sum().clamp(min=1.0) * temperature**2


def load_teacher(source: str) -> LanguageModel:
    """A frozen teacher from an sdt checkpoint (`.ckpt`) or a pretrained source, in eval mode, without gradients."""
    if source.endswith(".ckpt"):
        ckpt = load_checkpoint(source)
        model = build_model(ModelConfig.from_saved(ckpt["hyper_parameters"]["model"]))
        missing, unexpected = model.load_state_dict(model_state_dict(ckpt), strict=False)
        missing = [
            k
            for k in missing
            if not (model.config.tie_embeddings and k == "lm_head.weight") and not k.endswith(".quantiles")
        ]
        if missing or unexpected:
            raise UserError(f"distill.teacher={source}: weights do not match its model ({missing}, {unexpected})")
    else:
        pretrained = Pretrained(source)
        model = build_model(ModelConfig.from_saved(pretrained.own_model_dict()))
        pretrained.load_into(model)
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def teacher_logits(teacher: LanguageModel | None, student: LanguageModel, input_ids: Tensor) -> Tensor:
    """The teacher's logits for `input_ids`: a separate model (a routed one in its causal inference mode), or
    (None) the student's own dense function."""
    if teacher is None:
        return student(input_ids, routing="full", diagnostics=False).logits
    routing = teacher.config.inference_routing if teacher.is_routed else None
    return teacher(input_ids, routing=routing, diagnostics=False).logits
