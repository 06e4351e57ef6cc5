import pytest

from sdt.common.errors import UserError
from sdt.search.cola import ColaConfig, ColaSearch, block_edits, single_edits

DEPTH = 8


def graded_reward(target: tuple[int, ...]):
    """1 at `target`; a quarter lost for every layer visited a different number of times than in `target`."""

    def reward(path: tuple[int, ...]) -> float:
        wrong = sum(path.count(i) != target.count(i) for i in range(DEPTH))
        wrong += path != target and sorted(path) == sorted(target)  # right layers, wrong order
        return max(0.0, 1.0 - 0.25 * wrong)

    return reward


def test_edits():
    assert single_edits((0, 1, 2)) == [(1, 2), (0, 2), (0, 1), (0, 0, 1, 2), (0, 1, 1, 2), (0, 1, 2, 2)]
    assert block_edits((0, 1, 2), [2]) == [(2,), (0, 1, 0, 1, 2), (0,), (0, 1, 2, 1, 2)]


@pytest.mark.parametrize("target", [(0, 1, 2, 4, 5, 6, 7), (0, 1, 2, 3, 4, 5, 5, 6, 7), (0, 1, 2, 7)])
@pytest.mark.parametrize("seed", range(4))
def test_finds_the_known_optimum_within_the_budget(target, seed):
    """A skip, a repeat and a block skip of 3. The length penalty (1 / 8 a layer) is below the reward's step (1/4),
    so `target` is also the optimum of the penalised selection score, not only of the reward."""
    calls = []

    def reward(path):
        calls.append(path)
        return graded_reward(target)(path)

    result = ColaSearch(DEPTH, ColaConfig(simulations=100, seed=seed, length_penalty=1.0)).search(reward)
    assert result.original == tuple(range(DEPTH)) and result.original_reward < 1.0
    assert result.best[0]["path"] == list(target) and result.best[0]["reward"] == 1.0
    assert len(calls) == len(set(calls)) == result.evaluations <= 101  # each path scored once
    # Pareto set: rewards strictly increase with length, and it ends at the best reward.
    rewards = [e["reward"] for e in result.pareto]
    lengths = [e["length"] for e in result.pareto]
    assert rewards == sorted(set(rewards)) and lengths == sorted(lengths) and rewards[-1] == 1.0


def test_prefers_the_shorter_of_equally_correct_paths():
    # Correct whenever layer 6 is still there: the best paths are short ones that keep it.
    result = ColaSearch(DEPTH, ColaConfig(simulations=60, seed=1)).search(lambda p: float(6 in p))
    best = result.best[0]
    assert best["reward"] == 1.0 and best["length"] < DEPTH and 6 in best["path"]
    assert result.pareto[0]["length"] <= best["length"]


def test_same_seed_same_result_and_bounds_respected():
    cfg = ColaConfig(simulations=40, seed=3, min_length=6, max_length=9)
    seen = []

    def reward(path):
        seen.append(path)
        return graded_reward((0, 1, 2, 4, 5, 5, 6, 7))(path)

    a = ColaSearch(DEPTH, cfg).search(reward).to_dict()
    first = list(seen)
    b = ColaSearch(DEPTH, cfg).search(reward).to_dict()
    assert a == b and seen[len(first) :] == first
    assert all(6 <= len(p) <= 9 for p in first)
    c = ColaSearch(DEPTH, ColaConfig(simulations=40, seed=4, min_length=6, max_length=9)).search(
        graded_reward((0, 1, 2, 4, 5, 5, 6, 7))
    )
    assert c.to_dict() != a  # the seed matters


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"simulations": 0}, "cola.simulations"),
        ({"random_expand_prob": 1.5}, "cola.random_expand_prob"),
        ({"min_length": 9}, "must contain the original depth 8"),
        ({"block_sizes": (1,)}, "cola.block_sizes"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(UserError, match=match):
        ColaSearch(DEPTH, ColaConfig(**kw))
