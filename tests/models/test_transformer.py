import pytest
import torch

from sdt.blocks.layers import attention_mask
from sdt.common.errors import UserError
from sdt.models import DenseLayer, ModelCache, ModelConfig, RoutedLayer, build_model
from tests.conftest import tiny_model_config
from tests.models.conftest import random_ids, tiny_model


def tiny(**kw) -> ModelConfig:
    return tiny_model_config(**{"vocab_size": 97, **kw})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny()).eval()


def test_shapes_and_loss(model):
    ids = torch.randint(0, 97, (3, 11))
    out = model(ids, targets=torch.randint(0, 97, (3, 11)))
    assert out.logits.shape == (3, 11, 97)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # A fresh model predicts roughly uniformly: loss close to log(V).
    assert abs(out.loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_loss_does_not_shift_targets_again(model):
    ids = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    out = model(ids, targets=targets)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 97), targets.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_causality(model):
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 5) % 97
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_kv_cache_step_by_step_equals_full_forward(model):
    ids = torch.randint(0, 97, (2, 16))
    full = model(ids).logits
    cache = ModelCache()
    steps = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 16):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.num_entries() == 2 * 16  # two layers, every token cached once


def test_greedy_generation_equals_argmax_of_full_forward(model):
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, 10, temperature=0.0)
    assert out.shape == (2, 16)
    assert torch.equal(out[:, :6], prompt)
    logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


def test_left_padded_batch_generates_like_unpadded(model):
    ids = torch.randint(0, 97, (2, 8))
    pad_mask = torch.ones(2, 8, dtype=torch.bool)
    pad_mask[0, :3] = False  # row 0 is a 5-token prompt, left padded
    batched = model.generate(ids, 6, temperature=0.0, pad_mask=pad_mask)
    alone = model.generate(ids[:1, 3:], 6, temperature=0.0)
    assert torch.equal(batched[0, 8:], alone[0, 5:])
    alone1 = model.generate(ids[1:], 6, temperature=0.0)
    assert torch.equal(batched[1], alone1[0])


def test_sampling_respects_top_k_and_valid_vocab(model):
    torch.manual_seed(1)
    out = model.generate(torch.randint(0, 50, (4, 3)), 20, temperature=5.0, top_k=3, valid_vocab=50)
    assert out[:, 3:].max() < 50


def test_generation_beyond_max_seq_len_is_an_error(model):
    with pytest.raises(UserError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_tied_and_untied_embeddings():
    tied = build_model(tiny(tie_embeddings=True))
    untied = build_model(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() == tied.num_parameters() + 97 * 32


def test_qkv_bias_option():
    m = build_model(tiny(qkv_bias=True))
    attn = m.layers[0].block.self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_attention_mask_uses_positions_not_indices():
    q_pos = torch.tensor([[3, 7]])
    k_pos = torch.tensor([[0, 3, 5, 7, 9]])
    mask = attention_mask(q_pos, k_pos, torch.ones(1, 5, dtype=torch.bool))[0, 0]
    assert mask.tolist() == [[True, True, False, False, False], [True, True, True, True, False]]


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = build_model(tiny())
    ids = torch.randint(0, 97, (4, 16))
    targets = torch.roll(ids, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = m(ids, targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible"),
        ({"n_heads": 4, "n_kv_heads": 3}, "multiple of model.n_kv_heads"),
        ({"arch": "nope"}, "model.arch must be one of dense, sdt, stt, mod"),
        ({"n_layers": 0}, "positive"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(UserError, match=match):
        tiny(**kw)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown model option"):
        ModelConfig.from_dict({"d_modl": 32})


def test_left_pad_right_aligns_rows_and_masks_the_padding():
    from sdt.models.transformer import left_pad, positions_from_pad_mask

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert positions_from_pad_mask(mask)[1, -1] == 0  # the real token of the short row starts at position 0


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
def test_routed_layers_share_one_interface(arch):
    """The model finds its routed layers by type, and each score's threshold and grid are its owner's buffers, so
    calibration and the run-time dial write where routing reads."""
    model = tiny_model(arch, capacity=0.25, dense_first=1, dense_last=1)
    routed = model.routed_layers()
    assert [i for i, _ in routed] == [i for i, layer in enumerate(model.layers) if not isinstance(layer, DenseLayer)]
    assert model.is_routed and all(isinstance(layer, RoutedLayer) for _, layer in routed)
    assert sum(layer.n_blocks for layer in model.layers) == model.config.n_layers
    out = model(random_ids(2, 16), routing="threshold" if arch != "stt" else "student")
    for i, layer in routed:
        owners = layer.score_owners()
        assert set(layer.thresholds()) == set(layer.score_quantiles()) == set(owners) >= set(out.scores[i]) != set()
        for name, owner in owners.items():
            assert layer.thresholds()[name] is owner.threshold and layer.score_quantiles()[name] is owner.quantiles
        assert layer.kv_share == 0.25
    assert not tiny_model("dense").is_routed


@pytest.mark.parametrize("arch", ["dense", "sdt", "stt", "mod"])
def test_layer_stack_follows_the_one_layout_rule(arch):
    """build_layers and compute accounting read the same layer_kinds, so the stack built is the one counted."""
    from sdt.models import layer_kinds
    from sdt.models.sdt import SDTPair

    model = tiny_model(arch, n_layers=6, dense_first=1, dense_last=1)
    kinds = layer_kinds(model.config)
    built: list[str] = []
    for layer in model.layers:
        if isinstance(layer, SDTPair):
            built += ["decision", "dynamic"]
        else:
            built.append("block" if isinstance(layer, DenseLayer) else arch)
    assert built == kinds
    assert kinds[0] == kinds[-1] == "block" and (arch == "dense") == (set(kinds) == {"block"})


def test_aux_losses_take_the_configured_weights_and_an_unweighted_one_is_an_error():
    model = tiny_model("mod", prior_loss_weight=0.3, router_loss_weight=0.2, mod_zloss_weight=0.1).train()
    out = model(random_ids(2, 16))
    assert set(out.aux_losses) == {"zloss", "mod_router_bce", "router"}
    expected = 0.1 * out.aux_losses["zloss"] + 0.2 * (out.aux_losses["mod_router_bce"] + out.aux_losses["router"])
    torch.testing.assert_close(out.aux_loss, expected)

    model.aux_loss_weights.pop("zloss")
    with pytest.raises(ValueError, match=r"\['zloss'\] have no weight"):
        model(random_ids(2, 16))


@pytest.mark.parametrize("arch", ["sdt", "stt"])
def test_model_reaches_every_routed_layers_init_and_schedule(arch):
    """The model's generic init does not overwrite the zero-initialised priors, and training progress reaches every
    scheduled surprise gate (through RoutedLayer's hooks)."""
    model = tiny_model(arch, beta_mode="linear", beta_start=0.5, beta_end=4.0, n_layers=6)
    routed = [layer for _, layer in model.routed_layers()]
    assert len(routed) >= 2
    for layer in routed:
        prior = layer.prior if arch == "sdt" else layer.transition
        assert torch.count_nonzero(prior.down_proj.weight) == 0
    model.set_training_progress(1.0)
    for layer in routed:
        torch.testing.assert_close(layer.surprise.betas(), torch.tensor([4.0, 4.0]))
