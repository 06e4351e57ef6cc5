"""Model code: plain PyTorch, no Lightning or Hydra."""

from sdt.models.config import ARCHS, ModelConfig
from sdt.models.kv_cache import KVCache, ModelCache
from sdt.models.transformer import DenseLayer, ForwardContext, LanguageModel, LayerOutput, ModelOutput


def layer_classes() -> tuple[type, ...]:
    """Every layer type a model stack can hold (FSDP wraps each one as a unit)."""
    return (DenseLayer,)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the architecture named by `cfg.arch`."""
    if cfg.arch == "dense":
        return LanguageModel(cfg)
    raise AssertionError(f"unhandled arch {cfg.arch!r}")  # ModelConfig validation rejects unknown names first


__all__ = [
    "ARCHS",
    "DenseLayer",
    "ForwardContext",
    "KVCache",
    "LanguageModel",
    "LayerOutput",
    "ModelCache",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "layer_classes",
]
