"""Layer paths (`layer_path=`): running a chosen sequence of the stack's layers, with skips and repeats."""

import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import ModelCache, build_model
from sdt.models.calibration import calibrate_thresholds
from sdt.models.transformer import MAX_PATH_FACTOR
from tests.models.test_transformer import tiny

V = 97  # the vocabulary of tests.models.test_transformer.tiny


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny(n_layers=4)).eval()


def test_identity_path_equals_normal_forward_exactly(model):
    ids = torch.randint(0, V, (2, 12))
    assert torch.equal(model(ids, layer_path=[0, 1, 2, 3]).logits, model(ids).logits)


def test_skipped_layer_equals_a_model_without_it(model):
    ids = torch.randint(0, V, (2, 12))
    shorter = build_model(tiny(n_layers=3)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for new, old in enumerate([0, 1, 3]):  # layer 2 removed
        prefix = f"layers.{old}."
        state.update(
            {f"layers.{new}." + k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
        )
    shorter.load_state_dict(state)
    expected = shorter(ids).logits
    torch.testing.assert_close(model(ids, layer_path=[0, 1, 3]).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(model(ids).logits, expected)  # the skip really changed the output


def test_repeated_layer_with_cache_equals_uncached_forward(model):
    path = [0, 1, 1, 2, 3, 3, 3]
    ids = torch.randint(0, V, (2, 16))
    full = model(ids, layer_path=path).logits
    assert not torch.allclose(full, model(ids).logits)
    cache = ModelCache()
    steps = [model(ids[:, :5], cache=cache, layer_path=path).logits]
    for t in range(5, 16):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, layer_path=path).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # One cache slot per path position, each holding every token once: a repeat neither overwrites nor appends twice.
    assert len(cache.layers) == len(path)
    assert all(c.length == 16 for c in cache.layers.values())


def test_greedy_generation_on_a_path_equals_argmax_of_the_uncached_forward(model):
    path = [0, 2, 2, 1]
    prompt = torch.randint(0, V, (2, 6))
    out = model.generate(prompt, 8, temperature=0.0, layer_path=path)
    logits = model(out[:, :-1], layer_path=path).logits
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])
    assert not torch.allclose(logits, model(out[:, :-1]).logits)  # the path is not the plain stack


def test_routed_model_repeats_a_layer_causally():
    """An STT model in its causal (student) mode: cached decoding over a repeated routed layer matches the full forward."""
    torch.manual_seed(0)
    model = build_model(tiny(arch="stt", vocab_size=61, n_layers=4)).eval()
    calibrate_thresholds(
        model, [torch.randint(0, 61, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    )
    path = [0, 1, 2, 2, 3]
    ids = torch.randint(0, 61, (1, 14))
    full = model(ids, routing="student", layer_path=path).logits
    cache = ModelCache()
    steps = [model(ids[:, :4], cache=cache, routing="student", layer_path=path).logits]
    for t in range(4, 14):
        pos = torch.full((1, 1), t)
        steps.append(model(ids[:, t : t + 1], positions=pos, cache=cache, routing="student", layer_path=path).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ([], "layer_path is empty"),
        ([0, 4], r"out of range \[4\]: the model has layers 0..3"),
        ([-1, 0], r"out of range \[-1\]"),
        ([0] * (MAX_PATH_FACTOR * 4 + 1), "over the bound"),
    ],
)
def test_bad_paths_are_clear_errors(model, path, match):
    ids = torch.randint(0, V, (1, 4))
    with pytest.raises(UserError, match=match):
        model(ids, layer_path=path)
    with pytest.raises(UserError, match=match):
        model.generate(ids, 2, layer_path=path)
