"""Analytic compute accounting: hand-checked dense totals and the claims of docs/algorithms.md, section 13."""

from __future__ import annotations

import dataclasses

import pytest

from sdt.common.errors import UserError
from sdt.models.compute import (
    SURPRISE_FLOPS_PER_ELEMENT,
    block_flops,
    compute_report,
    equal_flops_dense,
    flops_breakdown,
    kv_entries,
    measured_flops,
    measured_kv_entries,
)
from sdt.models.config import ModelConfig, layer_kinds
from sdt.routing.topk import capacity_k

RATIO_KEYS = (
    "flops_ratio_vs_dense",
    "kv_entries_ratio_vs_dense",
    "train_flops_ratio_vs_dense",
    "attention_flops_ratio_vs_dense",
)


def small(arch: str, **kw) -> ModelConfig:
    # Wider than the tests' tiny model (tests/conftest.py): at d_model 32 the MLP widths an equal-FLOPs dense model can
    # take are too coarse to match a routed model within 2% (test_equal_flops_dense_spends_what_the_routed_model_spends).
    base = {"arch": arch, "vocab_size": 512, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}
    return ModelConfig(**(base | kw))


def test_dense_matches_hand_computation():
    # d=8, 2 heads of 4 (no GQA), SwiGLU width 16, L=2, V=16, T=4, written out independently of sdt.models.compute.
    cfg = ModelConfig(arch="dense", vocab_size=16, d_model=8, n_layers=2, n_heads=2, intermediate_size=16)
    T, d, L, V, ffn = 4, 8, 2, 16, 16
    qkvo = 4 * (2 * T * d * d)  # q, k, v, o: each (T, 8) @ (8, 8)
    pairs = T * (T + 1) / 2  # causal (query, key) pairs: 1 + 2 + 3 + 4 = 10
    scores = pairs * (2 * d) * 2  # QK^T and AV: 2 FLOPs per MAC over all heads' dims (8), each
    mlp = 3 * (2 * T * d * ffn)
    head = 2 * T * d * V
    expected_total = (L * (qkvo + scores + mlp) + head) / T
    b = flops_breakdown(cfg, T)
    assert b["attention_projections"] == L * qkvo / T
    assert b["attention_scores"] == L * scores / T == 2 * 320 / 4
    assert b["mlp"] == L * mlp / T
    assert b["lm_head"] == head / T
    assert b["prior"] == b["router"] == b["surprise"] == 0
    assert b["total"] == pytest.approx(expected_total) == 2 * 512 + 160 + 2 * 768 + 256
    assert flops_breakdown(cfg, T, training=True)["total"] == pytest.approx(3 * expected_total)
    assert kv_entries(cfg, T) == L * T
    report = compute_report(cfg, T)
    assert all(report[key] == 1.0 for key in RATIO_KEYS)
    assert report["seq_len"] == T and report["kv_entries"] == 8 and report["breakdown"] == b


def test_gqa_saves_kv_projections_only():
    mha, gqa = small("dense", n_kv_heads=4), small("dense", n_kv_heads=1)
    a, b = flops_breakdown(mha, 32), flops_breakdown(gqa, 32)
    assert b["attention_projections"] < a["attention_projections"]
    assert b["attention_scores"] == a["attention_scores"] and b["mlp"] == a["mlp"]


def test_report_keys():
    report = compute_report(small("sdt"), 64)
    assert set(report) == {
        *RATIO_KEYS,
        "flops_per_token",
        "train_flops_per_token",
        "kv_entries",
        "breakdown",
        "seq_len",
        "capacity",
    }
    components = {
        "attention_projections",
        "attention_scores",
        "mlp",
        "prior",
        "router",
        "surprise",
        "skip_map",
        "lm_head",
    }
    assert set(report["breakdown"]) == components | {"total"}
    assert report["capacity"] == 0.5


@pytest.mark.parametrize("change_surprise", ["mse", "kl"])
def test_sdt_full_capacity_is_dense_plus_overhead(change_surprise):
    T = 64
    cfg = small("sdt", capacity=1.0, change_surprise=change_surprise)
    sdt, dense = flops_breakdown(cfg, T), flops_breakdown(dataclasses.replace(cfg, arch="dense"), T)
    D, h, pairs = cfg.d_model, cfg.prior_hidden_size, cfg.n_layers // 2
    prior = pairs * 2 * (2 * D * h + (2 if change_surprise == "kl" else 1) * h * D)  # per token
    router = pairs * 2 * (D * (D // 2) + D // 2)
    surprise = pairs * SURPRISE_FLOPS_PER_ELEMENT * D
    assert sdt["prior"] == pytest.approx(prior)
    assert sdt["router"] == pytest.approx(router)
    assert sdt["surprise"] == pytest.approx(surprise)
    assert sdt["total"] - dense["total"] == pytest.approx(prior + router + surprise)
    for name in ("attention_projections", "attention_scores", "mlp", "lm_head"):
        assert sdt[name] == pytest.approx(dense[name])


@pytest.mark.parametrize("T", [16, 64, 256, 1024])
def test_headline_routed_layer_at_half_capacity(T):
    # docs/algorithms.md, section 13: at capacity 0.5 a routed layer with selected attention spends ~25% of the dense attention
    # score/value FLOPs and stores 50% of the KV entries. Exactly (T+2) / (4(T+1)) with the (n+1)/2 convention.
    cfg = small("mod", capacity=0.5)
    k = T // 2
    routed, dense = block_flops(cfg, T, k), block_flops(cfg, T)
    ratio = routed["attention_scores"] / dense["attention_scores"]
    assert ratio == pytest.approx((T + 2) / (4 * (T + 1)))
    assert abs(ratio - 0.25) <= 1 / T
    assert routed["mlp"] / dense["mlp"] == 0.5
    # One MoD layer routed out of two: KV entries are (T + k) / 2T.
    two = small("mod", n_layers=2, capacity=0.5)
    assert layer_kinds(two) == ["block", "mod"]
    assert kv_entries(two, T) == T + k
    assert compute_report(two, T)["attention_flops_ratio_vs_dense"] == pytest.approx((1 + ratio) / 2)


def test_full_context_routed_attention():
    T = 64
    cfg = small("mod", n_layers=2, capacity=0.5, routed_attention="full")
    full, dense = block_flops(cfg, T, 32, full_context=True), block_flops(cfg, T)
    assert full["attention_scores"] / dense["attention_scores"] == 0.5  # k queries over the whole causal prefix
    assert full["attention_projections"] > block_flops(cfg, T, 32)["attention_projections"]  # K/V on all T
    assert kv_entries(cfg, T) == 2 * T
    assert compute_report(cfg, T)["kv_entries_ratio_vs_dense"] == 1.0


@pytest.mark.parametrize("sublayer", ["block", "attention", "mlp"])
def test_sublayer_routing_by_hand(sublayer):
    # One MoD layer (after a plain block) on T=4 tokens at capacity 0.5 (k=2); d=8, 2 heads of 4, SwiGLU width 16,
    # V=16, no skip map. Written out independently of sdt.models.compute, as in test_dense_matches_hand_computation.
    cfg = ModelConfig(
        arch="mod", vocab_size=16, d_model=8, n_layers=2, n_heads=2, intermediate_size=16, capacity=0.5,
        routed_sublayer=sublayer,
    )  # fmt: skip
    T, k, d, ffn, V = 4, 2, 8, 16, 16
    qkvo = {T: 4 * 2 * T * d * d, k: 4 * 2 * k * d * d}  # q, k, v, o projections on n tokens: 2048 | 1024
    scores = {T: T * (T + 1) / 2 * 2 * d * 2, k: k * (k + 1) / 2 * 2 * d * 2}  # causal pairs among n tokens: 320 | 96
    mlp = {T: 3 * 2 * T * d * ffn, k: 3 * 2 * k * d * ffn}  # 3072 | 1536
    n_attn = k if sublayer in ("block", "attention") else T  # tokens that run the routed layer's attention ...
    n_mlp = k if sublayer in ("block", "mlp") else T  # ... and its MLP
    routers = 2 * T * d + 2 * T * (d * (d // 2) + d // 2)  # MoD's linear router and the causal student: 64 + 288
    total = (qkvo[T] + scores[T] + mlp[T]) + (qkvo[n_attn] + scores[n_attn] + mlp[n_mlp]) + routers + 2 * T * d * V
    b = flops_breakdown(cfg, T)
    assert b["attention_projections"] * T == qkvo[T] + qkvo[n_attn]
    assert b["attention_scores"] * T == scores[T] + scores[n_attn]
    assert b["mlp"] * T == mlp[T] + mlp[n_mlp]
    assert b["total"] * T == pytest.approx(total)
    assert {"block": 9472, "attention": 11008, "mlp": 10720}[sublayer] == total  # the three sums, by hand
    kv = T + (T if sublayer == "mlp" else k)  # a routed MLP leaves attention, and its K/V, to every token
    assert kv_entries(cfg, T) == measured_kv_entries(cfg, T, [k]) == kv
    report = compute_report(cfg, T)
    dense_total = 2 * (qkvo[T] + scores[T] + mlp[T]) + 2 * T * d * V
    assert report["flops_ratio_vs_dense"] == pytest.approx(total / dense_total)
    assert report["kv_entries_ratio_vs_dense"] == kv / (2 * T)
    assert measured_flops(cfg, T, [k])["flops"] == pytest.approx(total)
    # Executing every token costs the dense block, whatever is routed.
    assert measured_flops(cfg, T, [T])["flops"] == pytest.approx(dense_total + routers)


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
@pytest.mark.parametrize("routed_attention", ["selected", "full"])
def test_attention_routing_saves_attention_and_mlp_routing_saves_the_mlp(arch, routed_attention):
    T = 128
    block, attention, mlp = (
        compute_report(small(arch, capacity=0.25, routed_attention=routed_attention, routed_sublayer=s), T)
        for s in ("block", "attention", "mlp")
    )
    dense = compute_report(small("dense"), T)["breakdown"]
    assert (
        attention["breakdown"]["mlp"] == dense["mlp"]
        and attention["breakdown"]["attention_scores"] == (block["breakdown"]["attention_scores"])
    )
    assert mlp["breakdown"]["attention_scores"] == dense["attention_scores"]
    assert mlp["breakdown"]["mlp"] == block["breakdown"]["mlp"]
    assert block["flops_per_token"] < min(attention["flops_per_token"], mlp["flops_per_token"])
    assert attention["kv_entries"] == block["kv_entries"]  # full-context attention: all T either way
    assert mlp["kv_entries"] == small(arch).n_layers * T and mlp["kv_entries_ratio_vs_dense"] == 1.0
    # The isoFLOP dense baseline follows what the routed model spends.
    for report, s in ((attention, "attention"), (mlp, "mlp")):
        routed = small(arch, capacity=0.25, routed_attention=routed_attention, routed_sublayer=s)
        twin = equal_flops_dense(routed, T)
        assert flops_breakdown(twin, T)["total"] == pytest.approx(report["flops_per_token"], rel=0.02)


def test_sdt_kv_ratio_all_layers_routed():
    report = compute_report(small("sdt", capacity=0.5), 128)
    assert report["kv_entries_ratio_vs_dense"] == 0.75  # decision layers keep T, dynamic ones k = T/2


def test_stt_training_adds_one_teacher_forward():
    """The dense teacher pass runs without gradient: training costs 3x the inference graph plus one dense block
    forward per STT layer (and the transition network and surprise, which are in the graph)."""
    T = 128
    for capacity in (0.125, 0.25, 0.5, 1.0):
        cfg = small("stt", capacity=capacity)
        report = compute_report(cfg, T)
        assert report["train_flops_ratio_vs_dense"] > report["flops_ratio_vs_dense"]
        n_stt = layer_kinds(cfg).count("stt")
        teacher = sum(block_flops(cfg, T).values()) * n_stt / T
        extra = flops_breakdown(cfg, T, training=True)["total"] - 3 * flops_breakdown(cfg, T)["total"]
        assert extra > teacher  # plus 3x (transition network + surprise), which are trained
        assert extra < 1.2 * teacher  # ... and small: not 3x the teacher
    assert compute_report(small("stt", capacity=0.125), T)["train_flops_ratio_vs_dense"] < 1
    assert compute_report(small("stt", capacity=1.0), T)["train_flops_ratio_vs_dense"] > 1


def test_stt_x_prev_router_is_wider():
    x, x_prev = small("stt"), small("stt", student_input="x_prev")
    assert flops_breakdown(x_prev, 64)["router"] > flops_breakdown(x, 64)["router"]


def test_mod_full_capacity_without_routers_equals_dense():
    T = 64
    cfg = small("mod", capacity=1.0)
    mod, dense = flops_breakdown(cfg, T), flops_breakdown(dataclasses.replace(cfg, arch="dense"), T)
    assert mod["router"] > 0 and mod["prior"] == mod["surprise"] == 0
    assert mod["total"] - mod["router"] == pytest.approx(dense["total"])
    assert kv_entries(cfg, T) == kv_entries(dataclasses.replace(cfg, arch="dense"), T)


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
@pytest.mark.parametrize("routed_attention", ["selected", "full"])
def test_ratios_monotone_in_capacity(arch, routed_attention):
    reports = [
        compute_report(small(arch, capacity=c, routed_attention=routed_attention), 128)
        for c in (0.05, 0.125, 0.25, 0.5, 0.75, 1.0)
    ]
    for key in RATIO_KEYS:
        values = [r[key] for r in reports]
        assert values == sorted(values), (key, values)
    if routed_attention == "selected":
        assert reports[0]["flops_ratio_vs_dense"] < reports[-1]["flops_ratio_vs_dense"]


def test_dense_first_and_last():
    T, k = 64, 32
    cfg = small("sdt", n_layers=6, dense_first=1, dense_last=1)
    assert layer_kinds(cfg) == ["block", "decision", "dynamic", "decision", "dynamic", "block"]
    assert kv_entries(cfg, T) == 4 * T + 2 * k
    all_routed = small("sdt", n_layers=6)
    assert kv_entries(all_routed, T) == 3 * T + 3 * k
    # Two fewer pairs: one decision and one dynamic layer became plain blocks.
    a, b = flops_breakdown(cfg, T), flops_breakdown(all_routed, T)
    assert a["prior"] == pytest.approx(b["prior"] * 2 / 3) and a["router"] == pytest.approx(b["router"] * 2 / 3)
    assert a["total"] > b["total"]

    stt = small("stt", n_layers=5, dense_first=1)
    assert layer_kinds(stt) == ["block", "block", "stt", "block", "stt"]
    assert kv_entries(stt, T) == 3 * T + 2 * k
    mod = small("mod", n_layers=5, dense_last=2)
    assert layer_kinds(mod) == ["block", "mod", "block", "block", "block"]
    assert kv_entries(mod, T) == 4 * T + k


def test_tiny_sequences_route_at_least_one_token():
    cfg = small("mod", n_layers=2, capacity=0.125)
    assert kv_entries(cfg, 4) == 4 + 1
    assert flops_breakdown(cfg, 1)["total"] > 0


def test_rejects_bad_seq_len():
    with pytest.raises(UserError, match="seq_len"):
        flops_breakdown(small("dense"), 0)


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
@pytest.mark.parametrize("routed_attention", ["selected", "full"])
def test_measured_flops_at_the_capacity_equal_the_static_count(arch, routed_attention):
    cfg = small(arch, capacity=0.25, routed_attention=routed_attention)
    T = 96
    n_routed = sum(kind in ("dynamic", "stt", "mod") for kind in layer_kinds(cfg))
    k = capacity_k(T, 0.25)
    measured = measured_flops(cfg, T, [k] * n_routed)
    assert measured["flops"] == pytest.approx(flops_breakdown(cfg, T)["total"] * T)
    assert measured["flops_ratio_vs_dense"] == pytest.approx(compute_report(cfg, T)["flops_ratio_vs_dense"])
    assert measured_kv_entries(cfg, T, [k] * n_routed) == kv_entries(cfg, T)


def test_measured_flops_follow_what_each_layer_executed():
    cfg = small("mod", capacity=0.5)
    low, high = measured_flops(cfg, 64, [8, 8]), measured_flops(cfg, 64, [8, 60])
    assert low["flops"] < high["flops"] and low["dense_flops"] == high["dense_flops"]
    # Logits only where tokens were generated: the head's cost shrinks in both models alike.
    decode = measured_flops(cfg, 64, [8, 8], logits_positions=1)
    assert decode["flops"] < low["flops"] and decode["dense_flops"] < low["dense_flops"]
    with pytest.raises(ValueError, match="routed layers"):
        measured_flops(cfg, 64, [8])


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
def test_skip_maps_cost_their_matmuls_on_the_skipped_tokens_only(arch):
    T = 64
    plain = small(arch, capacity=0.25)
    cfg = small(arch, capacity=0.25, skip_map="linear")
    D, k = cfg.d_model, capacity_k(T, 0.25)
    n_routed = sum(kind in ("dynamic", "stt", "mod") for kind in layer_kinds(cfg))
    per_token = 2 * D * D + D
    extra = flops_breakdown(cfg, T)["skip_map"] * T
    assert extra == n_routed * (T - k) * per_token
    assert flops_breakdown(cfg, T)["total"] * T == pytest.approx(flops_breakdown(plain, T)["total"] * T + extra)
    # What a layer executed decides the skipped count: a layer that runs every token pays nothing for its map.
    all_run = measured_flops(cfg, T, [T] * n_routed)["flops"]
    assert all_run == pytest.approx(measured_flops(plain, T, [T] * n_routed)["flops"])


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
@pytest.mark.parametrize("capacity", [0.125, 0.5])
def test_equal_flops_dense_spends_what_the_routed_model_spends(arch, capacity):
    routed = small(arch, capacity=capacity, skip_map="none" if arch == "stt" else "linear")
    dense = equal_flops_dense(routed, 128)
    assert dense.arch == "dense" and dense.d_model == routed.d_model and dense.vocab_size == routed.vocab_size
    # Cheaper than the full-depth dense model: fewer layers, or all of them with a narrower MLP ...
    assert dense.n_layers < routed.n_layers or dense.intermediate_size < routed.intermediate_size
    target = flops_breakdown(routed, 128)["total"]
    assert flops_breakdown(dense, 128)["total"] == pytest.approx(target, rel=0.02)  # ... by exactly the routed saving


def test_equal_flops_dense_prefers_fewer_layers_and_narrows_the_mlp_only_when_no_depth_matches():
    full = small("dense", n_layers=8)
    seven = flops_breakdown(dataclasses.replace(full, n_layers=7), 128)["total"]
    # A routed model that happens to spend what 7 dense layers spend gets 7 layers at full width.
    routed = small("mod", n_layers=8, capacity=0.5)
    per_layer = flops_breakdown(full, 128)["total"] - seven
    match = equal_flops_dense(routed, 128, tolerance=per_layer / seven)
    assert match.intermediate_size == full.intermediate_size
    # With a tight tolerance no depth matches: the shallowest depth above the target, its MLP narrowed.
    narrow = equal_flops_dense(routed, 128, tolerance=1e-4)
    assert narrow.intermediate_size < full.intermediate_size and narrow.intermediate_size % 8 == 0
    above = dataclasses.replace(narrow, intermediate_size=full.intermediate_size)
    assert flops_breakdown(above, 128)["total"] > flops_breakdown(routed, 128)["total"]
    # Exact up to rounding the width to a multiple of 8 (at most 4 units of width in every layer).
    assert flops_breakdown(narrow, 128)["total"] == pytest.approx(flops_breakdown(routed, 128)["total"], rel=1e-2)
