"""The learned path router: item split, candidates, training, and `search=cola_router` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from sdt.cli.dispatch import evaluate
from sdt.common.errors import UserError
from sdt.search.router import PathRouter, RouterConfig, fit_router, select_candidates, split_items
from tests.conftest import compose_cfg


def test_split_is_deterministic_disjoint_and_sized():
    cfg = RouterConfig(train_items=30, heldout_items=12, split_seed=3)
    train, held = split_items(50, cfg)
    assert (train, held) == split_items(50, cfg)
    assert len(train) == 30 and len(held) == 12 and not set(train) & set(held)
    # The held-out set depends on the seed and its own size only.
    assert split_items(50, RouterConfig(train_items=10, heldout_items=12, split_seed=3))[1] == held
    assert split_items(50, RouterConfig(train_items=10, heldout_items=12, split_seed=4))[1] != held
    train, held = split_items(50, RouterConfig(train_items=None, heldout_items=12))
    assert len(train) == 38 and sorted(train + held) == list(range(50))
    with pytest.raises(UserError, match="cannot hold out 12 and train on 40"):
        split_items(50, RouterConfig(train_items=40, heldout_items=12))
    with pytest.raises(UserError, match="cola_router.cv_folds"):
        RouterConfig(cv_folds=1)


def test_candidates_are_the_most_often_correct_paths_keeping_the_prefix():
    original = (0, 1, 2, 3)
    found = [
        [(0, 1, 3), (0, 2, 3), original],
        [(0, 1, 3), (0, 1, 2)],
        [(0, 1, 2), (1, 2, 3), (0, 1, 3)],
    ]
    assert select_candidates(found, original, 1, 5) == [original, (0, 1, 3), (0, 1, 2), (0, 2, 3)]
    assert select_candidates(found, original, 2, 1) == [original, (0, 1, 3)]  # (0, 2, 3) changes layer 1


def _synthetic(n: int, seed: int):
    """Feature 0 > 0: the short path is right, else only the original is. Feature 1 is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    short_ok = (x[:, 0] > 0).float()
    return x, torch.stack([torch.ones(n), short_ok], dim=1)


def test_router_learns_when_the_short_path_is_safe_and_round_trips(tmp_path):
    candidates = [(0, 1, 2, 3), (0, 1)]
    x, y = _synthetic(80, 0)
    cfg = RouterConfig(train_items=80, heldout_items=1, steps=200)
    router, table = fit_router(x, y, candidates, 4, 1, cfg, {"task": "synthetic"})
    # CV keeps the original's accuracy (1.0) only with a penalty that still looks at the input.
    assert {row["length_penalty"] for row in table} == set(cfg.length_penalties)
    x_new, y_new = _synthetic(200, 1)
    picks = torch.tensor(router.route(x_new))
    assert float(y_new[torch.arange(200), picks].mean()) >= 0.95
    assert 0.3 < float((picks == 1).float().mean()) < 0.7  # it takes the short path about half the time
    router.save(str(tmp_path / "r.pt"))
    again = PathRouter.load(str(tmp_path / "r.pt"))
    assert again.route(x_new) == router.route(x_new) and again.candidates == candidates
    with pytest.raises(UserError, match="not a saved path router"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        PathRouter.load(str(tmp_path / "bad.pt"))


def test_cola_router_trains_saves_and_applies_on_held_out_items_only(router_run, cache_dir, tmp_path):
    run_dir, overrides, result, stdout = router_run
    data = json.loads((run_dir / "cola_router.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert (run_dir / "cola_router.png").stat().st_size > 0 and (run_dir / "cola_router.pt").is_file()
    assert "without the gold answer" in stdout
    for key in ("accuracy", "original_accuracy", "mean_path_length", "original_path_length"):
        assert key in data
    assert data["original_path_length"] == data["depth"] == 4
    train, held = set(data["train_indices"]), set(data["heldout_indices"])
    assert len(train) == 12 and len(held) == 6 and not train & held
    # The training search ran on the training items only, and the figures agree with the per-item rows.
    searched = [json.loads(line)["index"] for line in (run_dir / "cola_items.jsonl").read_text().splitlines()]
    assert sorted(searched) == sorted(train)
    rows = data["items"]
    assert [r["index"] for r in rows] == sorted(held)
    assert data["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
    assert data["original_accuracy"] == pytest.approx(sum(r["original_correct"] for r in rows) / 6)
    assert data["mean_path_length"] == pytest.approx(sum(r["length"] for r in rows) / 6)
    candidates = [c["path"] for c in data["candidates"]]
    assert candidates[0] == [0, 1, 2, 3] and all(c[:1] == [0] for c in candidates)
    assert all(r["path"] == candidates[r["candidate"]] for r in rows)

    # Applying the saved router reproduces the held-out results without searching or training.
    # The training split's search also leaves its cola.json, as search=cola would.
    assert sorted(it["index"] for it in json.loads((run_dir / "cola.json").read_text())["items"]) == sorted(train)
    router = PathRouter.load(str(run_dir / "cola_router.pt"))
    assert set(router.meta["train_indices"]) == train
    apply = overrides + [f"cola.router={run_dir / 'cola_router.pt'}"]
    again = evaluate(compose_cfg("eval", apply, tmp_path / "apply", cache_dir))
    assert again["items"] == rows and not again["trained_here"]
    assert not (tmp_path / "apply" / "cola_items.jsonl").exists()
    # A split whose held-out items include the router's training items is refused.
    leaky = apply + ["cola_router.split_seed=1", "cola_router.heldout_items=100"]
    with pytest.raises(UserError, match="trained on .* of this split's held-out items"):
        evaluate(compose_cfg("eval", leaky, tmp_path / "leaky", cache_dir))
