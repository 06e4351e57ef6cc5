"""`python evaluate.py search=cola ...` end to end on the tiny trained checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from sdt.cli.dispatch import evaluate
from sdt.common.errors import UserError
from sdt.evaluation.loading import load_model_and_tokenizer
from sdt.search.tasks import PathScorer, load_task
from tests.conftest import compose_cfg


def test_cola_search_writes_cola_json_and_plots(trained_run, cache_dir, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    overrides = ["search=cola", "task=basic_mc", f"ckpt_path={ckpt}", "device=cpu"]
    overrides += ["cola.num_items=4", "cola.simulations=6", "cola.seed=1"]
    cfg = compose_cfg("eval", overrides, tmp_path, cache_dir)
    result = evaluate(cfg)
    data = json.loads((tmp_path / "cola.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert "oracle upper bound" in data["note"] and "oracle upper bound" in capsys.readouterr().out
    model, tokenizer, valid_vocab, _ = load_model_and_tokenizer(cfg, torch.device("cpu"))
    assert model.is_routed  # the default tiny run is SDT: paths run its decision/dynamic pairs as units
    assert (
        data["depth"] == len(model.layers) and data["simulations"] == 6 and data["num_items"] == len(data["items"]) == 4
    )
    for name in ("shares", "path_lengths", "layer_heatmap"):
        assert (tmp_path / f"cola_{name}.png").stat().st_size > 0
    assert len((tmp_path / "cola_items.jsonl").read_text().splitlines()) == 4

    # Every reported figure agrees with the per-item results, and those agree with re-scoring the paths.
    task = load_task("basic_mc")
    scorer = PathScorer(model, tokenizer, task, torch.device("cpu"), valid_vocab)
    correct = [it for it in data["items"] if it["original_correct"]]
    for it in data["items"]:
        item = task.items[it["index"]]
        assert it["original_correct"] == scorer.correct(item, None)
        assert 1 <= it["evaluations"] <= 7
        if it["best_correct"]:
            assert scorer.correct(item, it["best_correct"]["path"])
            assert it["best_correct"]["length"] == len(it["best_correct"]["path"])
    assert data["original_accuracy"] == pytest.approx(len(correct) / 4)
    shorter = [it for it in correct if it["best_correct"]["length"] < data["depth"]]
    if correct:
        assert data["share_correct_with_shorter_path"] == pytest.approx(len(shorter) / len(correct))
    assert data["oracle_accuracy"] >= data["original_accuracy"]
    assert len(data["layer_edits"]) == 4 and all(len(row) == data["depth"] for row in data["layer_edits"].values())

    # Same seed, same search.
    again = evaluate(compose_cfg("eval", overrides, tmp_path / "again", cache_dir))
    assert [it["best"] for it in again["items"]] == [it["best"] for it in data["items"]]


def test_cola_search_needs_a_task(trained_run, cache_dir, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("eval", ["search=cola", f"ckpt_path={ckpt}"], tmp_path, cache_dir)
    with pytest.raises(UserError, match="search=cola needs task="):
        evaluate(cfg)
    cfg = compose_cfg(
        "eval", ["search=cola", "task=basic_mc", f"ckpt_path={ckpt}", "+cola.bogus=1"], tmp_path, cache_dir
    )
    with pytest.raises(UserError, match=r"unknown cola option\(s\) \['bogus'\]"):
        evaluate(cfg)
