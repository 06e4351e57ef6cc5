"""Prefix reuse: the same bits as the plain forward, hence the same search, at fewer layer calls."""

from __future__ import annotations

import pytest
import torch

from sdt.common.errors import UserError
from sdt.search.cola import ColaConfig, ColaSearch
from sdt.search.prefix_cache import PrefixCache, PrefixReusingScorer
from sdt.search.tasks import PathScorer
from tests.search.conftest import tiny_model

CPU = torch.device("cpu")


def test_cache_returns_the_longest_stored_prefix_and_stays_within_its_bound():
    state = torch.zeros(2, 3, 4)  # 96 bytes
    cache = PrefixCache(max_bytes=3 * 96)
    cache.put("a", (0,), state)
    cache.put("a", (0, 1), state + 1)
    k, got = cache.longest_prefix("a", (0, 1, 2))
    assert k == 2 and torch.equal(got, state + 1)
    assert cache.longest_prefix("b", (0, 1, 2)) == (0, None)  # keyed by input too
    k, got = cache.longest_prefix("a", (0, 2))
    assert k == 1 and torch.equal(got, state)
    cache.put("a", (5,), state)
    cache.put("a", (6,), state)  # over the bound: the least recently used entry, (0, 1), goes
    assert cache.bytes <= 3 * 96 and len(cache) == 3
    assert cache.longest_prefix("a", (0, 1))[0] == 1
    with pytest.raises(UserError, match="prefix_cache_mb"):
        PrefixCache(-1)


@pytest.mark.parametrize("arch", ["dense", "sdt", "stt"])
@pytest.mark.parametrize("cache_bytes", [64 * 2**20, 20_000])  # room for everything / constant eviction
def test_prefix_reuse_gives_bitwise_identical_scores_and_the_same_search(arch, cache_bytes, search_tokenizer,
                                                                        mc_task):  # fmt: skip
    model = tiny_model(arch)
    depth = len(model.layers)
    plain = PathScorer(model, search_tokenizer, mc_task, CPU)
    fast = PrefixReusingScorer(model, search_tokenizer, mc_task, CPU, cache_bytes=cache_bytes)
    search = ColaSearch(depth, ColaConfig(simulations=25, seed=2))
    for item in mc_task.items[:4]:
        seen_plain, seen_fast = [], []

        def reward(scorer, seen, item=item):
            def score(path):
                seen.append((path, scorer.choice_loglikelihoods(item, path)))
                return float(scorer.correct(item, path))

            return score

        a = search.search(reward(plain, seen_plain))
        b = search.search(reward(fast, seen_fast))
        assert a.to_dict() == b.to_dict()
        assert seen_plain == seen_fast  # every log-likelihood, to the bit
    assert fast.layers_reused > 0 and fast.cache.bytes <= cache_bytes
    if cache_bytes > 2**20:
        # Every child edits its parent once: the reused share is large.
        assert fast.layers_reused > 0.3 * (fast.layers_run + fast.layers_reused)


@pytest.fixture
def one_thread():
    """Stacked states take other matmul blockings than single rows when torch uses several threads: bitwise
    equality of batched and single-path scores holds in one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["dense", "sdt", "stt"])
@pytest.mark.parametrize(("batch_paths", "cache_bytes"), [(1, 64 * 2**20), (3, 64 * 2**20), (8, 20_000)])
def test_batched_candidates_give_the_same_bits_as_one_path_at_a_time(arch, batch_paths, cache_bytes,
                                                                    search_tokenizer, mc_task, one_thread):  # fmt: skip
    model = tiny_model(arch)
    plain = PathScorer(model, search_tokenizer, mc_task, CPU)
    fast = PrefixReusingScorer(model, search_tokenizer, mc_task, CPU, cache_bytes=cache_bytes, batch_paths=batch_paths)
    depth = len(model.layers)
    full = list(range(depth))
    paths = [full, full[:2] + full[3:], full[:1] + full[2:], full[:3] + full[2:], full[:2], full[::-1], full]
    for item in mc_task.items[:5]:
        fast.choice_loglikelihoods(item, full[:1] + full[3:])  # a warm cache for some of them
        assert fast.loglikelihoods_many(item, paths) == [plain.choice_loglikelihoods(item, p) for p in paths]
        assert fast.correct_many(item, paths) == [plain.correct(item, p) for p in paths]
    assert fast.layers_reused > 0
