"""Conversion-recipe options that every routed model shares: the dense function (routing="full"), the MoD
straight-through gate, always-executed leading positions; the capacity schedule's removal."""

import pytest
import torch

from sdt.models import ModelCache, ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds
from tests.conftest import tiny_model_config
from tests.models.conftest import dense_twin

V = 97
ROUTED = ["sdt", "stt", "mod"]


def tiny(arch: str, **kw) -> ModelConfig:
    # 4 layers: two SDT pairs, two routed STT/MoD layers; spread-out gates (init_std, beta_init) and a short window.
    base = {"arch": arch, "vocab_size": V, "n_layers": 4, "init_std": 0.2, "beta_init": 5.0, "ma_window": 8}
    return tiny_model_config(**{**base, **kw})


def build(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny(arch, **kw)).eval()


def ids_like(*shape, seed: int = 1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ROUTED)
def test_full_routing_is_the_backbone_run_densely(arch):
    model = build(arch, mod_gate="sigmoid")  # even MoD's router weight is not applied in the dense function
    ids = ids_like(2, 24)
    out = model(ids, routing="full")
    assert torch.equal(out.logits, dense_twin(model)(ids).logits)
    assert all(bool(d.all()) for d in out.decisions.values())


@pytest.mark.parametrize("arch", ROUTED)
def test_full_routing_decodes_with_a_cache_like_the_full_forward(arch):
    model = build(arch)
    ids = ids_like(1, 12)
    full = model(ids, routing="full").logits
    cache = ModelCache()
    steps = [model(ids[:, :8], cache=cache, routing="full").logits]
    for t in range(8, 12):
        steps.append(model(ids[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache, routing="full").logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_mod_ste_gate_at_capacity_one_is_exactly_the_dense_function_and_trains_the_router():
    model = build("mod", mod_gate="ste", capacity=1.0).train()
    ids = ids_like(2, 16)
    out = model(ids, ids)
    # Up to float rounding of the gathered attention (the same blocks, the same tokens, full updates).
    torch.testing.assert_close(out.logits, model(ids, routing="full").logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    router_grads = [layer.router.proj.weight.grad for _, layer in model.routed_layers()]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_mod_sigmoid_gate_at_capacity_one_changes_the_function():
    # The reason for the ste option: the default sigmoid weight halves-ish every routed update at step 0.
    model = build("mod", mod_gate="sigmoid", capacity=1.0)
    ids = ids_like(2, 16)
    assert not torch.allclose(model(ids).logits, model(ids, routing="full").logits)


@pytest.mark.parametrize("arch", ROUTED)
@pytest.mark.parametrize("mode", ["topk", "threshold", "student"])
def test_leading_positions_execute_in_every_mode(arch, mode):
    model = build(arch, always_execute_first=3, capacity=0.25)
    for _, layer in model.routed_layers():
        for buf in layer.thresholds().values():
            buf.fill_(1e9)  # no token passes a causal threshold: only the forced ones execute
    out = model(ids_like(2, 32), routing=mode)
    for decisions in out.decisions.values():
        assert decisions[:, :3].all()
        if mode != "topk":
            assert not decisions[:, 3:].any()
        else:
            assert int(decisions.sum(dim=1).max()) == 8  # still k = 0.25 * 32, the forced ones inside


@pytest.mark.parametrize("arch", ROUTED)
def test_leading_positions_in_cached_generation_match_the_full_forward(arch):
    model = build(arch, always_execute_first=2)
    g = torch.Generator().manual_seed(5)
    calibrate_thresholds(model, [torch.randint(0, V, (4, 32), generator=g) for _ in range(2)])
    mode = model.config.inference_routing
    ids = ids_like(1, 20)
    full = model(ids, routing=mode)
    cache = ModelCache()
    steps = [model(ids[:, :1], cache=cache, routing=mode).logits]  # a 1-token prompt: position 1 is decoded
    for t in range(1, 20):
        steps.append(model(ids[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache, routing=mode).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=1e-4, atol=1e-4)


def test_calibration_counts_the_leading_positions_inside_the_capacity():
    model = build("sdt", always_execute_first=4, capacity=0.5)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (4, 32), generator=g) for _ in range(4)]
    calibrate_thresholds(model, batches)
    executed = torch.cat([model(b, routing="threshold").decisions[1].float() for b in batches])
    assert executed[:, :4].all()
    assert abs(float(executed.mean()) - 0.5) < 0.03  # 4 forced + the threshold's share = half the tokens


@pytest.mark.parametrize("arch", ROUTED)
def test_training_progress_leaves_the_capacity_in_force(arch):
    model = build(arch, capacity=0.25)
    for progress in (0.0, 0.6, 1.0):
        model.set_training_progress(progress)
        assert model.capacity_in_force == 0.25


def test_the_capacity_schedule_was_removed_and_old_configs_still_load():
    from sdt.common.errors import UserError

    old = {**tiny("sdt").to_dict(), "capacity_start": 1.0, "capacity_warmup": 0.3, "capacity_levels": 4}
    with pytest.raises(UserError, match=r"model.capacity_start was removed: .*2.2% worse"):
        ModelConfig.from_dict(old)  # a user's config that asks for the schedule
    # Off (its defaults), as every config without a schedule stored it: accepted.
    off = {**tiny("sdt").to_dict(), "capacity_start": None, "capacity_warmup": 0.5, "capacity_schedule": "linear"}
    assert ModelConfig.from_dict(off) == tiny("sdt")
    # A checkpoint trained with the schedule ended it at model.capacity: it loads as the model it is.
    assert ModelConfig.from_saved(old) == tiny("sdt")


@pytest.mark.parametrize("key,value,match", [
    ("always_execute_first", -1, "always_execute_first"),
    ("mod_gate", "hard", "mod_gate"),
])  # fmt: skip
def test_recipe_options_are_validated_by_name(key, value, match):
    from sdt.common.errors import UserError

    with pytest.raises(UserError, match=match):
        tiny("sdt", **{key: value})


def test_student_norm_makes_the_student_scale_free():
    model = build("sdt", student_norm=True)
    student = model.routed_layers()[0][1].student
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(student(x), student(x * 50.0), rtol=1e-4, atol=1e-4)
