"""Routed `sdt` models (SDT, STT, MoD) for Hugging Face `transformers`, as exported by `python -m sdt.export`.

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

Every routed export ships this file next to `config.json`, with `layers_sdt.py` (its cache and routed execution) and
the package's own files, byte for byte: `layers.py` and `kv_cache.py` from `sdt/blocks/` (the decoder block, RMSNorm,
RoPE, the KV cache) and the prior / transition network, surprise gate, causal students, MoD router, quantile grids,
Top-K packing and gates from `sdt/routing/`. They import only torch, transformers and each other, so an export loads where `sdt` is not installed
(see `sdt/transformers_code/__init__.py`), and it runs the modules `sdt` trains, not copies of them.

It reproduces the routed models' *causal* inference forward (the `threshold` and `student` routing modes), which is
what evaluation and generation use: per token, a routed block runs only where its causal score clears the calibrated
threshold, and a skipped token writes no K/V, so the KV cache of a routed layer holds only the tokens it executed.
Training-only paths (Top-K routing, auxiliary losses, statistics, STT's teacher pass) are not part of it: train with
`sdt`, and read an export back there with `model.init_from=<dir>`.

`config.routing` selects the causal mode (default: the model's `inference_routing`); pass
`routing="student"` to `from_pretrained` for the other one where the architecture has both.
Weight names are the export's: the backbone blocks under Hugging Face Llama names (`model.layers.<b>.*`, in stack
order; an SDT pair spans two), the routing modules under `sdt.layers.<i>.*` (i: the unit's index in the stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .layers import Block, RMSNorm, RotaryEmbedding
from .layers_sdt import Inputs, RoutedCache, execute_tokens
from .priors import PriorFFN
from .routers import LinearRouter
from .skip_maps import SkipMap
from .students import CausalRouter
from .surprise import SurpriseGate

CAUSAL_MODES = ("threshold", "student")
# Model options this code does not reproduce, with the value it assumes: an export that sets another value is refused
# rather than loaded as a different model.
ASSUMED_OPTIONS = {"always_execute_first": 0, "routed_sublayer": "block"}
MOD_GATES = ("sigmoid", "raw")


class SDTConfig(PretrainedConfig):
    """The Llama-style backbone keys of config.json, and the full `sdt` model config under `sdt`."""

    model_type = "sdt"

    def __init__(self, sdt: dict[str, Any] | None = None, routing: str | None = None, **kwargs: Any) -> None:
        self.sdt = dict(sdt or {})
        self.routing = routing or self.sdt.get("inference_routing") or "threshold"
        super().__init__(**kwargs)


# --- the units of the stack


class SDTRouting(nn.Module):
    """An SDT pair's routing modules: the decision block's prior, the surprise gate, the causal student."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        norm = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.prior = PriorFFN(c["d_model"], prior_hidden(c), norm, c["change_surprise"] == "kl")
        self.surprise = SurpriseGate(attributes(c))
        self.student = CausalRouter(c["d_model"], c["d_model"] // 2, normalize=c["student_norm"])
        self.skip_map = skip_map(c)

    def run(self, i: int, blocks: list[Block], x: Tensor, inp: Inputs, c: dict[str, Any]) -> tuple[Tensor, Tensor]:
        decision, dynamic = blocks
        post = decision(x, inp.positions, inp.rope, cache=inp.kv((i, 0)), pad_mask=inp.pad_mask)
        delta_hat, logvar = self.prior(x)
        history = None if inp.cache is None else inp.cache.state.get((i, "ma"))
        signals, history = self.surprise(post - x, delta_hat, logvar, valid_BT=inp.pad_mask, history=history)
        g = signals.g
        if inp.cache is not None:
            inp.cache.state[(i, "ma")] = history
        if inp.routing == "threshold":
            decide = g >= self.surprise.threshold
        else:
            decide = student_decides(self.student, post)
        return execute_tokens(
            dynamic, post, inp, decide, g, c["gate_mode"], inp.kv((i, 1)), full_context(c), self.skip_map
        )


class STTRouting(nn.Module):
    """An STT layer's routing modules; inference runs the student only (the transition network trains it)."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.use_prev = c["student_input"] == "x_prev"
        norm = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.transition = PriorFFN(c["d_model"], prior_hidden(c), norm, c["change_surprise"] == "kl")
        self.surprise = SurpriseGate(attributes(c))
        d_in = (2 if self.use_prev else 1) * c["d_model"]
        self.student = CausalRouter(d_in, c["d_model"] // 2, normalize=c["student_norm"])
        self.skip_map = skip_map(c)

    def run(self, i: int, blocks: list[Block], x: Tensor, inp: Inputs, c: dict[str, Any]) -> tuple[Tensor, Tensor]:
        (block,) = blocks
        student_in = x
        if self.use_prev:
            first = None if inp.cache is None else inp.cache.state.get((i, "x_prev"))
            x_in = x if inp.pad_mask is None else x * inp.pad_mask.unsqueeze(-1).to(x.dtype)
            first = torch.zeros_like(x_in[:, :1]) if first is None else first
            if inp.cache is not None:
                inp.cache.state[(i, "x_prev")] = x_in[:, -1:]
            student_in = torch.cat([x, torch.cat([first, x_in[:, :-1]], dim=1)], dim=-1)
        decide = student_decides(self.student, student_in)
        return execute_tokens(
            block, x, inp, decide, None, c["gate_mode"], inp.kv((i, 0)), full_context(c), self.skip_map
        )


class MoDRouting(nn.Module):
    """A MoD layer's router (its score both selects and scales the update) and causal student."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.raw_gate = c["mod_gate"] == "raw"
        self.router = LinearRouter(c["d_model"])
        self.student = CausalRouter(c["d_model"], c["d_model"] // 2, normalize=c["student_norm"])
        self.skip_map = skip_map(c)

    def run(self, i: int, blocks: list[Block], x: Tensor, inp: Inputs, c: dict[str, Any]) -> tuple[Tensor, Tensor]:
        (block,) = blocks
        r = self.router(x)
        gate = r if self.raw_gate else torch.sigmoid(r)
        if inp.routing == "threshold":
            decide = r >= self.router.threshold
        else:
            decide = student_decides(self.student, x)
        return execute_tokens(block, x, inp, decide, gate, "soft", inp.kv((i, 0)), full_context(c), self.skip_map)


ROUTING_UNITS = {"sdt": SDTRouting, "stt": STTRouting, "mod": MoDRouting}


def attributes(c: dict[str, Any]) -> SimpleNamespace:
    """The exported model config as the package's modules read a config (`cfg.d_model`): it has every field
    `Block` (BlockConfig) and `SurpriseGate` (SurpriseConfig) read."""
    return SimpleNamespace(**c)


def student_decides(student: CausalRouter, x: Tensor) -> Tensor:
    """(B, T) bool: where the causal student executes, sigmoid(logit) >= its calibrated threshold."""
    return torch.sigmoid(student(x)) >= student.threshold


def skip_map(c: dict[str, Any]) -> SkipMap | None:
    """The unit's skip map (a linear estimate of the routed block's update on skipped tokens), if it has one."""
    if c.get("skip_map", "none") == "none":
        return None
    return SkipMap(c["d_model"], c.get("skip_map_rank", 0), c["rms_norm_eps"])


def full_context(c: dict[str, Any]) -> bool:
    """Whether routed blocks attend to every earlier token (all tokens write K/V), not only executed ones."""
    return c["routed_attention"] == "full"


def prior_hidden(c: dict[str, Any]) -> int:
    h = math.ceil(float(c["prior_factor"]) * c["d_model"])
    return max(2, h + (h % 2))


def stack_layout(c: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """(kind, backbone block indices) per unit of the stack, as sdt's build_layers lays it out."""
    kinds = ["dense"] * c["dense_first"]
    n = c["n_layers"] - c["dense_first"] - c["dense_last"]
    if c["arch"] == "sdt":
        kinds += ["sdt"] * (n // 2)
    elif c["arch"] in ("stt", "mod"):
        kinds += [c["arch"] if j % 2 == 1 else "dense" for j in range(n)]
    else:
        kinds += ["dense"] * n
    kinds += ["dense"] * c["dense_last"]
    layout, b = [], 0
    for kind in kinds:
        width = 2 if kind == "sdt" else 1
        layout.append((kind, list(range(b, b + width))))
        b += width
    return layout


@dataclass
class SDTCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: RoutedCache | None = None
    decisions: dict[int, Tensor] | None = None  # unit index -> (B, T) bool: tokens its routed block executed


class Backbone(nn.Module):
    """The package's decoder blocks (`layers.py`) under Hugging Face Llama names, and the RoPE tables they share."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(Block(attributes(c)) for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.rope = rotary_embedding(c)  # not in the state dict: recomputed on loading (SDTForCausalLM._init_weights)


def rotary_embedding(c: dict[str, Any]) -> RotaryEmbedding:
    return RotaryEmbedding(c["head_dim"], c["max_seq_len"], float(c["rope_theta"]))


class RoutingModules(nn.Module):
    def __init__(self, c: dict[str, Any], layout: list[tuple[str, list[int]]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(
            {str(i): ROUTING_UNITS[kind](c) for i, (kind, _) in enumerate(layout) if kind != "dense"}
        )


class SDTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SDTConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (transformers reads it)

    def __init__(self, config: SDTConfig) -> None:
        super().__init__(config)
        c = config.sdt
        if config.routing not in CAUSAL_MODES:
            raise ValueError(f"routing={config.routing!r}: the export runs a causal mode, one of {CAUSAL_MODES}")
        if c["arch"] == "stt" and config.routing != "student":
            raise ValueError("an STT export infers with routing='student' (threshold needs the teacher pass)")
        for key, value in ASSUMED_OPTIONS.items():
            if c.get(key, value) != value:
                raise ValueError(f"{key}={c[key]!r} is not reproduced by this modeling code (it assumes {value!r})")
        if c["arch"] == "mod" and c.get("mod_gate") not in MOD_GATES:
            raise ValueError(f"mod_gate={c.get('mod_gate')!r} is not reproduced by this modeling code ({MOD_GATES})")
        self.layout = stack_layout(c)
        self.model = Backbone(c)
        self.sdt = RoutingModules(c, self.layout)
        self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RotaryEmbedding):
            # transformers builds the model on the meta device and gives buffers outside the state dict empty
            # storage: the cos/sin tables are filled here, computed as the package computes them.
            with torch.device("cpu"):
                fresh = rotary_embedding(self.config.sdt)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)
        else:
            super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # routed layers keep their own cache (only executed tokens), built in prepare_inputs

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: RoutedCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> SDTCausalLMOutput:
        """input_ids (B, T): the new tokens (all of them without a cache); attention_mask (B, seen + T) marks real
        tokens (left padding); labels as in transformers (shifted inside)."""
        c = self.config.sdt
        B, T = input_ids.shape
        if cache is None and use_cache:
            cache = RoutedCache()
        pad_mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -T:]
            pad_mask = None if bool(mask[:, -T:].all()) else mask[:, -T:]
        if position_ids is None:
            start = 0 if cache is None else cache.seen
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        inp = Inputs(
            positions=position_ids, rope=self.model.rope, pad_mask=pad_mask, cache=cache, routing=self.config.routing
        )
        x = self.model.embed_tokens(input_ids)
        decisions = {}
        for i, (kind, blocks) in enumerate(self.layout):
            if kind == "dense":
                (b,) = blocks
                x = self.model.layers[b](x, inp.positions, inp.rope, cache=inp.kv((i, 0)), pad_mask=inp.pad_mask)
            else:
                x, decisions[i] = self.sdt.layers[str(i)].run(i, [self.model.layers[b] for b in blocks], x, inp, c)
        if cache is not None:
            cache.seen += T
        x = self.model.norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        return SDTCausalLMOutput(loss=loss, logits=logits, cache=cache, decisions=decisions)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: RoutedCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if cache is None and use_cache:
            cache = RoutedCache()
        if cache is not None:
            input_ids = input_ids[:, cache.seen :]  # only the tokens the cache has not seen
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
