"""STT: teacher executes exactly k tokens, TPN sees only the past, student mode is causal, cached generation with
real skipping equals the student-mode full forward, and routed KV caches hold exactly the executed tokens."""

from __future__ import annotations

import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import LanguageModel, ModelCache, ModelConfig, build_model
from sdt.models.stt import STTLayer
from sdt.routing.topk import capacity_k
from tests.models.conftest import calibrate_on_random_text, spread_routers, tiny_config, tiny_model


def stt(**kw) -> LanguageModel:
    """A tiny STT whose student and gate have some spread, calibrated on random text."""
    return calibrate_on_random_text(spread_routers(tiny_model("stt", **kw)))


def test_layout_alternates_standard_and_routed_layers():
    model = stt(n_layers=6, dense_first=1, dense_last=1)
    assert [type(layer).__name__ for layer in model.layers] == [
        "DenseLayer",
        "DenseLayer",
        "STTLayer",
        "DenseLayer",
        "STTLayer",
        "DenseLayer",
    ]


@pytest.mark.parametrize("T, capacity", [(16, 0.25), (20, 0.5), (7, 0.125)])
def test_teacher_executes_exactly_k_tokens_per_row(T, capacity):
    model = stt(capacity=capacity)
    out = model(torch.randint(0, 61, (3, T)), routing="topk")
    k = capacity_k(T, capacity)
    for layer, decisions in out.decisions.items():
        assert decisions.sum(dim=1).tolist() == [k, k, k], layer


def test_transition_network_sees_only_earlier_tokens():
    model = stt()
    layer = model.layers[1]
    seen = {}
    layer.transition.register_forward_hook(lambda m, inp, out: seen.__setitem__("pred", out[0].detach().clone()))
    ids = torch.randint(0, 61, (2, 12))
    model(ids, routing="topk")
    before = seen["pred"]
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 61
    model(changed, routing="topk")
    # The prediction for token t comes from token t-1: changing token 6 leaves predictions 0..6 unchanged.
    torch.testing.assert_close(seen["pred"][:, :7], before[:, :7])
    assert (seen["pred"][:, 7:] - before[:, 7:]).abs().max() > 0


@pytest.mark.parametrize("student_input", ["x", "x_prev"])
def test_student_mode_is_causal(student_input):
    model = stt(student_input=student_input)
    ids = torch.randint(0, 61, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 3) % 61
    a, b = model(ids, routing="student").logits, model(changed, routing="student").logits
    torch.testing.assert_close(a[:, :12], b[:, :12])


@pytest.mark.parametrize("sublayer", ["block", "attention", "mlp"])
@pytest.mark.parametrize("routing", ["student", "budget"])
@pytest.mark.parametrize("student_input", ["x", "x_prev"])
def test_cached_generation_equals_student_full_forward_and_caches_only_executed_tokens(
    student_input, routing, sublayer
):
    model = stt(student_input=student_input, routed_sublayer=sublayer)
    ids = torch.randint(0, 61, (1, 24))
    full = model(ids, routing=routing)
    cache = ModelCache()
    logits = [model(ids[:, :6], cache=cache, routing=routing).logits]
    for t in range(6, 24):
        logits.append(model(ids[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache, routing=routing).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full.logits, atol=1e-5, rtol=1e-4)
    for i, layer in enumerate(model.layers):
        kv = cache.layers.get((i, 0))
        n_kv = 0 if kv is None else kv.length
        if isinstance(layer, STTLayer) and sublayer != "mlp":  # routed attention: K/V of the executed tokens only
            executed = int(full.decisions[i].sum())
            assert n_kv == executed < 24  # exactly the executed tokens, and fewer than all
            if kv is not None:
                assert kv.pos[0].tolist() == torch.nonzero(full.decisions[i][0]).flatten().tolist()
        else:
            assert n_kv == 24


def test_generate_skips_and_saves_kv_memory():
    model = stt()
    dense = build_model(ModelConfig(**{**model.config.to_dict(), "arch": "dense"})).eval()
    prompt = torch.randint(0, 61, (1, 8))
    cache, dense_cache = ModelCache(), ModelCache()
    model.generate(prompt, 40, temperature=0.0, cache=cache)
    dense.generate(prompt, 40, temperature=0.0, cache=dense_cache)
    assert cache.nbytes() < dense_cache.nbytes()


def test_left_padded_batch_generation_matches_single_rows():
    model = stt()
    ids = torch.randint(0, 61, (2, 10))
    pad_mask = torch.ones(2, 10, dtype=torch.bool)
    pad_mask[0, :4] = False
    batched = model.generate(ids, 8, temperature=0.0, pad_mask=pad_mask)
    assert torch.equal(batched[0, 10:], model.generate(ids[:1, 4:], 8, temperature=0.0)[0, 6:])
    assert torch.equal(batched[1, 10:], model.generate(ids[1:], 8, temperature=0.0)[0, 10:])


def test_teacher_modes_refuse_cached_decoding():
    model = stt()
    with pytest.raises(UserError, match="routing=student"):
        model.generate(torch.randint(0, 61, (1, 4)), 3, routing="threshold")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"gate_mode": "soft"}, "gate_mode=ste"),
        ({"n_layers": 1}, ">= 2"),
        ({"capacity": 1.5}, "capacity"),
        ({"student_input": "x_next"}, "student_input"),
    ],
)
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(UserError, match=match):
        build_model(tiny_config("stt", **kw))
