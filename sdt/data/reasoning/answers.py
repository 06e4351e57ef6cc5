"""Final answers: find the answer a piece of text states, and check it exactly against a reference.

A text states an answer with `\\boxed{...}` (math datasets such as OpenR1-Math) or with "the answer is X" (our
synthetic task); the last such statement in the text counts. Two answers are equal when both are numbers of the
same value (exact decimal comparison: "12", "12.0" and "+12" agree, "12.01" does not), or, otherwise, when their
normalised strings are equal (spaces, `$`, `\\left`/`\\right` and a trailing full stop removed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?(-?[0-9][0-9,]*(?:\.[0-9]+)?|[^\s.,;]+)", re.IGNORECASE)
_BOXED = "\\boxed{"


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...}, with nested braces balanced."""
    found = []
    start = text.find(_BOXED)
    while start >= 0:
        i, depth = start + len(_BOXED), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[start + len(_BOXED) : i - 1])
        start = text.find(_BOXED, i)
    return found


def extract_answer(text: str) -> str | None:
    """The last answer `text` states (boxed answers take precedence), or None."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    stated = _ANSWER_IS.findall(text)
    return stated[-1].strip() if stated else None


def normalize_answer(answer: str) -> str:
    s = answer.strip().rstrip(".").replace("$", "").replace("\\left", "").replace("\\right", "")
    return re.sub(r"\s+", "", s)


def _as_number(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def answers_match(answer: str | None, reference: str) -> bool:
    if answer is None:
        return False
    a, r = normalize_answer(answer), normalize_answer(reference)
    na, nr = _as_number(a), _as_number(r)
    if na is not None and nr is not None:
        return na == nr
    return a == r


def answer_checker(reference: str) -> Callable[[str], bool]:
    """A checker for `sdt.data.reasoning.metrics`: does this text state `reference` as its answer?"""
    return lambda text: answers_match(extract_answer(text), reference)
