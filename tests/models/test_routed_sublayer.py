"""`model.routed_sublayer`: a routed layer routes its whole block, only its attention sub-layer or only its MLP.

For every routed architecture and both sub-layer values: the sub-layer that is not routed runs on every token, the
routed one on the selected tokens only (gate and skip map on its update), Top-K keeps exactly k, causal modes are
causal and batch-independent, the dense function and the step-0 guarantees of the conversion recipe hold, and the skip
map fit regresses the routed sub-layer's update. Cached decoding: tests/models/test_{sdt,stt,mod}.py.
"""

from __future__ import annotations

import pytest
import torch

from sdt.blocks.kv_cache import RESERVE_SLACK
from sdt.common.errors import UserError
from sdt.models import ModelCache, ModelConfig
from sdt.models.calibration import calibrate_thresholds
from sdt.models.layer_io import ForwardContext
from sdt.models.skip_map_fit import fit_skip_maps
from sdt.routing import capacity_k
from sdt.routing.execution import gather_tokens, scatter_tokens
from tests.models.conftest import (
    VOCAB,
    calibrate_on_random_text,
    dense_twin,
    random_ids,
    spread_routers,
    tiny_model,
)

ROUTED = ["sdt", "stt", "mod"]
SUBLAYERS = ["attention", "mlp"]
CAUSAL_MODES = {"sdt": ["threshold", "student", "budget"], "stt": ["student", "budget"], "mod": ["threshold", "student", "budget"]}  # fmt: skip


def routed(arch: str, sublayer: str, **kw):
    """A tiny routed model with spread-out scores and gates whose forward value is the full update (ste), so the
    sub-layers' outputs can be checked exactly."""
    base = {"routed_sublayer": sublayer, "mod_gate": "ste", "init_std": 0.2, "beta_init": 5.0, "ma_window": 8}
    return spread_routers(tiny_model(arch, **{**base, **kw}))


def randomize_skip_maps(model) -> None:
    with torch.no_grad():
        for j, (_, layer) in enumerate(model.routed_layers()):
            g = torch.Generator().manual_seed(10 + j)
            for p in layer.skip_map.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def record_layers(model) -> tuple[dict, list]:
    """Each routed layer's (input x, context, LayerOutput) on the next forward."""
    records: dict[int, tuple] = {}
    handles = [
        layer.register_forward_hook(lambda m, args, out, i=i: records.__setitem__(i, (args[0], args[1], out)))
        for i, layer in model.routed_layers()
    ]
    return records, handles


@pytest.mark.parametrize("sublayer", SUBLAYERS)
@pytest.mark.parametrize("arch", ROUTED)
def test_only_the_routed_sublayer_skips_and_the_other_runs_on_every_token(arch, sublayer):
    """Top-K at a small capacity: exactly k tokens run the routed sub-layer; every token runs the other one, and the
    skipped tokens get the skip map's estimate of the routed sub-layer's update, read at that sub-layer's input."""
    T = 16
    model = routed(arch, sublayer, capacity=0.25, skip_map="linear")
    randomize_skip_maps(model)
    records, handles = record_layers(model)
    with torch.no_grad():
        model(random_ids(2, T), routing="topk")
        for h in handles:
            h.remove()
        k = capacity_k(T, 0.25)
        for i, layer in model.routed_layers():
            x, ctx, out = records[i]
            assert out.decisions.sum(dim=1).tolist() == [k, k]
            idx = out.decisions.nonzero()[:, 1].view(2, k)  # (B, k) in position order
            h = layer.routed_input(x, ctx)  # (B, T, D): what the routed block reads
            block, pos = layer.routed_block, ctx.positions
            if sublayer == "attention":
                # Selected tokens attend among themselves, then run the MLP; skipped tokens: no attention, the
                # estimate of its update, then the MLP.
                selected = block.mlp_sublayer(
                    block.attention_sublayer(gather_tokens(h, idx), pos.gather(1, idx), ctx.rope)
                )
                skipped = block.mlp_sublayer(h + layer.skip_map(h))
                mlp_update = block.mlp_sublayer(h) - h
                assert mlp_update.abs().amax() > 1e-2  # the MLP that every token runs changes them visibly
            else:
                a = block.attention_sublayer(h, pos, ctx.rope)  # attention over every token
                selected = gather_tokens(block(h, pos, ctx.rope), idx)  # the whole block: its MLP ran
                skipped = a + layer.skip_map(a)
            torch.testing.assert_close(out.hidden, scatter_tokens(skipped, idx, selected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sublayer", SUBLAYERS)
def test_the_gate_scales_the_routed_sublayers_update(sublayer):
    """MoD with its sigmoid gate at capacity 1: y = attention-or-MLP sub-layer with sigmoid(r) times its update."""
    model = routed("mod", sublayer, capacity=1.0, mod_gate="sigmoid")
    layer = model.layers[1]
    x = torch.randn(2, 10, 32)
    ctx = ForwardContext(positions=torch.arange(10).expand(2, 10), rope=model.rope)
    with torch.no_grad():
        out = layer(x, ctx).hidden
        g = torch.sigmoid(layer.router(x)).unsqueeze(-1)
        block = layer.block
        if sublayer == "attention":
            expected = block.mlp_sublayer(x + g * (block.attention_sublayer(x, ctx.positions, model.rope) - x))
        else:
            a = block.attention_sublayer(x, ctx.positions, model.rope)
            expected = a + g * (block.mlp_sublayer(a) - a)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sublayer", ["block", *SUBLAYERS])
@pytest.mark.parametrize("arch", ROUTED)
def test_causal_modes_are_causal_and_rows_are_independent(arch, sublayer):
    model = calibrate_on_random_text(routed(arch, sublayer), n_batches=4, shape=(4, 24), seed=5)
    ids = random_ids(3, 20)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 5) % VOCAB
    for mode in CAUSAL_MODES[arch]:
        a, b = model(ids, routing=mode), model(changed, routing=mode)
        torch.testing.assert_close(a.logits[:, :12], b.logits[:, :12], atol=1e-5, rtol=1e-5)
        assert (a.logits[:, 12:] - b.logits[:, 12:]).abs().amax() > 1e-4
        fractions = []
        for i in a.decisions:
            assert torch.equal(a.decisions[i][:, :12], b.decisions[i][:, :12]), (mode, i)
            fractions.append(a.decisions[i].float().mean())
        assert 0 < min(fractions) and max(fractions) < 1, mode  # calibrated: some tokens skip, some run
        alone = model(ids[1:2], routing=mode)  # a row computes the same in a batch as alone
        torch.testing.assert_close(alone.logits[0], a.logits[1], atol=1e-5, rtol=1e-5)
    top, top_alone = model(ids, routing="topk"), model(ids[2:], routing="topk")
    torch.testing.assert_close(top_alone.logits[0], top.logits[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "sublayer"),
    [
        pytest.param(
            arch,
            sublayer,
            marks=[] if (arch, sublayer) in (("sdt", "attention"), ("mod", "mlp")) else [pytest.mark.slow],
        )
        for arch in ROUTED
        for sublayer in SUBLAYERS
    ],
)
def test_calibration_holds_every_routed_layer_at_the_capacity_on_its_blocks(arch, sublayer):
    """Thresholds calibrated layer by layer on the causal mode's own inputs: on the calibration blocks every routed
    layer executes the capacity in each thresholded mode (up to ties, two tokens), deeper layers included."""
    model = routed(arch, sublayer, capacity=0.25, n_layers=6)
    data = [random_ids(4, 32, seed=20 + s) for s in range(4)]
    calibrate_thresholds(model, data)
    n = sum(ids.numel() for ids in data)
    with torch.no_grad():
        for mode in [m for m in CAUSAL_MODES[arch] if m != "budget"]:
            executed: dict[int, float] = {}
            for ids in data:
                for i, decisions in model(ids, routing=mode).decisions.items():
                    executed[i] = executed.get(i, 0.0) + float(decisions.sum())
            assert len(executed) == 3  # 6 layers: three SDT pairs, three routed STT / MoD layers
            for i, count in executed.items():
                assert abs(count / n - 0.25) <= 2 / n, (mode, i, count / n)


@pytest.mark.parametrize("sublayer", SUBLAYERS)
@pytest.mark.parametrize("arch", ROUTED)
def test_greedy_generation_equals_repeated_full_forwards(arch, sublayer):
    model = calibrate_on_random_text(routed(arch, sublayer, skip_map="linear"), n_batches=4, shape=(4, 24), seed=5)
    randomize_skip_maps(model)
    mode = model.config.inference_routing
    prompt = random_ids(2, 6)
    out = model.generate(prompt, 10, temperature=0.0, routing=mode)
    logits = model(out[:, :-1], routing=mode).logits  # a causal mode: one forward gives every step's logits
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


@pytest.mark.parametrize("sublayer", ["block", *SUBLAYERS])
def test_a_routed_site_reserves_the_kv_it_will_store(sublayer):
    """Generation sizes each K/V buffer ahead: a routed attention its capacity's share (plus slack), a routed MLP's
    layer every token, as a dense block."""
    model = calibrate_on_random_text(routed("mod", sublayer, capacity=0.25))
    cache = ModelCache(max_tokens=100)
    with torch.no_grad():
        model(random_ids(1, 8), cache=cache, routing="student")
    assert cache.layers[(0, 0)].allocated == 100  # the plain block below
    assert cache.layers[(1, 0)].allocated == (100 if sublayer == "mlp" else 25 + RESERVE_SLACK)


# --- the conversion recipe's step-0 guarantees ---------------------------------------------------------------------


@pytest.mark.parametrize("sublayer", SUBLAYERS)
@pytest.mark.parametrize("arch", ROUTED)
def test_full_routing_and_capacity_one_compute_the_pretrained_function(arch, sublayer):
    """routing="full" (the dense function, STT's teacher and self-distillation) is the backbone run densely; at
    capacity 1 with straight-through gates (the recipe's capacity_start=1.0) Top-K and the causal mode compute it too,
    skip maps or not; and the dense function decodes with a cache like its full forward."""
    model = routed(arch, sublayer, capacity=1.0, skip_map="linear")
    randomize_skip_maps(model)  # never applied: no token skips
    ids = random_ids(2, 16)
    with torch.no_grad():
        dense = dense_twin(model)(ids).logits
        torch.testing.assert_close(model(ids, routing="full").logits, dense, atol=0, rtol=0)
        torch.testing.assert_close(model(ids, routing="topk").logits, dense, atol=1e-5, rtol=1e-5)
        calibrate_on_random_text(model)
        torch.testing.assert_close(
            model(ids, routing=model.config.inference_routing).logits, dense, atol=1e-5, rtol=1e-5
        )
        cache = ModelCache()
        steps = [model(ids[:, :10], cache=cache, routing="full").logits]
        for t in range(10, 16):
            steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, routing="full").logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sublayer", SUBLAYERS)
@pytest.mark.parametrize("arch", ROUTED)
def test_skip_map_fit_regresses_the_routed_sublayers_update(arch, sublayer):
    """The fit's explained variance is that of the least-squares map from the routed sub-layer's input to its update
    on the dense pass, both read here from the block's own modules (the state between the sub-layers is what the
    post-attention norm reads)."""
    model = routed(arch, sublayer, skip_map="linear", always_execute_first=1)
    batches = [random_ids(2, 24, seed=s) for s in range(4)]
    explained = fit_skip_maps(model, batches)
    seen: dict[int, list] = {}
    hooks = []
    for i, layer in model.routed_layers():
        block = layer.routed_block
        hooks.append(
            block.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i: seen.setdefault(i, []).append([a[0]])
            )
        )
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: seen[i][-1].extend([a[0], o])))
    with torch.no_grad():
        for ids in batches:
            model(ids, routing="full")
    for h in hooks:
        h.remove()
    for i, layer in model.routed_layers():
        pairs = [((x, h) if sublayer == "attention" else (h, y)) for h, x, y in seen[i]]
        inp = torch.cat([a[:, 1:] for a, _ in pairs]).flatten(0, 1)
        f = torch.cat([(b - a)[:, 1:] for a, b in pairs]).flatten(0, 1)
        with torch.no_grad():
            pred = layer.skip_map(inp)
        direct = 1 - (f - pred).pow(2).sum() / (f - f.mean(0)).pow(2).sum()
        assert explained[i] == pytest.approx(float(direct), abs=1e-4)
        assert explained[i] > 0.1


# --- training-time execution -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sublayer", SUBLAYERS)
@pytest.mark.parametrize("arch", ROUTED)
def test_trains_under_autocast_with_gradients_to_both_sublayers_and_the_routing(arch, sublayer):
    model = routed(arch, sublayer, skip_map="linear").train()
    ids = random_ids(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    for decisions in out.decisions.values():
        assert (decisions.sum(dim=1) == 16).all()  # Top-K keeps exactly k under autocast too
    (out.loss + out.aux_loss).backward()
    for _, layer in model.routed_layers():
        block = layer.routed_block
        for module in (block.self_attn.q_proj, block.mlp.down_proj):
            assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
        assert layer.student.fc2.weight.grad is not None


def test_an_unknown_value_is_refused_by_name():
    with pytest.raises(UserError, match=r"model\.routed_sublayer must be one of block, attention, mlp; got 'ffn'"):
        ModelConfig(arch="mod", routed_sublayer="ffn")


@pytest.mark.parametrize("sublayer", SUBLAYERS)
def test_stt_teacher_scores_the_whole_blocks_update(sublayer):
    """STT's teacher pass is the layer's dense function: the first routed layer (same input, same weights) computes
    the same surprise gate whether it routes its block or one sub-layer; only what then runs differs."""
    ids = random_ids(2, 16)
    whole, part = routed("stt", "block"), routed("stt", sublayer)
    with torch.no_grad():
        a, b = whole(ids, routing="topk"), part(ids, routing="topk")
    torch.testing.assert_close(b.scores[1]["gate"], a.scores[1]["gate"], atol=0, rtol=0)
    assert torch.equal(b.decisions[1], a.decisions[1])
    assert (b.logits - a.logits).abs().amax() > 1e-3
