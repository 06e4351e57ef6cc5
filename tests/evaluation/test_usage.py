"""Compute per request: the executed fraction, FLOPs and KV bytes each generated sequence really spent."""

import pytest
import torch

from sdt.evaluation.usage import request_usage, usage_distribution
from sdt.models import ModelCache, build_model
from sdt.models.calibration import calibrate_thresholds
from tests.conftest import tiny_model_config

V = 97


def model(arch: str = "sdt", **kw):
    # 4 layers: two SDT pairs, two routed STT/MoD layers; 128 positions for prompt and generation.
    cfg = {"arch": arch, "vocab_size": V, "n_layers": 4, "max_seq_len": 128}
    cfg.update(init_std=0.2, beta_init=5.0, ma_window=8, **kw)
    torch.manual_seed(0)
    m = build_model(tiny_model_config(**cfg)).eval()
    g = torch.Generator().manual_seed(3)
    calibrate_thresholds(m, [torch.randint(0, V, (4, 64), generator=g) for _ in range(4)])
    return m


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
def test_usage_counts_what_ran_per_sequence(arch):
    m = model(arch)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, :5] = False  # row 0: a 7-token prompt
    cache = ModelCache()
    out = m.generate(ids, 30, temperature=0.0, pad_mask=pad, cache=cache)
    usage = request_usage(m, cache, 30)
    assert [u.tokens for u in usage] == [7 + 29, 12 + 29]  # the last sampled token is never fed back
    # Recount from one full causal forward over what each row processed.
    for b, u in enumerate(usage):
        seq = out[b : b + 1, (5 if b == 0 else 0) : -1]
        full = m(seq, routing=m.config.inference_routing)
        for i, dec in full.decisions.items():
            assert u.executed_fraction[i] == pytest.approx(dec.float().mean().item())
        dense_kv = 4 * u.tokens * 2 * 32 // 4 * 2 * 4  # layers * tokens * kv heads * head_dim * (k, v) * 4 bytes
        assert u.kv_bytes_ratio_vs_dense == pytest.approx(u.kv_bytes / dense_kv)
        assert 0 < u.kv_bytes_ratio_vs_dense < 1 and 0 < u.flops_ratio_vs_dense < 1
    # The per-sequence bytes sum to the cache's valid entries.
    assert sum(u.kv_bytes for u in usage) == int(cache.nbytes_per_sequence().sum())


def test_a_lower_capacity_request_is_charged_less():
    m = model("sdt")
    prompt = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(5))
    charged = {}
    for capacity in (0.25, 0.75):
        cache = ModelCache()
        m.generate(prompt, 60, temperature=0.0, cache=cache, capacity=capacity, routing="budget")
        charged[capacity] = request_usage(m, cache, 60)[0]
    low, high = charged[0.25], charged[0.75]
    assert low.flops < high.flops and low.kv_bytes < high.kv_bytes
    assert abs(low.mean_executed_fraction - 0.25) <= 0.02 and abs(high.mean_executed_fraction - 0.75) <= 0.02


def test_dense_requests_execute_everything_and_the_distribution_summarises():
    m = model("dense")
    cache = ModelCache()
    m.generate(torch.randint(0, V, (3, 6)), 10, temperature=0.0, cache=cache)
    usage = request_usage(m, cache, 10)
    assert all(u.mean_executed_fraction == 1.0 and u.kv_bytes_ratio_vs_dense == 1.0 for u in usage)
    assert all(u.flops_ratio_vs_dense == pytest.approx(1.0) for u in usage)
    dist = usage_distribution(usage)
    assert dist["tokens"] == {"min": 15.0, "median": 15.0, "mean": 15.0, "p90": 15.0, "max": 15.0}
