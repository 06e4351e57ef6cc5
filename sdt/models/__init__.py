"""Model assemblies over the routing layers: plain PyTorch, no Lightning or Hydra (see docs/architecture.md)."""

from sdt.blocks.kv_cache import KVCache, ModelCache
from sdt.errors import UserError
from sdt.models.config import ARCHS, ModelConfig
from sdt.models.mod import MoDLayer
from sdt.models.sdt import SDTPair
from sdt.models.stt import STTLayer
from sdt.models.transformer import DenseLayer, ForwardContext, LanguageModel, LayerOutput, ModelOutput, RoutedLayer


def layer_classes() -> tuple[type, ...]:
    """Every layer type a model stack can hold (FSDP wraps each one as a unit)."""
    return (DenseLayer, SDTPair, STTLayer, MoDLayer)


def build_layers(cfg: ModelConfig) -> list:
    """The stack for `cfg.arch`: `dense_first` plain blocks, the routed region, then `dense_last` plain blocks."""
    first = [DenseLayer(cfg) for _ in range(cfg.dense_first)]
    last = [DenseLayer(cfg) for _ in range(cfg.dense_last)]
    n = cfg.routed_layer_count
    if cfg.arch == "dense":
        middle = [DenseLayer(cfg) for _ in range(n)]
    elif cfg.arch == "sdt":
        middle = [SDTPair(cfg) for _ in range(n // 2)]  # each pair is two blocks
    elif cfg.arch == "stt":
        # Odd layers of the routed region are routed, even ones standard blocks.
        middle = [STTLayer(cfg) if j % 2 == 1 else DenseLayer(cfg) for j in range(n)]
    elif cfg.arch == "mod":
        middle = [MoDLayer(cfg) if j % 2 == 1 else DenseLayer(cfg) for j in range(n)]
    else:
        raise UserError(f"model.arch={cfg.arch!r} is not available yet")
    return first + middle + last


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the architecture named by `cfg.arch`."""
    model = LanguageModel(cfg, build_layers(cfg))
    model.aux_loss_weights = {
        "prior": cfg.prior_loss_weight,  # SDT prior / STT transition network
        "router": cfg.router_loss_weight,  # causal student routers
        "mod_router_bce": cfg.router_loss_weight,  # MoD: the router score itself learns Top-K membership
        "zloss": cfg.mod_zloss_weight,  # MoD: keeps router scores small
    }
    return model


__all__ = [
    "ARCHS",
    "DenseLayer",
    "ForwardContext",
    "KVCache",
    "LanguageModel",
    "LayerOutput",
    "MoDLayer",
    "ModelCache",
    "ModelConfig",
    "ModelOutput",
    "RoutedLayer",
    "SDTPair",
    "STTLayer",
    "build_layers",
    "build_model",
    "layer_classes",
]
