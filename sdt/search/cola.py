"""Chain-of-layers (CoLa) search: Monte Carlo tree search over layer paths for one input.

Li, Li, Zhou, "Skip a Layer or Loop it? Test-Time Depth Adaptation of Pretrained LLMs" (arXiv 2507.07996). A path
is a list of layer indices, run in order (`LanguageModel.forward(layer_path=...)`). The tree's root is the original
path [0, 1, ..., L-1]; a node's children edit its path by skipping or repeating one entry anywhere, and the root also
has children that skip or repeat a block of 2 to 4 consecutive entries.

One simulation walks down from the root: at a node with no expanded child, or with probability
`random_expand_prob` while it still has unexpanded children, it expands a random unexpanded child, scores that
child's path with the reward function (the model's correctness under the path, 0 or 1) and backs the reward up to
the root; otherwise it moves to the child with the highest

    UCB1 = mean reward + c * sqrt(ln N(parent) / N(child)) - length_penalty * len(path) / L,

with c = sqrt(2) and length_penalty = 5. The penalty steers the search toward shorter paths; it is not part of the
reward, so "best" means the highest reward, then the shortest path. A node without any child inside the length
bounds is re-scored (from the cache) instead. Rewards are cached per path, so a path reached twice costs one
evaluation, and all randomness comes from one seeded generator: the same seed and reward give the same result.

This module is pure search: it knows nothing about models or tasks. The reward is any `Callable[[tuple], float]`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sdt.common.config_checks import check_all, from_mapping
from sdt.common.errors import UserError

Path = tuple[int, ...]


@dataclass
class ColaConfig:
    simulations: int = 100  # the paper uses 200
    exploration: float = math.sqrt(2)  # UCB1 constant c
    length_penalty: float = 5.0  # weight of len(path) / original depth in the selection score
    random_expand_prob: float = 0.1  # chance of expanding a random unexpanded child instead of descending
    min_length: int | None = None  # path length bounds; None: 1 and 2 x the original depth
    max_length: int | None = None
    block_sizes: tuple[int, ...] = (2, 3, 4)  # block skips/repeats offered at the root
    top_k: int = 5  # best paths reported per input
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_sizes = tuple(int(b) for b in self.block_sizes)
        checks = [
            (self.simulations >= 1, f"cola.simulations must be >= 1, got {self.simulations}"),
            (self.exploration >= 0, f"cola.exploration must be >= 0, got {self.exploration}"),
            (self.length_penalty >= 0, f"cola.length_penalty must be >= 0, got {self.length_penalty}"),
            (
                0 <= self.random_expand_prob <= 1,
                f"cola.random_expand_prob must be in [0, 1], got {self.random_expand_prob}",
            ),
            (self.min_length is None or self.min_length >= 1, f"cola.min_length must be >= 1, got {self.min_length}"),
            (self.top_k >= 1, f"cola.top_k must be >= 1, got {self.top_k}"),
            (all(b >= 2 for b in self.block_sizes), f"cola.block_sizes must all be >= 2, got {self.block_sizes}"),
        ]
        if self.min_length is not None and self.max_length is not None:
            checks.append((self.max_length >= self.min_length, "cola.max_length must be >= cola.min_length"))
        check_all(checks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColaConfig:
        return from_mapping(cls, d, "cola")

    def bounds(self, depth: int) -> tuple[int, int]:
        lo = self.min_length if self.min_length is not None else 1
        hi = self.max_length if self.max_length is not None else 2 * depth
        if not lo <= depth <= hi:
            raise UserError(f"cola length bounds [{lo}, {hi}] must contain the original depth {depth}")
        return lo, hi


def single_edits(path: Path) -> list[Path]:
    """Skip or repeat one entry, anywhere."""
    out = [path[:j] + path[j + 1 :] for j in range(len(path))]
    out += [path[: j + 1] + (path[j],) + path[j + 1 :] for j in range(len(path))]
    return out


def block_edits(path: Path, sizes: Sequence[int]) -> list[Path]:
    """Skip or repeat a block of `size` consecutive entries, for every size and start."""
    out = []
    for k in sizes:
        for j in range(len(path) - k + 1):
            out.append(path[:j] + path[j + k :])
            out.append(path[: j + k] + path[j : j + k] + path[j + k :])
    return out


@dataclass
class _Node:
    path: Path
    parent: _Node | None
    unexpanded: list[Path] | None = None  # filled on first visit
    children: list[_Node] = field(default_factory=list)
    visits: int = 0
    total: float = 0.0


@dataclass
class SearchResult:
    original: Path
    original_reward: float
    best: list[dict[str, Any]]  # top_k paths by (reward desc, length asc): path, length, reward, score
    pareto: list[dict[str, Any]]  # reward against depth: no other path is as good and shorter
    evaluations: int  # distinct paths scored (reward calls)
    simulations: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["original"] = list(self.original)
        return d


class ColaSearch:
    """MCTS over the layer paths of a model with `depth` layers; one `search(reward)` call per input."""

    def __init__(self, depth: int, cfg: ColaConfig | None = None) -> None:
        self.depth = depth
        self.cfg = cfg or ColaConfig()
        self.min_len, self.max_len = self.cfg.bounds(depth)

    def penalised(self, reward: float, path: Path) -> float:
        return reward - self.cfg.length_penalty * len(path) / self.depth

    def _children(self, node: _Node, root: bool) -> list[Path]:
        candidates = single_edits(node.path)
        if root:
            candidates += block_edits(node.path, self.cfg.block_sizes)
        seen, out = {node.path}, []
        for p in candidates:
            if p not in seen and self.min_len <= len(p) <= self.max_len:
                seen.add(p)
                out.append(p)
        return out

    def _ucb(self, child: _Node, parent_visits: int) -> float:
        mean = child.total / child.visits
        explore = self.cfg.exploration * math.sqrt(math.log(parent_visits) / child.visits)
        return mean + explore - self.cfg.length_penalty * len(child.path) / self.depth

    def _widen_score(self, node: _Node) -> float:
        """UCB1 of a not yet expanded child, valued at its parent's mean reward after one visit."""
        explore = self.cfg.exploration * math.sqrt(math.log(node.visits))
        return node.total / node.visits + explore - self.cfg.length_penalty * len(node.path) / self.depth

    def search(self, reward: Callable[[Path], float], root_path: Sequence[int] | None = None) -> SearchResult:
        rng = random.Random(self.cfg.seed)
        cache: dict[Path, float] = {}

        def score(path: Path) -> float:
            if path not in cache:
                cache[path] = float(reward(path))
            return cache[path]

        root = _Node(tuple(root_path) if root_path is not None else tuple(range(self.depth)), None)
        root.visits, root.total = 1, score(root.path)
        for _ in range(self.cfg.simulations):
            node = root
            while True:
                if node.unexpanded is None:
                    node.unexpanded = self._children(node, root=node is root)
                if node.unexpanded and (
                    not node.children
                    or rng.random() < self.cfg.random_expand_prob
                    or self._widen_score(node) > max(self._ucb(c, node.visits) for c in node.children)
                ):
                    path = node.unexpanded.pop(rng.randrange(len(node.unexpanded)))
                    node.children.append(_Node(path, node))
                    node = node.children[-1]
                    break
                if not node.children:  # nothing within the length bounds: a leaf
                    break
                node = max(node.children, key=lambda c: self._ucb(c, node.visits))
            value = score(node.path)
            while node is not None:
                node.visits += 1
                node.total += value
                node = node.parent

        ranked = sorted(cache.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
        entries = [{"path": list(p), "length": len(p), "reward": r, "score": self.penalised(r, p)} for p, r in ranked]
        pareto, best_reward = [], -math.inf
        for e in sorted(entries, key=lambda e: (e["length"], -e["reward"])):
            if e["reward"] > best_reward:  # shortest path reaching a new reward level
                pareto.append(e)
                best_reward = e["reward"]
        return SearchResult(
            original=root.path,
            original_reward=cache[root.path],
            best=entries[: self.cfg.top_k],
            pareto=pareto,
            evaluations=len(cache),
            simulations=self.cfg.simulations,
        )
