"""Analytic compute accounting for dense, SDT, STT and MoD models (docs/algorithms.md, section 13).

Everything here is arithmetic on a `ModelConfig`; no model is built. Conventions, chosen so the numbers are easy to
check by hand and comparable across architectures:

- A matmul of an (n, a) by an (a, b) matrix costs 2 * n * a * b FLOPs (one multiply and one add per MAC).
- Only matmuls are counted, plus the surprise/gate math, which we count even though it is small
  (`SURPRISE_FLOPS_PER_ELEMENT` per element of D per token). Norms, activations, softmax, RoPE, residual adds and
  biases are left out: they are O(T * D) and the same for every architecture, so they barely move any ratio.
- Embedding lookups are free (a gather, not a matmul). The LM head (D x vocab) is counted on every token, tied or not.
- Causal attention: a query at position p sees p + 1 keys, so n tokens in causal order see (n + 1) / 2 keys on
  average. Scores (QK^T) and the weighted sum of values (AV) each cost 2 * n_heads * head_dim FLOPs per
  (query, key) pair; grouped-query attention saves K/V projections and cache, not these FLOPs.
- A routed block runs on k = max(1, floor(capacity * T)) tokens. With `routed_attention="selected"` the k tokens
  attend causally among themselves (k * (k + 1) / 2 pairs). With "full" the k queries attend to every earlier token;
  selected queries are assumed spread evenly over the sequence, so each sees (T + 1) / 2 keys on average, and K/V
  projections run on all T tokens. With `routed_sublayer="attention"` only the attention terms are those of k tokens
  (the MLP runs on all T); with "mlp" only the MLP's (attention runs on all T and stores all T tokens' K/V).
- Per-token FLOPs = FLOPs of one sequence of length T / T. Training FLOPs = 3 x the forward FLOPs of the
  training-time graph (the usual forward + 2x backward estimate), so detached router inputs are not discounted. The
  one exception is STT's dense teacher pass: it runs under no_grad (the surprise signals only read it detached), so
  it costs its forward only.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdt.common.errors import UserError
from sdt.models.config import ModelConfig, layer_kinds
from sdt.routing.topk import capacity_k

COMPONENTS = (
    "attention_projections", "attention_scores", "mlp", "prior", "router", "surprise", "skip_map", "lm_head",
)  # fmt: skip
SURPRISE_FLOPS_PER_ELEMENT = 10  # D_st, D_ch, CE, CU, two sigmoids, the gate combination: ~10 ops per element of D
TRAIN_FLOPS_MULTIPLIER = 3  # backward ~ 2x forward

Flops = dict[str, float]


def _zero() -> Flops:
    return dict.fromkeys(COMPONENTS, 0.0)


def _add(into: Flops, other: Flops) -> None:
    for name, value in other.items():
        into[name] += value


def block_flops(cfg: ModelConfig, seq_len: int, n_tokens: int | None = None, full_context: bool = False) -> Flops:
    """Forward FLOPs of one backbone block on one sequence (totals, not per token).

    n_tokens: how many tokens the block runs on (None: all seq_len). full_context: the n_tokens queries attend to
    every earlier token of the sequence, so K/V are projected for all seq_len tokens (routed_attention="full").
    """
    T = seq_len
    n = T if n_tokens is None else n_tokens
    D, ffn = cfg.d_model, cfg.intermediate_size
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    kv_tokens = T if full_context else n
    keys_per_query = (T + 1) / 2 if full_context else (n + 1) / 2
    flops = _zero()
    flops["attention_projections"] = 2 * n * D * q_width + 2 * n * q_width * D + 2 * 2 * kv_tokens * D * kv_width
    flops["attention_scores"] = 2 * (2 * cfg.n_heads * cfg.head_dim) * n * keys_per_query  # QK^T and AV
    flops["mlp"] = 3 * 2 * n * D * ffn  # SwiGLU: gate, up and down projections
    return flops


def _routed_block(cfg: ModelConfig, seq_len: int, executed: float | None = None) -> Flops:
    """A routed layer's block: the routed sub-layer(s) (`model.routed_sublayer`) on k tokens, the other on all T."""
    k = capacity_k(seq_len, cfg.capacity) if executed is None else executed
    routed_attention = cfg.routed_sublayer in ("block", "attention")
    routed = block_flops(cfg, seq_len, k, full_context=cfg.routed_attention == "full" and routed_attention)
    if cfg.routed_sublayer == "block":
        return routed
    flops = block_flops(cfg, seq_len)  # every token
    names = ("attention_projections", "attention_scores") if routed_attention else ("mlp",)
    flops.update({name: routed[name] for name in names})
    return flops


def _routed_kv_entries(cfg: ModelConfig, seq_len: int, executed: float) -> float:
    """K/V entries a routed layer's block stores for one sequence: its executed tokens with routed, selected
    attention; all T when every token's K/V is read (routed_attention="full") or attention is not routed."""
    return seq_len if cfg.routed_kv_every_token else executed


def _skip_map(cfg: ModelConfig, seq_len: int, executed: float | None = None) -> Flops:
    """The skip map on the tokens that skip a routed block: W norm(x) + b, W of D x D."""
    flops = _zero()
    if cfg.skip_map == "none":
        return flops
    k = capacity_k(seq_len, cfg.capacity) if executed is None else executed
    D = cfg.d_model
    per_token = 2 * D * D + D  # the matmul and the bias
    flops["skip_map"] = (seq_len - k) * per_token
    return flops


def _prior(cfg: ModelConfig, seq_len: int) -> Flops:
    """The SDT prior / STT transition network: SwiGLU D -> h -> D on every token (+ h -> D log-variance for kl)."""
    D, h = cfg.d_model, cfg.prior_hidden_size
    out_projections = 2 if cfg.change_surprise == "kl" else 1
    flops = _zero()
    flops["prior"] = 2 * seq_len * (2 * D * h + out_projections * h * D)
    return flops


def _surprise(cfg: ModelConfig, seq_len: int) -> Flops:
    flops = _zero()
    flops["surprise"] = SURPRISE_FLOPS_PER_ELEMENT * cfg.d_model * seq_len
    return flops


def _student_router(cfg: ModelConfig, seq_len: int, input_width: int | None = None) -> Flops:
    """Causal student router MLP(in -> D/2 -> 1, SiLU) on every token: it must score each token to decide."""
    d_in = cfg.d_model if input_width is None else input_width
    hidden = max(1, cfg.d_model // 2)
    flops = _zero()
    flops["router"] = 2 * seq_len * (d_in * hidden + hidden)
    return flops


def _linear_router(cfg: ModelConfig, seq_len: int) -> Flops:
    flops = _zero()
    flops["router"] = 2 * seq_len * cfg.d_model  # MoD's r = w . x
    return flops


def _layer_flops(cfg: ModelConfig, kind: str, seq_len: int, training: bool, executed: float | None = None) -> Flops:
    """Forward FLOPs of one layer (and the routing machinery attached to it) on one sequence; `executed`: the
    tokens a routed layer ran on (None: the capacity's k)."""
    T = seq_len
    parts: list[Flops]
    if kind in ("block", "decision"):
        parts = [block_flops(cfg, T)]
        if kind == "decision":  # the prior predicts the update; surprise and gate run on every token
            parts += [_prior(cfg, T), _surprise(cfg, T)]
    elif kind == "dynamic":
        parts = [_routed_block(cfg, T, executed), _skip_map(cfg, T, executed), _student_router(cfg, T)]
    elif kind == "stt":
        router_in = 2 * cfg.d_model if cfg.student_input == "x_prev" else cfg.d_model
        parts = [_routed_block(cfg, T, executed), _skip_map(cfg, T, executed), _student_router(cfg, T, router_in)]
        if training:  # dense teacher pass for the surprise signals, then the sparse re-run above
            # The teacher's output only feeds detached signals: no backward through it, so one forward, not three.
            teacher = {name: value / TRAIN_FLOPS_MULTIPLIER for name, value in block_flops(cfg, T).items()}
            parts += [teacher, _prior(cfg, T), _surprise(cfg, T)]
    elif kind == "mod":
        parts = [
            _routed_block(cfg, T, executed), _skip_map(cfg, T, executed), _linear_router(cfg, T), _student_router(cfg, T),
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    total = _zero()
    for part in parts:
        _add(total, part)
    return total


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")


def flops_breakdown(cfg: ModelConfig, seq_len: int, training: bool = False) -> dict[str, float]:
    """Per-token FLOPs by component, plus "total".

    training=False: the inference forward pass in a causal mode (routed layers execute k tokens; STT uses its
    student). training=True: 3x the forward of the training-time graph (STT adds its dense teacher and TPN).
    """
    _check_seq_len(seq_len)
    total = _zero()
    for kind in layer_kinds(cfg):
        _add(total, _layer_flops(cfg, kind, seq_len, training))
    total["lm_head"] = 2 * seq_len * cfg.d_model * cfg.vocab_size
    scale = (TRAIN_FLOPS_MULTIPLIER if training else 1) / seq_len
    out = {name: value * scale for name, value in total.items()}
    out["total"] = sum(out.values())
    return out


ROUTED_KINDS = ("dynamic", "stt", "mod")  # the layer kinds whose block a routed layer of the model runs


def measured_flops(
    cfg: ModelConfig, seq_len: int, executed: Sequence[float], logits_positions: int | None = None
) -> dict[str, float]:
    """Inference FLOPs of one sequence of `seq_len` tokens whose routed layers executed `executed[j]` tokens
    (routed layers in stack order), with logits at `logits_positions` positions (None: every token; one per
    generated token when decoding). Returns {"flops", "dense_flops", "flops_ratio_vs_dense"} (totals, not per
    token); the dense model has the same dimensions and the same logits."""
    _check_seq_len(seq_len)
    kinds = layer_kinds(cfg)
    routed = [i for i, kind in enumerate(kinds) if kind in ROUTED_KINDS]
    if len(executed) != len(routed):
        raise ValueError(f"{len(executed)} executed counts for {len(routed)} routed layers")
    count = dict(zip(routed, executed, strict=True))
    total = 0.0
    for i, kind in enumerate(kinds):
        total += sum(_layer_flops(cfg, kind, seq_len, False, count.get(i)).values())
    dense = cfg.n_layers * sum(block_flops(cfg, seq_len).values())
    head = 2 * (seq_len if logits_positions is None else logits_positions) * cfg.d_model * cfg.vocab_size
    return {"flops": total + head, "dense_flops": dense + head, "flops_ratio_vs_dense": (total + head) / (dense + head)}


def measured_kv_entries(cfg: ModelConfig, seq_len: int, executed: Sequence[float]) -> float:
    """K/V entries one sequence holds when its routed layers executed `executed[j]` tokens (cf. `kv_entries`)."""
    kinds = layer_kinds(cfg)
    routed = iter(executed)
    total = 0.0
    for kind in kinds:
        if kind in ROUTED_KINDS:
            total += _routed_kv_entries(cfg, seq_len, next(routed))
        else:
            total += seq_len
    return total


def kv_entries(cfg: ModelConfig, seq_len: int) -> int:
    """Tokens whose K/V are stored, summed over layers, for one sequence at inference.

    Full blocks store all T; routed blocks store their k executed tokens with selected attention, but all T with
    routed_attention="full" (their queries read every earlier token's K/V) or routed_sublayer="mlp" (attention runs
    on every token).
    """
    _check_seq_len(seq_len)
    routed_kv = _routed_kv_entries(cfg, seq_len, capacity_k(seq_len, cfg.capacity))
    return sum(seq_len if kind in ("block", "decision") else routed_kv for kind in layer_kinds(cfg))


def compute_report(cfg: ModelConfig, seq_len: int, teacher: ModelConfig | None = None) -> dict:
    """FLOPs per token, KV entries and their ratios to the dense model with the same dimensions.

    `teacher`: a distillation teacher (`distill.*`) whose forward runs, without gradients, at every training step;
    its dense forward FLOPs count once in the training FLOPs (for `distill.teacher=self`, the model's own
    dimensions as a dense model).
    """
    dense = cfg.as_dense()
    inference, dense_inference = flops_breakdown(cfg, seq_len), flops_breakdown(dense, seq_len)
    train, dense_train = flops_breakdown(cfg, seq_len, training=True), flops_breakdown(dense, seq_len, training=True)
    if teacher is not None:
        train = dict(train)
        train["total"] += flops_breakdown(teacher.as_dense(), seq_len)["total"]
    kv = kv_entries(cfg, seq_len)
    return {
        "flops_per_token": inference["total"],
        "flops_ratio_vs_dense": inference["total"] / dense_inference["total"],
        "kv_entries_ratio_vs_dense": kv / (cfg.n_layers * seq_len),
        "train_flops_per_token": train["total"],
        "train_flops_ratio_vs_dense": train["total"] / dense_train["total"],
        "attention_flops_ratio_vs_dense": inference["attention_scores"] / dense_inference["attention_scores"],
        "kv_entries": kv,
        "breakdown": inference,
        "seq_len": seq_len,
        "capacity": cfg.capacity,
    }


def equal_flops_dense(cfg: ModelConfig, seq_len: int, tolerance: float = 0.02) -> ModelConfig:
    """The dense model whose inference FLOPs per token equal those of `cfg` (a routed model): the isoFLOP baseline
    of the Mixture-of-Depths argument, at the same width, vocabulary and context.

    Fewer layers when some depth lands within `tolerance` of the routed model's FLOPs; otherwise the shallowest
    depth above them with its MLP narrowed until the two match (FLOPs are linear in the MLP width, so the match is
    exact up to rounding the width to a multiple of 8).
    """
    target = flops_breakdown(cfg, seq_len)["total"]

    def dense(n_layers: int, intermediate_size: int) -> ModelConfig:
        return cfg.as_dense(n_layers=n_layers, intermediate_size=intermediate_size)

    above = None
    for n_layers in range(cfg.n_layers, 0, -1):
        candidate = dense(n_layers, cfg.intermediate_size)
        flops = flops_breakdown(candidate, seq_len)["total"]
        if abs(flops / target - 1) <= tolerance:
            return candidate
        if flops > target:
            above = candidate
    if above is None:  # even one layer spends more than the routed model would need a width below any sensible one
        raise UserError(f"no dense model at d_model={cfg.d_model} spends as few FLOPs as {cfg.arch} at {seq_len}")
    full = flops_breakdown(above, seq_len)
    per_width = full["mlp"] / above.intermediate_size  # MLP FLOPs per unit of width, all layers together
    width = above.intermediate_size - (full["total"] - target) / per_width
    return dense(above.n_layers, max(8, 8 * round(width / 8)))
