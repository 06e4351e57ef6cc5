"""Tiny models shared by the model tests: one set of dimensions for every architecture, built with a fixed seed,
optionally with spread-out router weights and thresholds calibrated on random text."""

from __future__ import annotations

import torch
from torch import Tensor

from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds
from tests.conftest import tiny_model_config

VOCAB = 61


def tiny_config(arch: str, **overrides) -> ModelConfig:
    """The tests' tiny model (tests/conftest.py) of `arch` with 4 layers, so SDT has two pairs and STT/MoD two routed
    layers, and 128 positions for generation; `overrides` replace any field."""
    return tiny_model_config(**{"arch": arch, "vocab_size": VOCAB, "n_layers": 4, "max_seq_len": 128, **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides) -> LanguageModel:
    """A freshly initialised tiny model in eval mode, the same weights for the same seed and config."""
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides)).eval()


def random_ids(*shape: int, seed: int = 1, vocab: int = VOCAB) -> Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def spread_routers(model: LanguageModel, router_std: float = 1.0, transition_std: float = 0.1) -> LanguageModel:
    """Give untrained routers well-separated scores, so calibrated thresholds are not decided by ties: the students'
    and MoD routers' output weights ~ N(0, router_std), STT transition networks' output ~ N(0, transition_std)."""
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.student.fc2.weight.normal_(0, router_std)
            if hasattr(layer, "router"):
                layer.router.proj.weight.normal_(0, router_std)
            if hasattr(layer, "transition"):
                layer.transition.down_proj.weight.normal_(0, transition_std)
    return model


def calibrate_on_random_text(
    model: LanguageModel, n_batches: int = 3, shape: tuple[int, int] = (4, 24), seed: int = 0
) -> LanguageModel:
    """Calibrate every threshold of `model` to its capacity on `n_batches` random batches (seeds seed, seed + 1...)."""
    vocab = model.config.vocab_size
    calibrate_thresholds(model, [random_ids(*shape, seed=seed + i, vocab=vocab) for i in range(n_batches)])
    return model.eval()


def dense_twin(model):
    """A dense model holding the routed model's backbone (every block a plain block)."""
    dense = build_model(ModelConfig(**{**model.config.to_dict(), "arch": "dense"})).eval()
    blocks = []
    for layer in model.layers:
        blocks += [layer.decision, layer.dynamic] if hasattr(layer, "decision") else [layer.block]
    for target, block in zip(dense.layers, blocks, strict=True):
        target.block.load_state_dict(block.state_dict())
    for name in ("embed_tokens", "norm", "lm_head"):
        getattr(dense, name).load_state_dict(getattr(model, name).state_dict())
    return dense
