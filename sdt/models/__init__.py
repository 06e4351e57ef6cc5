"""Model code: plain PyTorch, no Lightning or Hydra."""

from sdt.errors import UserError
from sdt.models.config import ARCHS, ModelConfig
from sdt.models.kv_cache import KVCache, ModelCache
from sdt.models.transformer import DenseLayer, ForwardContext, LanguageModel, LayerOutput, ModelOutput


def layer_classes() -> tuple[type, ...]:
    """Every layer type a model stack can hold (FSDP wraps each one as a unit)."""
    from sdt.models.sdt import SDTPair

    return (DenseLayer, SDTPair)


def build_layers(cfg: ModelConfig) -> list:
    """The stack for `cfg.arch`: `dense_first` plain blocks, the routed region, then `dense_last` plain blocks."""
    from sdt.models.sdt import SDTPair

    first = [DenseLayer(cfg) for _ in range(cfg.dense_first)]
    last = [DenseLayer(cfg) for _ in range(cfg.dense_last)]
    n = cfg.routed_layer_count
    if cfg.arch == "dense":
        middle = [DenseLayer(cfg) for _ in range(n)]
    elif cfg.arch == "sdt":
        middle = [SDTPair(cfg) for _ in range(n // 2)]  # each pair is two blocks
    else:
        raise UserError(f"model.arch={cfg.arch!r} is not available yet")
    return first + middle + last


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the architecture named by `cfg.arch`."""
    model = LanguageModel(cfg, build_layers(cfg))
    model.aux_loss_weights = {"prior": cfg.prior_loss_weight, "router": cfg.router_loss_weight}
    return model


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
    "build_layers",
    "build_model",
    "layer_classes",
]
