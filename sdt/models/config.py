"""Model configuration: what `sdt` builds, in sections that an architecture has or has not.

`ModelConfig` is the one object a run builds from `model.*` and hands to the model; it is plain data (a flat dict in
checkpoints and exports, `from_dict(to_dict())` is the same config), validated on construction with messages that
name the config key (`model.<field>`). Its fields come in sections, each a small dataclass with its own checks:

| section | architectures | what it holds |
| --- | --- | --- |
| `Backbone` | all | the Llama/Qwen2 decoder's dimensions |
| `Source` | all | a pretrained checkpoint to start from, and which of its layers to keep |
| `Execution` | all | how the model runs (compile, activation checkpointing), not what it computes |
| `Routing` | sdt, stt, mod | capacity, routed attention, the causal mode and its students, skip maps |
| `Recipe` | sdt, stt, mod | the conversion recipe's options (conf/model/recipe/convert.yaml), off from scratch |
| `Surprise` | sdt, stt | the surprise gate and its prior / transition network |
| `STTOptions` | stt | the causal student's input |
| `MoDOptions` | mod | MoD's gate and router z-loss |

`model_options(arch)` are the keys of an architecture (what conf/model/<arch>.yaml composes to); a run config that
sets an option its architecture does not have is refused (`foreign_options`): a dense model has no capacity.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from sdt.common.config_checks import Removed, check_literal_fields, from_mapping
from sdt.common.errors import UserError
from sdt.routing.gates import GateMode
from sdt.routing.selection import ROUTING_MODES, CausalMode
from sdt.routing.surprise import BetaMode, ChangeSurprise, GateRule

Arch = Literal["dense", "sdt", "stt", "mod"]
RoutedAttention = Literal["selected", "full"]  # routed queries attend to the selected tokens only, or to all earlier
ModGate = Literal["sigmoid", "raw", "ste"]
StudentInput = Literal["x", "x_prev"]  # the causal router reads x_t, or [x_t ; x_{t-1}]
SkipMapKind = Literal["none", "linear"]  # what a token that skips a routed block gets: nothing, or a linear estimate
# What a routed layer routes: its whole block, only the attention sub-layer (the MLP runs on every token) or only the
# MLP sub-layer (attention runs on every token and writes every token's K/V).
RoutedSublayer = Literal["block", "attention", "mlp"]

ARCHS: tuple[Arch, ...] = get_args(Arch)
ROUTED_ARCHS = ("sdt", "stt", "mod")
# "full" runs every backbone block on every token with no gate: the routed model's dense function (the
# self-distillation teacher, and an upper bound at evaluation). Not a routing of the model's own.
FORWARD_ROUTING_MODES = (*ROUTING_MODES, "full")
LayerKind = Literal["block", "decision", "dynamic", "stt", "mod"]

_SCHEDULE_REMOVED = (
    "the capacity schedule (routed layers starting at a higher capacity and stepping down to model.capacity) "
    "measured 2.2% worse for SDT and 1.6% for STT than model.capacity from the first step, once skip maps are fitted "
    "(docs/pretrained.md, 'One option at a time')"
)
_LOW_RANK_REMOVED = (
    "low-rank skip maps measured worse than the full D x D map: a rank-128 map gave converted SmolLM2 (SDT, capacity "
    "0.5) a step-0 validation perplexity of 103.9 against 83.5 for full rank, for 0.009 of dense's FLOPs "
    "(docs/pretrained.md); skip maps are full rank"
)
# Removed options whose effect ended with training: a checkpoint or export that set them describes a model that runs
# at `capacity` (the schedule reached it before `capacity_warmup` < 1 of training), so it loads whatever they say.
TRAINING_ONLY_REMOVED = ("capacity_start", "capacity_warmup", "capacity_schedule", "capacity_levels")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass
class Architecture:
    arch: Arch = "dense"


@dataclass
class Backbone:
    """The Llama / Qwen2 decoder every model is built on."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    head_dim: int | None = None  # None means d_model // n_heads
    intermediate_size: int | None = None  # SwiGLU hidden size; None means ~8/3 * d_model rounded up to 64
    max_seq_len: int = 1024  # longest sequence (prompt + generation) the RoPE tables cover
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 uses a bias on q, k, v projections
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def check_backbone(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"model.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            _check(
                self.d_model % self.n_heads == 0,
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}",
            )
            self.head_dim = self.d_model // self.n_heads
        _check(self.head_dim % 2 == 0, f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}",
        )
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.d_model / 3 / 64)
        _check(self.intermediate_size >= 1, f"model.intermediate_size must be positive, got {self.intermediate_size}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.rope_theta > 0, f"model.rope_theta must be positive, got {self.rope_theta}")
        _check(self.rms_norm_eps > 0, f"model.rms_norm_eps must be positive, got {self.rms_norm_eps}")


@dataclass
class Source:
    """Start from a pretrained checkpoint: a dense fine-tune, a static pruning and a conversion all do."""

    # A pretrained Llama/Qwen2 (local HF directory, .gguf file or hub id): its backbone dimensions, weights and
    # tokenizer replace the ones configured here (sdt.models.pretrained, docs/pretrained.md).
    init_from: str | None = None
    # Static layer pruning (with init_from): keep only these pretrained layers, in stack order; None keeps them all.
    # `sdt.models.pruning.layers_to_keep` picks them as ShortGPT does (docs/pretrained.md).
    init_layers: list[int] | None = None

    def check_source(self) -> None:
        _check(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
            f"model.init_from must be a path or hub id, or null; got {self.init_from!r}",
        )
        if self.init_layers is not None:
            layers = list(self.init_layers)
            _check(
                len(layers) >= 1
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                and all(a < b for a, b in itertools.pairwise(layers)),
                f"model.init_layers must be a non-empty, increasing list of layer indices, got {self.init_layers!r}",
            )
            _check(self.init_from is not None, "model.init_layers selects layers of model.init_from, which is null")
            self.init_layers = layers


@dataclass
class Execution:
    """How the model runs, not what it computes."""

    # torch.compile the model for training and evaluation (~20 s on CPU first).
    compile: bool = False
    # Re-run each layer of the stack in the backward pass instead of keeping its activations
    # (sdt.training.activation_checkpointing): activation memory of one layer instead of all, about a third more
    # compute.
    activation_checkpointing: bool = False


@dataclass
class Routing:
    """What every routed model (SDT, STT, MoD) has: docs/models.md."""

    capacity: float = 0.5  # gamma: share of tokens a routed block runs on; k = max(1, floor(gamma * T))
    # selected: routed tokens attend to the selected tokens only | full: to every earlier token
    routed_attention: RoutedAttention = "selected"
    # block: unselected tokens skip the routed block | attention: only its attention (no K/V written; every token runs
    # the MLP) | mlp: only its MLP (every token runs attention, so routed_attention has no effect). docs/models.md.
    routed_sublayer: RoutedSublayer = "block"
    # Causal mode used for validation, the evaluation headline and generation: threshold | student | budget (the
    # architecture's own score against a threshold that holds each sequence's executed share at the capacity).
    # None picks the architecture's own: threshold for SDT (its gate is causal), student for STT and MoD.
    inference_routing: CausalMode | None = None
    router_loss_weight: float = 0.01  # causal student router BCE
    # Skip maps (sdt.routing.skip_maps): a token that skips a routed block gets x + W norm(x) + b, a linear estimate
    # of the block's update, instead of x (W: D x D).
    skip_map: SkipMapKind = "none"

    def check_routing(self) -> None:
        _check(
            isinstance(self.capacity, (int, float)) and not isinstance(self.capacity, bool) and 0 < self.capacity <= 1,
            f"model.capacity must be a number in (0, 1], got {self.capacity!r}",
        )


@dataclass
class Recipe:
    """The conversion recipe's options (docs/pretrained.md; conf/model/recipe/convert.yaml): off from scratch."""

    dense_first: int = 0  # layers kept dense at the bottom of the stack
    dense_last: int = 0  # layers kept dense at the top of the stack
    # Leading positions that every routed layer executes in every mode (counted inside k): position 0 is the
    # attention sink of pretrained models, whose removal from routed layers' context hurts most.
    always_execute_first: int = 0
    # Causal student routers read an RMS-normalised input (no weight): pretrained residual streams have large,
    # layer-dependent norms and outlier dimensions that a freshly initialised MLP learns poorly from.
    student_norm: bool = False
    # Before training, fit each skip map to its pretrained block's updates on this many training blocks (ridge least
    # squares on the dense pass, sdt.models.skip_map_fit); 0 keeps the zero start.
    skip_map_fit_blocks: int = 0

    def check_recipe(self) -> None:
        _check(
            isinstance(self.always_execute_first, int) and self.always_execute_first >= 0,
            f"model.always_execute_first must be a non-negative integer, got {self.always_execute_first!r}",
        )
        for name in ("dense_first", "dense_last"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, f"model.{name} must be a non-negative integer, got {value}")
        _check(
            self.n_layers - self.dense_first - self.dense_last >= 0,
            f"model.dense_first + model.dense_last exceeds model.n_layers={self.n_layers}",
        )
        _check(
            isinstance(self.skip_map_fit_blocks, int) and self.skip_map_fit_blocks >= 0,
            f"model.skip_map_fit_blocks must be a non-negative integer, got {self.skip_map_fit_blocks!r}",
        )
        _check(
            self.skip_map_fit_blocks == 0 or self.skip_map == "linear",
            "model.skip_map_fit_blocks fits skip maps: it needs model.skip_map=linear",
        )


@dataclass
class Surprise:
    """SDT's and STT's surprise gate (docs/algorithms.md, section 2) and its prior / transition network."""

    gate_rule: GateRule = "or"  # how S_CE and S_CU combine into g: or | ce | cu
    gate_mode: GateMode = "ste"  # ste: forward = full block, gradient through g | soft: output scaled by g
    change_surprise: ChangeSurprise = "mse"  # D_ch form: mse | kl (the prior also predicts a log-variance)
    beta_mode: BetaMode = "learnable"  # learnable | linear | cosine (scheduled from beta_start to beta_end)
    beta_init: float = 0.5
    beta_start: float = 0.5
    beta_end: float = 5.0
    o_ce_init: float = 1.025
    m_cu_init: float = 1.1
    learn_o_ce: bool = True
    learn_m_cu: bool = True
    ma_window: int = 100  # trailing window of the moving average in CU
    prior_factor: float = 0.0625  # prior / transition MLP hidden size = max(2, even(ceil(f * d_model)))
    prior_loss_weight: float = 0.05  # prior (SDT) / transition (STT) loss

    def check_surprise(self) -> None:
        _check(self.ma_window >= 1, f"model.ma_window must be >= 1, got {self.ma_window}")
        _check(self.prior_factor > 0, f"model.prior_factor must be positive, got {self.prior_factor}")
        _check(self.o_ce_init > 0 and self.m_cu_init > 0, "model.o_ce_init and model.m_cu_init must be positive")
        _check(self.beta_init > 0, f"model.beta_init must be positive, got {self.beta_init}")


@dataclass
class STTOptions:
    student_input: StudentInput = "x"  # causal student input: x | x_prev ([x_t ; x_{t-1}])


@dataclass
class MoDOptions:
    # Scale the block update by sigmoid(r), by the raw score r, or ste: forward value exactly 1 with the gradient of
    # sigmoid(r) (straight-through), so MoD at capacity 1.0 computes the pretrained model exactly.
    mod_gate: ModGate = "sigmoid"
    mod_zloss_weight: float = 1e-4


# The sections each architecture has, in the order their options are documented.
ARCH_SECTIONS: dict[Arch, tuple[type, ...]] = {
    "dense": (Architecture, Backbone, Source, Execution),
    "sdt": (Architecture, Backbone, Source, Execution, Routing, Recipe, Surprise),
    "stt": (Architecture, Backbone, Source, Execution, Routing, Recipe, Surprise, STTOptions),
    "mod": (Architecture, Backbone, Source, Execution, Routing, Recipe, MoDOptions),
}


def default_inference_routing(arch: Arch) -> CausalMode:
    """The causal mode an architecture infers with unless told: SDT's gate is causal, STT and MoD have students."""
    return "threshold" if arch in ("dense", "sdt") else "student"


def _default(field: dataclasses.Field, arch: Arch) -> Any:
    return default_inference_routing(arch) if field.name == "inference_routing" else field.default


def model_options(arch: Arch) -> tuple[str, ...]:
    """The config keys of architecture `arch` (`model.<key>`): the fields of its sections."""
    return tuple(f.name for section in ARCH_SECTIONS[arch] for f in dataclasses.fields(section))


def foreign_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The options a model config (`model.*`) sets, away from their defaults, that its architecture does not have:
    `model=dense ++model.capacity=0.25` asks for something a dense model cannot do. A run config refuses them
    (sdt.cli.validation); a `ModelConfig` carries them unused, so that one dict of options builds every architecture."""
    arch = model.get("arch", Architecture.arch)
    if arch not in ARCHS:
        return {}
    own = set(model_options(arch))
    defaults = {f.name: _default(f, arch) for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in model.items() if k in defaults and k not in own and v != defaults[k]}


def archs_with(option: str) -> tuple[Arch, ...]:
    """The architectures that have config key `model.<option>`."""
    return tuple(arch for arch in ARCHS if option in model_options(arch))


@dataclass
class ModelConfig(MoDOptions, STTOptions, Surprise, Recipe, Routing, Execution, Source, Backbone, Architecture):
    """Every model `sdt` builds: the union of the sections (the module docstring), read flat (`cfg.capacity`)."""

    REMOVED: ClassVar[dict[str, Removed]] = {
        "capacity_start": Removed(None, _SCHEDULE_REMOVED),
        "capacity_warmup": Removed(0.5, _SCHEDULE_REMOVED),
        "capacity_schedule": Removed("linear", _SCHEDULE_REMOVED),
        "capacity_levels": Removed(4, _SCHEDULE_REMOVED),
        "skip_map_rank": Removed(0, _LOW_RANK_REMOVED),
    }

    def __post_init__(self) -> None:
        check_literal_fields(self, "model")
        self.check_backbone()
        self.check_source()
        if self.inference_routing is None:
            self.inference_routing = default_inference_routing(self.arch)
        self.check_routing()
        self.check_recipe()
        self.check_surprise()
        self.check_layout()

    def check_layout(self) -> None:
        routed = self.routed_layer_count
        if self.arch in ("stt", "mod"):
            _check(
                routed >= 2,
                f"model={self.arch} routes every other layer: model.n_layers - dense_first - dense_last must be >= 2, "
                f"got {routed}",
            )
        if self.arch == "stt":
            _check(
                self.inference_routing in ("student", "budget"),
                "model=stt infers with model.inference_routing=student or budget (threshold needs the teacher's "
                "dense pass)",
            )
        if self.arch == "sdt":
            _check(
                routed >= 2 and routed % 2 == 0,
                f"model=sdt pairs a decision layer with a dynamic layer: model.n_layers - dense_first - dense_last "
                f"must be even and >= 2, got {routed}",
            )

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss a routed layer reports, by the name it reports it under."""
        return {
            "prior": self.prior_loss_weight,  # SDT prior / STT transition network
            "router": self.router_loss_weight,  # causal student routers
            "mod_router_bce": self.router_loss_weight,  # MoD: the router score itself learns Top-K membership
            "zloss": self.mod_zloss_weight,  # MoD: keeps router scores small
        }

    @property
    def routed_kv_every_token(self) -> bool:
        """Whether a routed layer stores every token's K/V: its routed queries read every earlier token
        (routed_attention="full"), or attention is not what it routes (routed_sublayer="mlp")."""
        return self.routed_attention == "full" or self.routed_sublayer == "mlp"

    @property
    def routed_layer_count(self) -> int:
        return self.n_layers - self.dense_first - self.dense_last

    @property
    def prior_hidden_size(self) -> int:
        """max(2, even(ceil(f * D))): the prior / transition network's SwiGLU width."""
        h = math.ceil(self.prior_factor * self.d_model)
        return max(2, h + (h % 2))

    def as_dense(self, **changes: Any) -> ModelConfig:
        """The dense model of this backbone (the reference of compute ratios, a dense teacher): every option that
        dense has not at its default, then `changes`."""
        dense = set(model_options("dense"))
        routed = {f.name: _default(f, "dense") for f in dataclasses.fields(self) if f.name not in dense}
        return dataclasses.replace(self, **{**routed, "arch": "dense", **changes})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain dict (a Hydra node), rejecting unknown keys with a clear message."""
        return from_mapping(cls, d, "model")

    @classmethod
    def from_saved(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The config a checkpoint (`hyper_parameters["model"]`) or an export (`config.json`, key `sdt`) stores, also
        one written before an option was removed: options whose effect ended with training are dropped."""
        return from_mapping(cls, {k: v for k, v in d.items() if k not in TRAINING_ONLY_REMOVED}, "model")

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat (`from_dict(to_dict())` is the same config): what checkpoints and exports store."""
        return dataclasses.asdict(self)


def layer_kinds(cfg: ModelConfig) -> list[LayerKind]:
    """What each layer of the stack is: the one layout rule, used to build models and to count their compute.

    "block": a plain block on every token (dense models, `dense_first` / `dense_last`, the unrouted layers of STT and
    MoD); "decision" then "dynamic": the two blocks of an SDT pair; "stt" / "mod": a routed layer. The routed region is
    layers dense_first .. n_layers - dense_last - 1; j is the index inside it. STT and MoD route its odd layers.
    """
    kinds: list[LayerKind] = []
    for i in range(cfg.n_layers):
        j = i - cfg.dense_first
        if cfg.arch == "dense" or not 0 <= j < cfg.routed_layer_count:
            kinds.append("block")
        elif cfg.arch == "sdt":
            kinds.append("decision" if j % 2 == 0 else "dynamic")
        else:
            kinds.append(cfg.arch if j % 2 == 1 else "block")
    return kinds
