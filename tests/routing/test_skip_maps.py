"""Skip maps: skipped tokens get the map's estimate, executed tokens do not; the closed-form fit is the least-squares
solution; a model with skip maps decodes as its full forward computes; conversions fit them to the dense pass."""

import pytest
import torch
import torch.nn.functional as F

from sdt.blocks.layers import Block, RotaryEmbedding
from sdt.models import ModelCache, ModelConfig
from sdt.models.skip_map_fit import fit_skip_maps
from sdt.routing import SkipMap, UpdateStatistics, execute_tokens, topk_indices
from sdt.routing import skip_maps as skip_maps_module
from sdt.routing.skip_maps import add_skip_estimate
from tests.models.conftest import calibrate_on_random_text, random_ids, spread_routers, tiny_config, tiny_model

ROUTED = ["sdt", "stt", "mod"]


def randomize(skip_map: SkipMap, std: float = 0.2, seed: int = 0) -> SkipMap:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in skip_map.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return skip_map


def block_with_skip_map(batch: int, seq: int, k: int, seed: int):
    """A tiny block with a nonzero skip map, inputs (batch, seq, D), positions and a random Top-K of k per row."""
    torch.manual_seed(0)
    cfg = tiny_config("sdt")
    block, rope = Block(cfg).eval(), RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(batch, seq, cfg.d_model)
    positions = torch.arange(seq).expand(batch, seq)
    idx = topk_indices(torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)), k)
    return block, rope, randomize(SkipMap(cfg.d_model)), x, positions, idx


def test_skipped_tokens_get_the_estimate_and_executed_tokens_the_block():
    block, rope, skip_map, x, positions, idx = block_with_skip_map(2, 12, 5, seed=3)
    args = (block, x, positions, rope, idx, None, None, "ste")
    plain, executed = execute_tokens(*args)
    with_map, executed_too = execute_tokens(*args, skip_map=skip_map)
    assert torch.equal(executed, executed_too) and int(executed.sum()) == 10
    torch.testing.assert_close(with_map[executed], plain[executed], atol=0, rtol=0)
    torch.testing.assert_close(with_map[~executed], x[~executed] + skip_map(x)[~executed])
    # No token executes: every token gets the estimate.
    none, nothing = execute_tokens(block, x, positions, rope, None, None, None, "ste", skip_map=skip_map)
    assert not nothing.any()
    torch.testing.assert_close(none, x + skip_map(x))


def test_top_k_gathers_the_skipped_tokens_without_reading_a_count_on_the_host(monkeypatch):
    """Top-K skips T - K tokens in every row: the skip map's gather must not count them (a host sync per layer,
    and a graph break under torch.compile), and must give what counting gives."""
    block, rope, skip_map, x, positions, idx = block_with_skip_map(3, 10, 4, seed=1)
    args = (block, x, positions, rope, idx, None, None, "ste")
    plain, executed = execute_tokens(*args)
    counted = add_skip_estimate(plain, x, executed, None, skip_map)  # the counting path, as the causal modes take

    def no_host_count(*_args, **_kwargs):
        raise AssertionError("Top-K execution counted the skipped tokens")

    monkeypatch.setattr(skip_maps_module, "pack_decisions", no_host_count)
    static, executed_too = execute_tokens(*args, skip_map=skip_map)
    assert torch.equal(executed, executed_too)
    torch.testing.assert_close(static, counted, atol=0, rtol=0)
    torch.testing.assert_close(static[~executed], x[~executed] + skip_map(x)[~executed])
    # Every token executes (capacity 1.0): nothing to estimate.
    everything = torch.arange(10).expand(3, 10)
    full, _ = execute_tokens(block, x, positions, rope, everything, None, None, "ste", skip_map=skip_map)
    torch.testing.assert_close(full, block(x, positions, rope))


def test_padding_gets_no_estimate():
    cfg = tiny_config("sdt")
    torch.manual_seed(0)
    block, rope = Block(cfg).eval(), RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    skip_map = randomize(SkipMap(cfg.d_model))
    x = torch.randn(1, 6, cfg.d_model)
    pad = torch.tensor([[False, False, True, True, True, True]])
    out, _ = execute_tokens(
        block, x, torch.arange(6)[None], rope, None, None, None, "ste", pad_mask_BT=pad, skip_map=skip_map
    )
    assert torch.equal(out[:, :2], x[:, :2])
    torch.testing.assert_close(out[:, 2:], x[:, 2:] + skip_map(x[:, 2:]))


def test_fit_is_the_least_squares_map_and_reports_its_explained_variance():
    D, N = 8, 3000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g) * torch.linspace(0.5, 4, N)[:, None]  # norms vary: the map reads norm(x)
    W, b = torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    f = F.rms_norm(x, (D,), eps=1e-6) @ W + b + 0.1 * torch.randn(N, D, generator=g)
    stats = UpdateStatistics(D)
    for part in range(3):  # the sums accumulate over batches
        stats.add(x[part::3], f[part::3])
    skip_map = SkipMap(D)
    explained = skip_map.fit(stats, ridge=1e-9)
    with torch.no_grad():
        pred = skip_map(x)
    direct = 1 - (f - pred).pow(2).sum() / (f - f.mean(0)).pow(2).sum()
    assert explained == pytest.approx(float(direct), abs=1e-6)
    # The reference: ordinary least squares on [norm(x), 1].
    z1 = torch.cat([F.rms_norm(x, (D,), eps=1e-6), torch.ones(N, 1)], 1).double()
    ref = z1 @ torch.linalg.lstsq(z1, f.double()).solution
    torch.testing.assert_close(pred.double(), ref, atol=1e-4, rtol=0)
    assert explained > 0.97  # the noise is the only thing the map leaves


@pytest.mark.parametrize("arch", ROUTED)
def test_skip_maps_start_at_zero_so_the_model_is_unchanged(arch):
    model = tiny_model(arch, skip_map="linear")
    ids = random_ids(2, 20)
    with_maps = model(ids, routing="topk").logits
    for _, layer in model.routed_layers():
        layer.skip_map = None
    assert torch.equal(with_maps, model(ids, routing="topk").logits)


@pytest.mark.parametrize("arch", ROUTED)
def test_cached_decoding_with_skip_maps_equals_the_full_forward(arch):
    model = spread_routers(tiny_model(arch, capacity=0.5, skip_map="linear"))
    for i, (_, layer) in enumerate(model.routed_layers()):
        randomize(layer.skip_map, seed=i)
    calibrate_on_random_text(model)
    mode = model.config.inference_routing
    ids = random_ids(2, 16)
    full = model(ids, routing=mode)
    executed = torch.stack([d.float() for d in full.decisions.values()]).mean()
    assert 0 < executed < 1  # some tokens skip, so the estimates matter
    cache = ModelCache()
    steps = [model(ids[:, :6], routing=mode, cache=cache).logits]
    for t in range(6, 16):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), routing=mode, cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ROUTED)
def test_fitting_uses_each_routed_blocks_dense_updates_past_the_forced_positions(arch):
    model = tiny_model(arch, skip_map="linear", always_execute_first=1)
    batches = [random_ids(2, 24, seed=s) for s in range(4)]
    explained = fit_skip_maps(model, batches)
    routed = model.routed_layers()
    assert sorted(explained) == [i for i, _ in routed]
    # The same regression, done directly on what the dense pass feeds each routed block (position 0 left out).
    inputs = {}
    hooks = [
        layer.routed_block.register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, []).append((a[0], o)))
        for i, layer in routed
    ]
    with torch.no_grad():
        for ids in batches:
            model(ids, routing="full")
    for h in hooks:
        h.remove()
    for i, layer in routed:
        x = torch.cat([a[:, 1:] for a, _ in inputs[i]]).flatten(0, 1)
        f = torch.cat([(o - a)[:, 1:] for a, o in inputs[i]]).flatten(0, 1)
        with torch.no_grad():
            pred = layer.skip_map(x)
        direct = 1 - (f - pred).pow(2).sum() / (f - f.mean(0)).pow(2).sum()
        assert explained[i] == pytest.approx(float(direct), abs=1e-4)
        assert explained[i] > 0.1


def test_skip_map_options_are_validated_by_name():
    from sdt.common.errors import UserError

    saved = tiny_config("sdt", skip_map="linear").to_dict()  # a config or checkpoint from before low-rank maps went
    with pytest.raises(UserError, match="model.skip_map_rank=8: model.skip_map_rank was removed: low-rank"):
        ModelConfig.from_dict({**saved, "skip_map_rank": 8})
    assert ModelConfig.from_saved({**saved, "skip_map_rank": 0}).skip_map == "linear"  # its old default loads
    with pytest.raises(UserError, match="model.skip_map_fit_blocks .* model.skip_map=linear"):
        tiny_config("sdt", skip_map_fit_blocks=4)
    with pytest.raises(UserError, match="model.skip_map must be one of"):
        tiny_config("sdt", skip_map="mlp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_skipped", [None, 6])
def test_skip_estimate_under_autocast_keeps_the_residual_stream_dtype(dtype, n_skipped):
    """Under mixed precision the map's matmul runs in half precision while the residual stream stays fp32; adding
    the estimate must cast it back (a dtype mismatch in scatter_add crashed the first bf16-mixed step)."""
    block, rope, skip_map, x, positions, idx = block_with_skip_map(2, 10, 4, seed=2)
    plain, executed = execute_tokens(block, x, positions, rope, idx, None, None, "ste")
    with torch.autocast("cpu", dtype=dtype):
        mixed = add_skip_estimate(plain, x, executed, None, skip_map, n_skipped=n_skipped)
    assert mixed.dtype == torch.float32
    exact = add_skip_estimate(plain, x, executed, None, skip_map, n_skipped=n_skipped)
    torch.testing.assert_close(mixed, exact, atol=2e-2, rtol=2e-2)
