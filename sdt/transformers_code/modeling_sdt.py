"""Routed `sdt` models (SDT, STT, MoD) for Hugging Face `transformers`, as exported by `python -m sdt.export`.

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

This file is the thin Hugging Face wrapper around the package's own model: `SDTForCausalLM` holds the
`LanguageModel` that `build_model` assembles from the `sdt` model config stored in `config.json`, with the package's
routed layers (`RoutedLayer` and the SDT, STT and MoD hooks), and runs its forward in the export's causal routing
mode; generation carries the package's `ModelCache`. Every routed export ships this file next to `config.json`
together with the package modules it imports, rewritten only in their `from sdt... import` lines
(sdt/transformers_code/shipping.py), so an export loads where `sdt` is not installed and runs the code `sdt` trains.

`config.routing` is the causal mode (default: the model's `inference_routing`; `threshold`, `student` or `budget`,
as the architecture offers them); pass `routing=...` to `from_pretrained` for another one. Weight names are the
package's own under `model.` (`model.layers.<i>.<...>`, as `LanguageModel.state_dict()` names them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from sdt.blocks.kv_cache import ModelCache
from sdt.blocks.layers import RotaryEmbedding
from sdt.models import build_model
from sdt.models.config import ModelConfig
from sdt.models.transformer import positions_from_pad_mask
from sdt.routing.selection import CAUSAL_MODES

IGNORE_INDEX = -100  # label of a position without a target (transformers' convention)


class SDTConfig(PretrainedConfig):
    """The Llama-style backbone keys of config.json, and the full `sdt` model config under `sdt`."""

    model_type = "sdt"

    def __init__(self, sdt: dict[str, Any] | None = None, routing: str | None = None, **kwargs: Any) -> None:
        self.sdt = dict(sdt or {})
        self.routing = routing or self.sdt.get("inference_routing") or "threshold"
        super().__init__(**kwargs)


def model_config(config: SDTConfig) -> ModelConfig:
    """The package's model config of an export, in its causal mode (validated as the package validates it)."""
    if config.routing not in CAUSAL_MODES:
        raise ValueError(f"routing={config.routing!r}: an export runs a causal mode, one of {CAUSAL_MODES}")
    # The weights are the model's own layers: nothing to load from elsewhere, no layer selection to apply.
    return ModelConfig.from_dict(
        {**config.sdt, "inference_routing": config.routing, "init_from": None, "init_layers": None}
    )


class SDTCache(ModelCache):
    """The package's decoding cache as `generate` carries it (`cache`, formerly `past_key_values`): one KVCache per
    block call site holding only the tokens that block executed, the per-layer state (surprise history, budget
    counts), and the number of tokens fed so far, which `generate` reads through `get_seq_length`."""

    def __init__(self, max_tokens: int | None = None) -> None:
        super().__init__(max_tokens)
        self.seen = 0  # tokens per row fed so far, padding included: the next call's input starts after them

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i continues beam beam_idx[i]."""
        self.select_rows(beam_idx)


@dataclass
class SDTCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: SDTCache | None = None
    decisions: dict[int, Tensor] | None = None  # layer index -> (B, T) bool: tokens its routed block executed


class SDTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SDTConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (transformers reads it)

    def __init__(self, config: SDTConfig) -> None:
        super().__init__(config)
        self.model = build_model(model_config(config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, RotaryEmbedding):
            # transformers builds the model on the meta device and gives buffers outside the state dict empty
            # storage: the cos/sin tables are computed again, by the package's own code.
            cfg = self.model.config
            with torch.device("cpu"):
                fresh = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)
        else:
            super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # routed layers keep the package's cache (only executed tokens), built in prepare_inputs

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: SDTCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: SDTCache | None = None,
        **kwargs: Any,
    ) -> SDTCausalLMOutput:
        """input_ids (B, T): the new tokens (all of them without a cache); attention_mask (B, seen + T) marks real
        tokens (left padding); labels as in transformers (shifted inside). Runs the package model's forward."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = SDTCache()
        B, T = input_ids.shape
        pad_mask = None
        if attention_mask is not None:
            if position_ids is None:  # positions count real tokens only, as the package's left padding does
                position_ids = positions_from_pad_mask(attention_mask)[:, -T:]
            new = attention_mask[:, -T:].bool()
            pad_mask = None if bool(new.all()) else new
        if position_ids is None:
            start = 0 if cache is None else cache.seen
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        targets = None
        if labels is not None:  # the package compares position t with targets[t]: shift here
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        out = self.model(
            input_ids,
            targets,
            pad_mask=pad_mask,
            positions=position_ids,
            cache=cache,
            routing=self.config.routing,
            logits_to_keep=logits_to_keep,
            diagnostics=False,
        )
        if cache is not None:
            cache.seen += T
        return SDTCausalLMOutput(loss=out.loss, logits=out.logits, cache=cache, decisions=out.decisions)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: SDTCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if cache is None and use_cache:
            cache = SDTCache()
        if cache is not None:
            input_ids = input_ids[:, cache.seen :]  # only the tokens the cache has not seen
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
