"""Model assemblies over the routing layers: plain PyTorch, no Lightning or Hydra (see docs/architecture.md)."""

from sdt.blocks.kv_cache import KVCache, ModelCache
from sdt.models.config import ARCHS, ModelConfig, layer_kinds
from sdt.models.layer_io import ForwardContext, LayerOutput
from sdt.models.mod import MoDLayer
from sdt.models.routed_layer import Route, RoutedLayer
from sdt.models.sdt import SDTPair
from sdt.models.stt import STTLayer
from sdt.models.transformer import DenseLayer, LanguageModel, ModelOutput


def layer_classes() -> tuple[type, ...]:
    """Every layer type a model stack can hold (each is one unit for FSDP and activation checkpointing)."""
    return (DenseLayer, SDTPair, STTLayer, MoDLayer)


def build_layers(cfg: ModelConfig) -> list:
    """The stack `layer_kinds(cfg)` describes: a DenseLayer per plain block, an SDTPair per decision/dynamic pair,
    an STTLayer or MoDLayer per routed layer."""
    routed = {"stt": STTLayer, "mod": MoDLayer}
    layers: list = []
    for kind in layer_kinds(cfg):
        if kind == "block":
            layers.append(DenseLayer(cfg))
        elif kind == "decision":
            layers.append(SDTPair(cfg))  # its dynamic block is the next kind
        elif kind in routed:
            layers.append(routed[kind](cfg))
    return layers


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the architecture named by `cfg.arch`."""
    return LanguageModel(cfg, build_layers(cfg))


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
    "Route",
    "RoutedLayer",
    "SDTPair",
    "STTLayer",
    "build_layers",
    "build_model",
    "layer_classes",
    "layer_kinds",
]
