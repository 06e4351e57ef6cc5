"""Fixtures of the search tests: a tiny multiple-choice task and tiny untrained models of each architecture."""

from __future__ import annotations

import pytest
import torch

from sdt.data.tokenizer import train_bpe
from sdt.models import build_model
from sdt.search.tasks import Task, TaskItem
from tests.conftest import TINY_TRAINER, compose_cfg, tiny_data, tiny_model_config, tiny_model_overrides

WORDS = "three four five six seven eight nine ten red blue green cat dog"


@pytest.fixture(scope="session")
def search_tokenizer():
    return train_bpe([f"Question: What is one plus two?\nAnswer: {WORDS}"] * 20, 300)


@pytest.fixture(scope="session")
def mc_task() -> Task:
    """Twelve four-choice items whose prompts and choices differ, so per-input keys matter."""
    words = WORDS.split()
    items = [
        TaskItem(
            f"Question: What is {words[i % 13]} plus {words[(i * 5) % 13]}?\nAnswer:",
            i % 4,
            [words[(i + j) % 13] + (" six" if j == 2 else "") for j in range(4)],
        )
        for i in range(12)
    ]
    return Task("tiny_mc", "multiple_choice", items)


def tiny_model(arch: str, n_layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(arch, vocab_size=300, n_layers=n_layers)).eval()


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, corpus_files, cache_dir):
    """A tiny 4-layer dense run (its last.ckpt): paths over 4 layers leave a router something to choose."""
    from sdt.training.train import train

    out = tmp_path_factory.mktemp("dense_run")
    overrides = ["model=dense", *tiny_model_overrides(n_layers=4)]
    overrides += [*TINY_TRAINER, *tiny_data(corpus_files), "trainer.max_steps=2"]
    train(compose_cfg("train", overrides, out, cache_dir))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def router_run(tmp_path_factory, dense_run, cache_dir):
    """`python evaluate.py search=cola_router` on the dense run: (run dir, overrides, result, printed report)."""
    import contextlib
    import io

    from sdt.cli.dispatch import evaluate

    out = tmp_path_factory.mktemp("router_run")
    overrides = ["search=cola_router", "task=basic_mc", f"ckpt_path={dense_run}", "device=cpu"]
    overrides += ["cola.simulations=8", "cola_router.train_items=12", "cola_router.heldout_items=6"]
    overrides += ["cola_router.prefix_layers=1", "cola_router.num_candidates=4", "cola_router.cv_folds=3"]
    overrides += ["cola_router.steps=50"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = evaluate(compose_cfg("eval", overrides, out, cache_dir))
    return out, overrides, result, printed.getvalue()
