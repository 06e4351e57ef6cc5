"""Helpers for the data tests: small synthetic corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (  # noqa: SIM905 (a sentence reads better than 80 quoted words)
    "the of and to a in that is was he for it with as his on be at by i this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such like "
    "héllo naïve café über straße 🙂 —"
).split()


def make_text(seed: int, n_lines: int = 40) -> str:
    """Deterministic pseudo-prose: lines of random words (some non-ASCII), a blank line every few lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
        if i % 7 == 6:
            lines.append("")
    return "\n".join(lines) + "\n"


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path)
    return path
