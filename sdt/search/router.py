"""A learned path router: picks a layer path per input from the frozen model's hidden state, without the answer.

The router is a path classifier over a small candidate set (Dr.LLM, arXiv 2510.12773, and PoLar train routers on
MCTS-found paths; this is the simplest such router). The candidates are the original path and the paths the CoLa
search found correct most often on the training items, restricted to paths that keep the first `prefix_layers`
layers: the router reads the hidden state after them, which every candidate computes anyway, so routing adds no
layer. A linear head predicts, per candidate, the probability that the model answers correctly under it (trained
with binary cross-entropy on the candidates' measured correctness on the training items), and the router picks

    argmax_k  p_k(x) - length_penalty * len(path_k) / L,

with the length penalty chosen by cross-validation on the training items: the largest saving in layers whose
cross-validated accuracy is at least the original path's.

Why a path classifier rather than per-layer skip / execute / repeat decisions: at search budgets that fit here the
searched paths are a few edits from the original, and the same edits recur across items, so a few candidates cover
most of what the search finds; per-layer decisions would have to learn a path of ~30 dependent choices from the
labels of ~100 items and can produce paths nobody evaluated.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdt.common.config_checks import check_all, from_mapping
from sdt.common.errors import UserError

Path = tuple[int, ...]
FORMAT = "sdt.cola_router/1"


@dataclass
class RouterConfig:
    train_items: int | None = 80  # None: every item not held out
    heldout_items: int | None = 40  # None: every item not trained on
    split_seed: int = 0
    prefix_layers: int = 4
    num_candidates: int = 16
    length_penalties: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    cv_folds: int = 5
    weight_decay: float = 0.01
    steps: int = 300
    lr: float = 0.05

    def __post_init__(self) -> None:
        self.length_penalties = tuple(float(x) for x in self.length_penalties)
        checks = [
            (self.train_items is None or self.train_items >= 2, "cola_router.train_items must be >= 2 (or null)"),
            (
                self.heldout_items is None or self.heldout_items >= 1,
                "cola_router.heldout_items must be >= 1 (or null)",
            ),
            (
                not (self.train_items is None and self.heldout_items is None),
                "cola_router.train_items and cola_router.heldout_items cannot both be null",
            ),
            (self.prefix_layers >= 0, "cola_router.prefix_layers must be >= 0"),
            (self.num_candidates >= 1, "cola_router.num_candidates must be >= 1"),
            (
                bool(self.length_penalties) and min(self.length_penalties) >= 0,
                "cola_router.length_penalties must be a non-empty list of values >= 0",
            ),
            (self.cv_folds >= 2, "cola_router.cv_folds must be >= 2"),
            (self.weight_decay >= 0, "cola_router.weight_decay must be >= 0"),
            (self.steps >= 1, "cola_router.steps must be >= 1"),
            (self.lr > 0, "cola_router.lr must be > 0"),
        ]
        check_all(checks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        return from_mapping(cls, d, "cola_router")


def split_items(num_items: int, cfg: RouterConfig) -> tuple[list[int], list[int]]:
    """(training, held-out) item indices: a seeded shuffle of the indices, held-out items first.

    The held-out set depends only on the seed and its own size, not on how many items are trained on; the two sets
    never share an item.
    """
    order = list(range(num_items))
    random.Random(cfg.split_seed).shuffle(order)
    heldout_n = cfg.heldout_items if cfg.heldout_items is not None else num_items - cfg.train_items
    train_n = cfg.train_items if cfg.train_items is not None else num_items - heldout_n
    if heldout_n < 1 or train_n < 2 or heldout_n + train_n > num_items:
        raise UserError(
            f"the task has {num_items} items: cannot hold out {heldout_n} and train on {train_n} "
            f"(cola_router.train_items / heldout_items)"
        )
    return sorted(order[heldout_n : heldout_n + train_n]), sorted(order[:heldout_n])


def select_candidates(
    correct_paths: Sequence[Sequence[Path]], original: Path, prefix_layers: int, num_candidates: int
) -> list[Path]:
    """The original path, then the `num_candidates` paths found correct on the most items (ties: shorter first),
    among those keeping the original's first `prefix_layers` layers."""
    prefix = original[:prefix_layers]
    counts = Counter(p for paths in correct_paths for p in set(paths) if p != original and p[:prefix_layers] == prefix)
    ranked = sorted(counts, key=lambda p: (-counts[p], len(p), p))
    return [original, *ranked[:num_candidates]]


def _fit_head(x: Tensor, y: Tensor, cfg: RouterConfig) -> tuple[Tensor, Tensor]:
    """Linear multi-label logistic regression, full batch: x (N, F) standardised, y (N, K) in {0, 1}."""
    rate = y.mean(0).clamp(0.02, 0.98)
    weight = torch.zeros(x.size(1), y.size(1), requires_grad=True)
    bias = torch.log(rate / (1 - rate)).clone().requires_grad_(True)  # start at each candidate's base rate
    opt = torch.optim.Adam([weight, bias], lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + cfg.weight_decay * weight.pow(2).sum()
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach()


def choose(probs: Tensor, lengths: Tensor, depth: int, length_penalty: float) -> Tensor:
    """probs (N, K), lengths (K,) -> chosen candidate per row (N,); ties go to the earlier candidate."""
    return torch.argmax(probs - length_penalty * lengths / depth, dim=1)


@dataclass
class PathRouter:
    depth: int
    prefix_layers: int
    candidates: list[Path]
    mean: Tensor  # (F,) feature standardisation
    std: Tensor  # (F,)
    weight: Tensor  # (F, K)
    bias: Tensor  # (K,)
    length_penalty: float
    meta: dict[str, Any]  # task, split, source checkpoint, training figures

    @property
    def lengths(self) -> Tensor:
        return torch.tensor([len(p) for p in self.candidates], dtype=torch.float32)

    def probabilities(self, features: Tensor) -> Tensor:
        """features (N, F) -> P(correct) per candidate (N, K)."""
        x = (features.float() - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias)

    def route(self, features: Tensor, length_penalty: float | None = None) -> list[int]:
        """The chosen candidate index per row of `features` (N, F)."""
        lam = self.length_penalty if length_penalty is None else length_penalty
        return choose(self.probabilities(features), self.lengths, self.depth, lam).tolist()

    def save(self, path: str) -> None:
        state = {k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)}
        state.update({k: getattr(self, k) for k in ("mean", "std", "weight", "bias")})
        state["candidates"] = [list(p) for p in self.candidates]
        torch.save({"format": FORMAT, **state}, path)

    @classmethod
    def load(cls, path: str) -> PathRouter:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise UserError(f"cola.router: no such file {path!r}") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"cola.router: {path!r} is not a saved path router ({FORMAT})")
        state.pop("format")
        state["candidates"] = [tuple(p) for p in state["candidates"]]
        return cls(**state)


def fit_router(
    features: Tensor,
    labels: Tensor,
    candidates: list[Path],
    depth: int,
    prefix_layers: int,
    cfg: RouterConfig,
    meta: dict[str, Any] | None = None,
) -> tuple[PathRouter, list[dict[str, float]]]:
    """Train on features (N, F) and candidate correctness labels (N, K); pick the length penalty by CV.

    Returns the router (trained on all N items) and the cross-validation table: per length penalty, the CV
    accuracy and mean path length, next to the original path's accuracy on the same items.
    """
    n = features.size(0)
    if n < cfg.cv_folds:
        raise UserError(f"cola_router.cv_folds={cfg.cv_folds} is more than the {n} training items")
    y = labels.float()
    lengths = torch.tensor([len(p) for p in candidates], dtype=torch.float32)

    def standardise(x: Tensor, ref: Tensor) -> Tensor:
        return (x - ref.mean(0)) / (ref.std(0) + 1e-6)

    folds = torch.arange(n) % cfg.cv_folds
    cv_probs = torch.zeros_like(y)
    for f in range(cfg.cv_folds):
        fit, held = folds != f, folds == f
        w, b = _fit_head(standardise(features[fit], features[fit]), y[fit], cfg)
        cv_probs[held] = torch.sigmoid(standardise(features[held], features[fit]) @ w + b)
    table = []
    for lam in cfg.length_penalties:
        pick = choose(cv_probs, lengths, depth, lam)
        table.append(
            {
                "length_penalty": lam,
                "cv_accuracy": float(y[torch.arange(n), pick].mean()),
                "cv_mean_path_length": float(lengths[pick].mean()),
            }
        )
    original_accuracy = float(y[:, 0].mean())
    eligible = [row for row in table if row["cv_accuracy"] >= original_accuracy]
    if eligible:  # at least the original's accuracy: the largest saving in layers
        best = min(eligible, key=lambda r: (r["cv_mean_path_length"], -r["cv_accuracy"], r["length_penalty"]))
    else:
        best = max(table, key=lambda r: (r["cv_accuracy"], -r["cv_mean_path_length"], -r["length_penalty"]))
    mean, std = features.mean(0), features.std(0) + 1e-6
    w, b = _fit_head((features - mean) / std, y, cfg)
    router = PathRouter(
        depth=depth,
        prefix_layers=prefix_layers,
        candidates=list(candidates),
        mean=mean,
        std=std,
        weight=w,
        bias=b,
        length_penalty=best["length_penalty"],
        meta={**(meta or {}), "train_original_accuracy": original_accuracy, "cv": table},
    )
    return router, table
