"""The SDT model (docs/algorithms.md, section 7): routed execution, gates, causal modes, generation, options."""

import pytest
import torch
import torch.nn.functional as F

from sdt.common.errors import UserError
from sdt.models import DenseLayer, ModelCache
from sdt.models.sdt import SDTPair
from sdt.routing import capacity_k
from tests.models.conftest import VOCAB as V
from tests.models.conftest import calibrate_on_random_text, random_ids, tiny_config, tiny_model


def spread(**kw):
    """A model whose gate g takes well-separated values (an untrained default model's g is nearly constant), with a
    short moving-average window so that sequences and prompts outrun it."""
    return tiny_model("sdt", **{"init_std": 0.2, "beta_init": 5.0, "ma_window": 8, **kw})


def calibrated(**kw):
    return calibrate_on_random_text(spread(**kw), n_batches=4, shape=(4, 32), seed=123)


def capture(model):
    """Record each pair's input x, context, decision-layer output and LayerOutput on the next forward."""
    records = {}
    handles = []
    for i, layer in model.routed_layers():
        rec = records.setdefault(i, {})

        def pair_hook(module, args, output, rec=rec):
            rec["x"], rec["ctx"], rec["out"] = args[0], args[1], output

        def decision_hook(module, args, output, rec=rec):
            rec["post"] = output

        handles += [layer.register_forward_hook(pair_hook), layer.decision.register_forward_hook(decision_hook)]
    return records, handles


# --- Top-K in the stack -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 7, 16, 33])
@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5, 1.0])
def test_topk_executes_exactly_k_tokens_per_sequence(seq_len, capacity):
    model = tiny_model("sdt", capacity=capacity)
    out = model(random_ids(3, seq_len), routing="topk")
    k = capacity_k(seq_len, capacity)
    assert sorted(out.decisions) == [0, 1]
    for i, dec in out.decisions.items():
        assert dec.shape == (3, seq_len)
        assert dec.sum(dim=1).tolist() == [k, k, k]
        assert out.stats[f"layers.{i}.executed_fraction"].item() == pytest.approx(k / seq_len)


@pytest.mark.parametrize("routing", ["topk", "threshold", "student"])
def test_no_cross_sequence_leak(routing):
    model = calibrated()
    ids = random_ids(3, 20)
    changed = ids.clone()
    changed[1] = (changed[1] * 7 + 3) % V
    a, b = model(ids, routing=routing), model(changed, routing=routing)
    torch.testing.assert_close(a.logits[[0, 2]], b.logits[[0, 2]], atol=1e-5, rtol=1e-5)
    for i in a.decisions:
        assert torch.equal(a.decisions[i][[0, 2]], b.decisions[i][[0, 2]])
    assert (a.logits[1] - b.logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("routing", ["topk", "threshold", "student"])
@pytest.mark.parametrize("attention", ["selected", "full"])
def test_skipped_tokens_keep_the_decision_layer_output_exactly(routing, attention):
    model = calibrated(routed_attention=attention)
    records, handles = capture(model)
    model(random_ids(2, 24), routing=routing)
    for h in handles:
        h.remove()
    for rec in records.values():
        hidden, dec, post = rec["out"].hidden, rec["out"].decisions, rec["post"]
        assert dec.any() and not dec.all()
        assert torch.equal(hidden[~dec], post[~dec])
        assert (hidden[dec] != post[dec]).any(dim=-1).all()  # every executed token was updated


@pytest.mark.parametrize("routing", ["topk", "threshold"])
def test_dynamic_layer_equals_masked_reference(routing):
    """Selected tokens attend to the selected tokens of their own row, at their original positions (RoPE)."""
    model = calibrated()
    records, handles = capture(model)
    model(random_ids(3, 24), routing=routing)
    for h in handles:
        h.remove()
    for i, rec in records.items():
        layer, ctx, post, dec = model.layers[i], rec["ctx"], rec["post"], rec["out"].decisions
        ref = layer.dynamic(post, ctx.positions, ctx.rope, pad_mask=dec)  # every token; keys: selected only
        expected = torch.where(dec[..., None], ref, post)
        torch.testing.assert_close(rec["out"].hidden, expected, atol=1e-5, rtol=1e-4)
        # Renumbering the selected tokens 0..k-1 (same causal order, wrong RoPE phases) would give another result.
        renumbered = (dec.long().cumsum(dim=1) - 1).clamp(min=0)
        wrong = torch.where(dec[..., None], layer.dynamic(post, renumbered, ctx.rope, pad_mask=dec), post)
        assert (rec["out"].hidden - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("gate_mode", ["ste", "soft"])
def test_capacity_one_runs_the_dynamic_block_on_every_token(gate_mode):
    model = spread(capacity=1.0, gate_mode=gate_mode)
    records, handles = capture(model)
    out = model(random_ids(2, 16), routing="topk")
    for h in handles:
        h.remove()
    for i, rec in records.items():
        layer, ctx, post = model.layers[i], rec["ctx"], rec["post"]
        assert out.decisions[i].all()
        dense = layer.dynamic(post, ctx.positions, ctx.rope)
        if gate_mode == "ste":
            expected = dense  # the hard decision: exactly the full block
        else:
            expected = post + out.scores[i]["gate"][..., None] * (dense - post)
        torch.testing.assert_close(rec["out"].hidden, expected, atol=1e-5, rtol=1e-4)


def perturb_gate_parameters(model):
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.surprise.log_o_ce.add_(2.0)
            layer.surprise.log_m_cu.sub_(1.0)
            layer.surprise.beta_raw.add_(3.0)
            layer.prior.down_proj.weight.normal_(0.0, 0.5)


def test_ste_forward_does_not_depend_on_g_but_soft_does():
    # Capacity 1 selects every token whatever g is, so only the gate application can make g matter.
    ids = random_ids(2, 16)
    for gate_mode in ("ste", "soft"):
        model = spread(capacity=1.0, gate_mode=gate_mode)
        before = model(ids, routing="topk")
        perturb_gate_parameters(model)
        after = model(ids, routing="topk")
        assert (before.scores[0]["gate"] - after.scores[0]["gate"]).abs().max() > 1e-2  # g did change
        if gate_mode == "ste":
            assert torch.equal(before.logits, after.logits)
        else:
            assert (before.logits - after.logits).abs().max() > 1e-3


def test_lm_loss_trains_gate_scalars_and_prior():
    model = spread().train()
    ids = random_ids(2, 16)
    targets = random_ids(2, 16, seed=2)
    model(ids, targets).loss.backward()  # the LM loss alone, no auxiliary losses
    for _, layer in model.routed_layers():
        s = layer.surprise
        assert s.log_o_ce.grad != 0 and s.log_m_cu.grad != 0 and (s.beta_raw.grad != 0).all()
        # Step 0: the prior's output projection is zero, so only it receives gradient (through D_ch in CE);
        # the projections before it get exactly zero gradient until it has moved.
        assert layer.prior.down_proj.weight.grad.abs().sum() > 0
        assert not layer.prior.gate_proj.weight.grad.any() and not layer.prior.up_proj.weight.grad.any()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(ids, targets).loss.backward()
    for _, layer in model.routed_layers():
        for name, p in layer.prior.named_parameters():  # now every prior parameter learns from the LM loss
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prior_predicts_zero_at_init_and_its_loss_has_a_stopgrad_target():
    model = spread().train()
    out = model(random_ids(2, 16), routing="topk")
    # delta_hat = 0 at step 0, so D_ch = D_st and the prior loss is the mean static surprise.
    d_st = torch.stack([out.stats[f"layers.{i}.d_st"] for i, _ in model.routed_layers()]).mean()
    torch.testing.assert_close(out.aux_losses["prior"], d_st)
    assert out.aux_losses["prior"] > 0
    out.aux_losses["prior"].backward()
    assert model.layers[0].prior.down_proj.weight.grad.abs().sum() > 0
    # The target delta is detached: the prior loss does not reshape the decision block's update.
    for p in model.layers[0].decision.parameters():
        assert p.grad is None or not p.grad.any()


# --- Causal modes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["threshold", "student", "budget"])
@pytest.mark.parametrize("attention", ["selected", "full"])
def test_causal_modes_are_causal(routing, attention):
    model = calibrated(routed_attention=attention)
    ids = random_ids(2, 24)
    changed = ids.clone()
    changed[:, 14:] = (changed[:, 14:] + 5) % V
    a, b = model(ids, routing=routing), model(changed, routing=routing)
    torch.testing.assert_close(a.logits[:, :14], b.logits[:, :14], atol=1e-5, rtol=1e-5)
    assert (a.logits[:, 14:] - b.logits[:, 14:]).abs().max() > 1e-3
    for i in a.decisions:
        assert a.decisions[i][:, :14].any() and not a.decisions[i][:, :14].all()  # decisions are not trivial
        assert torch.equal(a.decisions[i][:, :14], b.decisions[i][:, :14])
        for name in ("gate", "student"):  # both scores are causal, whichever one routes
            torch.testing.assert_close(a.scores[i][name][:, :14], b.scores[i][name][:, :14])


def test_full_context_attention_differs_from_selected():
    ids = random_ids(2, 16)
    full = tiny_model("sdt", routed_attention="full")(ids, routing="topk")
    selected = tiny_model("sdt", routed_attention="selected")(ids, routing="topk")
    assert torch.equal(full.decisions[0], selected.decisions[0])  # same weights, same first-pair selection
    assert (full.logits - selected.logits).abs().max() > 1e-4


@pytest.mark.parametrize("sublayer", ["block", "attention", "mlp"])
@pytest.mark.parametrize("routing", ["threshold", "student", "budget"])
@pytest.mark.parametrize("attention", ["selected", "full"])
def test_cached_decoding_equals_full_forward(routing, attention, sublayer):
    model = calibrated(routed_attention=attention, routed_sublayer=sublayer)
    ids = random_ids(2, 20)
    full = model(ids, routing=routing)
    cache = ModelCache()
    steps = [model(ids[:, :6], cache=cache, routing=routing).logits]
    for t in range(6, 20):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, routing=routing).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, atol=1e-5, rtol=1e-4)
    for i, _ in model.routed_layers():
        assert cache.layers[(i, 0)].valid.sum() == 2 * 20  # the decision layer caches every token
        dynamic = cache.layers[(i, 1)].valid.sum()
        if attention == "selected" and sublayer != "mlp":
            assert dynamic == full.decisions[i].sum()  # routed K/V only for the executed tokens
            assert dynamic < 2 * 20
        else:  # every token's K/V: full-context attention, or attention not routed
            assert dynamic == 2 * 20


@pytest.mark.parametrize("routing", ["threshold", "student", "budget"])
def test_greedy_generation_equals_repeated_full_forwards(routing):
    model = calibrated()
    prompt = random_ids(2, 6)
    out = model.generate(prompt, 12, temperature=0.0, routing=routing)
    assert out.shape == (2, 18) and torch.equal(out[:, :6], prompt)
    logits = model(out[:, :-1], routing=routing).logits  # causal mode: one forward gives every step's logits
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


@pytest.mark.parametrize("routing", ["threshold", "student", "budget"])
def test_left_padded_batch_generates_like_unpadded(routing):
    model = calibrated()
    ids = random_ids(2, 8)
    pad_mask = torch.ones(2, 8, dtype=torch.bool)
    pad_mask[0, :3] = False  # row 0 is a 5-token prompt, left padded
    batched = model.generate(ids, 8, temperature=0.0, pad_mask=pad_mask, routing=routing)
    alone0 = model.generate(ids[:1, 3:], 8, temperature=0.0, routing=routing)
    alone1 = model.generate(ids[1:], 8, temperature=0.0, routing=routing)
    assert torch.equal(batched[0, 8:], alone0[0, 5:])
    assert torch.equal(batched[1], alone1[0])


def test_topk_generation_is_refused():
    model = tiny_model("sdt")
    with pytest.raises(UserError, match="causal"):
        model.generate(random_ids(1, 4), 3, routing="topk")


# --- Losses -------------------------------------------------------------------------------------------------------


def test_lm_loss_uses_targets_unshifted_and_excludes_auxiliary_losses():
    model = tiny_model("sdt").train()
    ids, targets = random_ids(2, 12), random_ids(2, 12, seed=2)
    targets[0, :3] = -100
    out = model(ids, targets, routing="topk")
    expected = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_losses["prior"] > 0 and out.aux_losses["router"] > 0
    weighted = 0.05 * out.aux_losses["prior"] + 0.01 * out.aux_losses["router"]
    torch.testing.assert_close(out.aux_loss, weighted)


@pytest.mark.parametrize(
    "sublayer",
    ["block", pytest.param("attention", marks=pytest.mark.slow), pytest.param("mlp", marks=pytest.mark.slow)],
)
def test_topk_forward_has_no_graph_breaks_or_host_syncs(sublayer):
    """fullgraph tracing fails on `.item()`/`int(tensor)` syncs and on `torch._dynamo.disable` in the routed path."""
    model = tiny_model("sdt", routed_sublayer=sublayer, skip_map="linear").train()
    ids = random_ids(2, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(ids, ids, routing="topk")
    torch.testing.assert_close(out.logits, model(ids, ids, routing="topk").logits)
    (out.loss + out.aux_loss).backward()


# --- Options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -0.5}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"capacity": "0.5"}, "capacity"),
        ({"gate_rule": "and"}, "gate_rule"),
        ({"gate_mode": "hard"}, "gate_mode"),
        ({"change_surprise": "l2"}, "change_surprise"),
        ({"beta_mode": "exp"}, "beta_mode"),
        ({"routed_attention": "none"}, "routed_attention"),
        ({"n_layers": 3}, "even"),
        ({"n_layers": 4, "dense_first": 1}, "even"),
        ({"n_layers": 4, "dense_first": 2, "dense_last": 2}, "even"),
        ({"n_layers": 4, "dense_first": 3, "dense_last": 2}, "exceeds"),
        ({"dense_first": -1}, "dense_first"),
    ],
)
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(UserError, match=match):
        tiny_config("sdt", **kw)


@pytest.mark.parametrize(
    "kw, kinds",
    [
        ({"n_layers": 4}, [SDTPair, SDTPair]),
        ({"n_layers": 6, "dense_first": 1, "dense_last": 1}, [DenseLayer, SDTPair, SDTPair, DenseLayer]),
        ({"n_layers": 4, "dense_first": 2}, [DenseLayer, DenseLayer, SDTPair]),
        ({"n_layers": 3, "dense_last": 1}, [SDTPair, DenseLayer]),
    ],
)
def test_dense_first_and_last_build_the_expected_stack(kw, kinds):
    model = tiny_model("sdt", **kw)
    assert [type(layer) for layer in model.layers] == kinds
    routed = [i for i, k in enumerate(kinds) if k is SDTPair]
    assert [i for i, _ in model.routed_layers()] == routed
    out = model(random_ids(2, 8), routing="topk")
    assert sorted(out.decisions) == routed


def test_prior_width():
    assert tiny_config("sdt", d_model=32).prior_hidden_size == 2  # ceil(0.0625 * 32) = 2
    assert tiny_config("sdt", d_model=48).prior_hidden_size == 4  # 3, rounded up to even
    assert tiny_config("sdt", d_model=256).prior_hidden_size == 16
    assert tiny_config("sdt", d_model=16).prior_hidden_size == 2  # at least 2
    assert tiny_model("sdt", d_model=48).layers[0].prior.gate_proj.out_features == 4


def test_position_consensus_is_a_training_statistic_not_a_decoding_one():
    """The routing-collapse statistic is per batch of whole sequences: logged by full forwards, skipped per decode step
    (where it would cost ops on every token and mean nothing for one token)."""
    model = calibrated()
    ids = random_ids(4, 16)
    stats = model(ids).stats
    consensus = {k: v for k, v in stats.items() if k.endswith("position_consensus")}
    assert consensus and all(0 <= float(v) <= 1 for v in consensus.values())
    assert not any(k.endswith("position_consensus") for k in model(ids, diagnostics=False).stats)
    cached = model(ids[:, :4], cache=ModelCache(), routing="threshold").stats
    assert not any(k.endswith("position_consensus") for k in cached)
