"""The in-place KV cache: preallocated buffers written by index, growth beyond them, per-row lengths, and the same
entries as concatenating every step's keys and values."""

from __future__ import annotations

import pytest
import torch

from sdt.blocks.kv_cache import RESERVE_SLACK, KVCache
from sdt.models import ModelCache, build_model
from tests.conftest import tiny_model_config


def _entries(B: int, S: int, start: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, 2, S, 4, generator=g), torch.randn(B, 2, S, 4, generator=g)
    pos = torch.arange(start, start + S).expand(B, S).clone()
    valid = torch.rand(B, S, generator=g) > 0.3
    return k, v, pos, valid


def test_appends_equal_concatenation_and_grow_past_the_reservation():
    cache = KVCache(reserve=5)
    chunks = [_entries(3, s, start, seed) for seed, (s, start) in enumerate([(4, 0), (1, 4), (1, 5), (3, 6), (1, 9)])]
    for i, chunk in enumerate(chunks):
        k, v, pos, valid = cache.append(*chunk)
        n = sum(c[0].shape[2] for c in chunks[: i + 1])
        expected = [torch.cat([c[j] for c in chunks[: i + 1]], dim=2 if j < 2 else 1) for j in range(4)]
        for got, want in zip((k, v, pos, valid), expected, strict=True):
            assert torch.equal(got, want)
        assert cache.length == n
    assert cache.allocated == 10  # 5 reserved, doubled once when the fourth chunk did not fit
    assert cache.nbytes() == 2 * 3 * 2 * 10 * 4 * 4  # K and V of the 10 written entries, not of the buffers
    assert cache.reserved_nbytes() == cache.nbytes()


def test_views_returned_earlier_are_not_overwritten_by_later_appends():
    cache = KVCache(reserve=8)
    k0, *_ = cache.append(*_entries(1, 2, 0, 0))
    before = k0.clone()
    cache.append(*_entries(1, 3, 2, 1))
    assert torch.equal(k0, before) and k0.shape[2] == 2


def test_per_row_valid_entries_count_per_sequence():
    cache = KVCache(reserve=16)
    k, v, pos, _ = _entries(2, 4, 0, 0)
    cache.append(k, v, pos, torch.tensor([[False, False, True, True], [True, True, True, True]]))
    cache.append(*_entries(2, 1, 4, 1)[:3], torch.tensor([[True], [False]]))
    per_entry = 2 * 4 * 4 * 2
    assert cache.nbytes_per_sequence().tolist() == [3 * per_entry, 4 * per_entry]


def test_generate_reserves_prompt_plus_new_tokens_once():
    cfg = tiny_model_config(vocab_size=61)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cache = ModelCache()
    model.generate(torch.randint(0, 61, (2, 5)), 7, temperature=0.0, cache=cache)
    assert cache.max_tokens == 12
    for site in cache.layers.values():
        assert site.allocated == 12 and site.length == 11  # the last sampled token is never fed


def test_routed_site_reserves_its_share_and_decodes_like_the_full_forward():
    cfg = tiny_model_config("mod", vocab_size=61, capacity=0.25, max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 61, (2, 40))
    full = model(ids, routing="student").logits
    cache = ModelCache(max_tokens=200)
    steps = [model(ids[:, :3], cache=cache, routing="student").logits]
    for t in range(3, 40):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, routing="student").logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    routed = cache.layers[(1, 0)]
    assert routed.allocated >= min(200, 50 + RESERVE_SLACK) and cache.layers[(0, 0)].allocated == 200
    assert routed.allocated < 200 or routed.length > 50 + RESERVE_SLACK


def test_select_rows_keeps_each_row_of_every_site_its_state_and_its_counts():
    """Beam search: after select_rows(rows), row i of everything the cache holds is what row rows[i] held."""
    cache = ModelCache(max_tokens=8)
    k, v, pos, valid = _entries(3, 4, 0, seed=1)
    cache.get((0, 0)).append(k, v, pos, valid)
    cache.state[(0, "ma")] = (torch.arange(3.0)[:, None], torch.tensor([[True], [False], [True]]))
    cache.record_routed(0, torch.tensor([[True, False], [True, True], [False, False]]), None)
    rows = torch.tensor([2, 2, 0])
    cache.select_rows(rows)
    got = cache.get((0, 0))
    for have, want in zip((got.k, got.v, got.pos, got.valid), (k, v, pos, valid), strict=True):
        assert torch.equal(have, want[rows])
    assert torch.equal(cache.state[(0, "ma")][0][:, 0], torch.tensor([2.0, 2.0, 0.0]))
    assert cache.state[(0, "ma")][1][:, 0].tolist() == [True, True, True]
    assert cache.routed_executed[0].tolist() == [0, 0, 1] and cache.routed_tokens[0].tolist() == [2, 2, 2]
    got.append(*_entries(3, 1, 4, seed=2))  # appending after the reorder writes into the reordered buffers
    assert got.length == 5 and torch.equal(got.k[:, :, :4], k[rows])
    cache.state["other"] = [1, 2, 3]
    with pytest.raises(TypeError, match="cannot select rows of a cached list"):
        cache.select_rows(rows)
