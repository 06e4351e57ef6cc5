"""Fixtures of the search tests: a tiny multiple-choice task and tiny untrained models of each architecture."""

from __future__ import annotations

import pytest
import torch

from sdt.data.tokenizer import train_bpe
from sdt.models import ModelConfig, build_model
from sdt.search.tasks import Task, TaskItem

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
    cfg = ModelConfig(arch=arch, vocab_size=300, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return build_model(cfg).eval()
