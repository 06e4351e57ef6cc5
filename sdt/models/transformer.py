"""The decoder-only language model: an embedding, a stack of layers, a norm and the LM head.

The model is a stack of *layers*. A layer is any module with `forward(x, ctx) -> LayerOutput` (sdt.models.layer_io):
a plain block (`DenseLayer`), or a routed unit (`RoutedLayer`, sdt.models.routed_layer: an SDT decision/dynamic
pair, an STT layer, a MoD layer). Layers return their hidden states together with auxiliary losses and routing
statistics, so the model, not the training loop, decides how they are combined, and the training loop logs each one
separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdt.blocks.kv_cache import ModelCache
from sdt.blocks.layers import Block, RMSNorm, RotaryEmbedding
from sdt.common.errors import UserError
from sdt.models.config import ModelConfig
from sdt.models.layer_io import ForwardContext, LayerOutput
from sdt.models.routed_layer import RoutedLayer
from sdt.routing.quantiles import is_calibrated, threshold_at
from sdt.routing.stats import position_consensus


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None = None  # next-token cross-entropy only; auxiliary losses are never folded in
    aux_loss: Tensor | None = None  # weighted sum of auxiliary losses (what gets added to the LM loss)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted, averaged over layers
    stats: dict[str, Tensor] = field(default_factory=dict)  # "layers.{i}.{name}" -> scalar
    decisions: dict[int, Tensor] = field(default_factory=dict)  # layer index -> (B, T) bool
    scores: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # layer index -> score name -> (B, T)


class DenseLayer(nn.Module):
    """A standard decoder block as a layer of the stack."""

    n_blocks = 1  # backbone layers this unit spans

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.block = Block(cfg)

    def forward(self, x: Tensor, ctx: ForwardContext) -> LayerOutput:
        return LayerOutput(self.block(x, ctx.positions, ctx.rope, cache=ctx.kv(), pad_mask=ctx.pad_mask))


MAX_PATH_FACTOR = 4  # a layer path may be at most this many times the stack's depth


def check_layer_path(layer_path: Sequence[int], n_layers: int) -> list[int]:
    """A layer path (indices into the stack, in execution order; repeats and skips allowed), validated."""
    path = [int(i) for i in layer_path]
    if not path:
        raise UserError("layer_path is empty: it must list at least one layer index")
    bad = [i for i in path if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"layer_path has indices out of range {bad}: the model has layers 0..{n_layers - 1}")
    if len(path) > MAX_PATH_FACTOR * n_layers:
        raise UserError(
            f"layer_path has {len(path)} entries, over the bound of {MAX_PATH_FACTOR} x {n_layers} layers "
            f"= {MAX_PATH_FACTOR * n_layers}"
        )
    return path


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths -> (ids (B, T), pad_mask (B, T)), right-aligned: every row ends at the last
    position, so the next token of each is predicted at the same place. Padding slots hold `pad_id`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        pad_mask[i, width - len(r) :] = True
    return ids, pad_mask


def positions_from_pad_mask(pad_mask: Tensor) -> Tensor:
    """Left-padded batch (B, T) -> positions counting only real tokens (padding slots get 0)."""
    return (pad_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class LanguageModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layers: Sequence[nn.Module] | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        """`layers`: the stack (default: cfg.n_layers dense layers). `aux_loss_weights`: the weight of each auxiliary
        loss the layers report (default: `cfg.aux_loss_weights`); a layer reporting a loss not named there is an
        error, not a silent weight of 1."""
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(layers if layers is not None else [DenseLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss_weights = dict(cfg.aux_loss_weights if aux_loss_weights is None else aux_loss_weights)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Residual output projections are scaled down with depth (GPT-2) so the residual stream starts small.
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for _, layer in self.routed_layers():
            layer.reset_routing_parameters()

    @property
    def is_routed(self) -> bool:
        return any(isinstance(layer, RoutedLayer) for layer in self.layers)

    def routed_layers(self) -> list[tuple[int, RoutedLayer]]:
        """(index in the stack, layer) of every routed layer."""
        return [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, RoutedLayer)]

    def set_training_progress(self, progress: float) -> None:
        """Fraction of training done, in [0, 1]; drives scheduled routing temperatures (`model.beta_mode`)."""
        for _, layer in self.routed_layers():
            layer.set_progress(progress)

    def set_capacity(self, capacity: float) -> None:
        """The share of tokens every routed layer's Top-K keeps from now on (the capacity in force)."""
        for _, layer in self.routed_layers():
            layer.capacity = capacity

    def set_inference_capacity(self, capacity: float) -> None:
        """Run every routed layer at `capacity` from now on, without retraining: each causal threshold is read
        from its score's calibrated quantile grid (sdt.routing.quantiles), and Top-K and the budget mode keep that
        share too. Raises UserError for a capacity outside (0, 1] or a model calibrated before grids existed."""
        if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 1:
            raise UserError(f"capacity must be a number in (0, 1], got {capacity!r}")
        for i, layer in self.routed_layers():
            grids = layer.score_quantiles()
            for name, threshold in layer.thresholds().items():
                if not is_calibrated(grids[name]):
                    raise UserError(
                        f"routed layer {i} has no calibrated quantile grid for its {name} score, so its capacity "
                        "cannot be changed at run time: recalibrate (evaluate.py recalibrate=true)"
                    )
                threshold.copy_(threshold_at(grids[name], float(capacity)))
        self.set_capacity(float(capacity))

    def routing_state(self) -> tuple[float, dict[str, Tensor]]:
        """(capacity in force, every threshold): what `set_inference_capacity` changes, to restore afterwards."""
        thresholds = {
            f"{i}.{name}": t.clone() for i, layer in self.routed_layers() for name, t in layer.thresholds().items()
        }
        return self.capacity_in_force, thresholds

    def restore_routing_state(self, saved: tuple[float, dict[str, Tensor]]) -> None:
        capacity, thresholds = saved
        for i, layer in self.routed_layers():
            for name, t in layer.thresholds().items():
                t.copy_(thresholds[f"{i}.{name}"])
        self.set_capacity(capacity)

    @property
    def capacity_in_force(self) -> float:
        """The routed layers' current capacity: `config.capacity` unless `set_inference_capacity` has moved it."""
        routed = self.routed_layers()
        return routed[0][1].capacity if routed else self.config.capacity

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        pad_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: ModelCache | None = None,
        routing: str | None = None,
        logits_to_keep: int = 0,
        diagnostics: bool = True,
        layer_path: Sequence[int] | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); targets (B, T) are the *already shifted* next tokens (-100 = ignore).

        The data pipeline shifts labels; the loss here compares position t's logits with targets[t] directly.
        `logits_to_keep > 0` computes logits only for the last that many positions (prefill during generation).
        `routing` picks how routed layers choose tokens: "topk" (training; the default without a cache), or a causal
        mode, "threshold", "student" or "budget" (the default with a cache is the config's `inference_routing`); "full" runs
        every block on every token without gates (the routed model's dense function, a distillation teacher).
        `layer_path` runs these layers of the stack in this order instead of all of them once (test-time depth
        adaptation, docs/cola.md); each position in the path has its own cache slots, so a repeated layer keeps one
        KV cache per visit. Per-layer stats and decisions of a layer visited twice are those of its last visit.
        """
        if routing is None:
            routing = self.config.inference_routing if cache is not None else "topk"
        B, T = input_ids.shape
        if positions is None:
            if pad_mask is not None:
                positions = positions_from_pad_mask(pad_mask)
            else:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.dropout(self.embed_tokens(input_ids))  # (B, T, D)
        ctx = ForwardContext(
            positions=positions,
            rope=self.rope,
            pad_mask=pad_mask,
            cache=cache,
            routing=routing,
            diagnostics=diagnostics,
        )

        aux_sums: dict[str, Tensor] = {}
        aux_counts: dict[str, int] = {}
        stats: dict[str, Tensor] = {}
        decisions: dict[int, Tensor] = {}
        scores: dict[int, dict[str, Tensor]] = {}
        # The identity path gives cache key i to layer i, as a plain forward always did.
        path = range(len(self.layers)) if layer_path is None else check_layer_path(layer_path, len(self.layers))
        for step, i in enumerate(path):
            out = self.layers[i](x, replace(ctx, cache_key=step))
            x = out.hidden
            for name, value in out.aux_losses.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value
                aux_counts[name] = aux_counts.get(name, 0) + 1
            for name, value in out.stats.items():
                stats[f"layers.{i}.{name}"] = value
            if out.decisions is not None:
                decisions[i] = out.decisions
                if cache is not None and isinstance(self.layers[i], RoutedLayer):
                    cache.record_routed(i, out.decisions, pad_mask)
                if diagnostics and cache is None:  # a batch-level statistic: not per decoding step
                    stats[f"layers.{i}.position_consensus"] = position_consensus(out.decisions, pad_mask)
            if out.scores:
                scores[i] = out.scores

        x = self.norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)

        aux_losses = {name: aux_sums[name] / aux_counts[name] for name in aux_sums}
        aux_loss = None
        if aux_losses:
            unweighted = sorted(set(aux_losses) - set(self.aux_loss_weights))
            if unweighted:
                raise ValueError(
                    f"auxiliary loss(es) {unweighted} have no weight; weighted: {sorted(self.aux_loss_weights)}"
                )
            aux_loss = sum(self.aux_loss_weights[name] * value for name, value in aux_losses.items())
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(
            logits=logits,
            loss=loss,
            aux_loss=aux_loss,
            aux_losses=aux_losses,
            stats=stats,
            decisions=decisions,
            scores=scores,
        )

    def layer_path_states(
        self,
        x: Tensor,
        layer_path: Sequence[int],
        start: int,
        *,
        positions: Tensor,
        pad_mask: Tensor | None = None,
        routing: str = "topk",
        diagnostics: bool = True,
    ) -> Iterator[Tensor]:
        """Resume a forward over `layer_path` at step `start`: x (B, T, D) is the hidden state entering that step.

        Yields the hidden state after each step `start, start + 1, ...` (no KV cache, no stats), running exactly the
        layer calls `forward` makes, so resuming from a stored prefix state gives the same bits as the full forward
        (prefix reuse in CoLa search, docs/cola.md). The logits are `lm_head(norm(state))`, as in `forward`.
        """
        path = check_layer_path(layer_path, len(self.layers))
        ctx = ForwardContext(
            positions=positions, rope=self.rope, pad_mask=pad_mask, routing=routing, diagnostics=diagnostics
        )
        for step in range(start, len(path)):
            x = self.layers[path[step]](x, replace(ctx, cache_key=step)).hidden
            yield x

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        pad_mask: Tensor | None = None,
        eos_id: int | None = None,
        routing: str | None = None,
        valid_vocab: int | None = None,
        generator: torch.Generator | None = None,
        cache: ModelCache | None = None,
        layer_path: Sequence[int] | None = None,
        capacity: float | None = None,
        on_token: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """Sample a continuation with a KV cache. input_ids (B, T0), left-padded when `pad_mask` is given.

        temperature 0 is greedy decoding. Rows that produced `eos_id` keep emitting it. `valid_vocab` masks the
        padded tail of the vocabulary that no real token maps to. `layer_path` is as in `forward`. `capacity`
        runs the routed layers at that capacity for this call only (`set_inference_capacity`). `on_token` is
        called with each new (B,) token batch as it is sampled (streaming). The compute each sequence spent is
        recorded in `cache` (pass one to read it: `sdt.evaluation.usage.request_usage`).
        Returns (B, T0 + max_new_tokens).
        """
        if capacity is not None and self.is_routed:
            saved = self.routing_state()
            self.set_inference_capacity(capacity)
            try:
                return self.generate(
                    input_ids, max_new_tokens, temperature=temperature, top_k=top_k, pad_mask=pad_mask,
                    eos_id=eos_id, routing=routing, valid_vocab=valid_vocab, generator=generator, cache=cache,
                    layer_path=layer_path, on_token=on_token,
                )  # fmt: skip
            finally:
                self.restore_routing_state(saved)
        B, T0 = input_ids.shape
        routing = routing or self.config.inference_routing
        if routing == "topk" and self.is_routed:
            raise UserError(
                "generation needs a causal routing mode (threshold, student or budget), not the topk oracle"
            )
        if T0 + max_new_tokens > self.config.max_seq_len:
            raise UserError(
                f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len="
                f"{self.config.max_seq_len}"
            )
        if layer_path is not None:
            layer_path = check_layer_path(layer_path, len(self.layers))
        if max_new_tokens <= 0:
            return input_ids
        cache = ModelCache() if cache is None else cache
        if cache.max_tokens is None:  # size the KV buffers once: no copies of the cache while decoding
            cache.max_tokens = T0 + max_new_tokens
        if pad_mask is not None:
            positions = positions_from_pad_mask(pad_mask)
            next_pos = pad_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
        else:
            positions = torch.arange(T0, device=input_ids.device).expand(B, T0)
            next_pos = torch.full((B, 1), T0, device=input_ids.device, dtype=torch.long)
        logits = self(
            input_ids,
            pad_mask=pad_mask,
            positions=positions,
            cache=cache,
            routing=routing,
            logits_to_keep=1,
            layer_path=layer_path,
            diagnostics=False,
        ).logits[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            nxt = sample_next_token(logits, temperature, top_k, valid_vocab, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            new_tokens.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if step + 1 < max_new_tokens:
                logits = self(
                    nxt[:, None], positions=next_pos, cache=cache, routing=routing, layer_path=layer_path,
                    diagnostics=False,
                ).logits[:, -1]  # fmt: skip
                next_pos = next_pos + 1
        cache.next_pos = next_pos
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def sample_next_token(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    valid_vocab: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy."""
    logits = logits.float()
    if valid_vocab is not None and valid_vocab < logits.size(-1):
        logits = logits.clone()
        logits[:, valid_vocab:] = float("-inf")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
