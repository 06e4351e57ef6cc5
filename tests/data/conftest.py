"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.data_helpers import make_text


@pytest.fixture
def txt_corpus(tmp_path: Path) -> list[str]:
    """Two .txt files of a few KB each: few documents, so the corpus is split by lines."""
    paths = []
    for i in range(2):
        p = tmp_path / f"book{i}.txt"
        p.write_text(make_text(i, n_lines=200), encoding="utf-8")
        paths.append(str(p))
    return paths
