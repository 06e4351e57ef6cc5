"""Overthinking metrics of a reasoning trace (Zhao et al., "Let LLMs Break Free from Overthinking via Self-Braking
Tuning", arXiv 2505.14604), as pure functions.

A trace is `<think> thinking </think> answer`. The thinking is cut into steps at blank lines (paragraphs), the
unit reasoning models write in. With an answer checker (does this step state the correct answer?):

* efficiency ratio = (index of the first step with the correct answer + 1) / number of steps: 1.0 when the model
  stops at its first correct answer, small when it keeps re-checking afterwards;
* marker ratio = share of thinking words that belong to a re-check cue ("Wait", "Let me double-check", ...).
  Words, not model tokens, so the ratio does not depend on the tokenizer; cues match whole words and phrases,
  case-insensitively ("Wait" does not match "awaits");
* overthink score = 0.1 * marker ratio + 0.9 * (1 - efficiency ratio).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sdt.common.errors import UserError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Re-check cues of the paper's lexicon and a few common variants. Hyphenated and spaced spellings are listed
# separately because words are matched exactly.
DEFAULT_MARKERS: tuple[str, ...] = (
    "wait",
    "hmm",
    "alternatively",
    "let me double-check",
    "let me double check",
    "double-check",
    "let me check",
    "let me check again",
    "let me verify",
    "let me re-check",
    "let me recheck",
    "let me confirm",
    "to confirm",
    "to be sure",
    "just to be safe",
    "on second thought",
    "but wait",
    "re-check",
    "recheck",
    "verify",
)

MARKER_WEIGHT = 0.1
EFFICIENCY_WEIGHT = 0.9

# A word: letters/digits, optionally joined by hyphens or apostrophes ("double-check", "let's").
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")
_STEP_BREAK = re.compile(r"\n\s*\n")


class TraceError(UserError):
    """A trace that cannot be measured or trimmed: no think tags, no steps, no correct answer."""


def split_trace(text: str) -> tuple[str, str]:
    """(thinking, answer): the text inside the first <think>...</think> pair, and what follows it (stripped)."""
    start = text.find(THINK_OPEN)
    if start < 0:
        raise TraceError(f"trace has no {THINK_OPEN} tag")
    end = text.find(THINK_CLOSE, start + len(THINK_OPEN))
    if end < 0:
        raise TraceError(f"trace has {THINK_OPEN} but no closing {THINK_CLOSE}")
    return text[start + len(THINK_OPEN) : end].strip(), text[end + len(THINK_CLOSE) :].strip()


def split_steps(thinking: str) -> list[str]:
    """Reasoning steps: the paragraphs of the thinking text (separated by blank lines), stripped, empty ones dropped."""
    return [s.strip() for s in _STEP_BREAK.split(thinking) if s.strip()]


def first_correct_step(steps: Sequence[str], is_correct: Callable[[str], bool]) -> int | None:
    """Index of the first step the checker accepts as stating the correct answer, or None."""
    return next((i for i, step in enumerate(steps) if is_correct(step)), None)


def efficiency_ratio(first_correct: int, num_steps: int) -> float:
    """Steps up to and including the first correct answer, over all steps."""
    if num_steps <= 0:
        raise TraceError("a trace with no reasoning steps has no efficiency ratio")
    if not 0 <= first_correct < num_steps:
        raise ValueError(f"first_correct={first_correct} is not a step index of a {num_steps}-step trace")
    return (first_correct + 1) / num_steps


def words(text: str) -> list[str]:
    """The lower-cased words of `text`, the unit of the marker ratio."""
    return _WORD.findall(text.lower())


def _compile_lexicon(markers: Sequence[str]) -> list[tuple[str, ...]]:
    phrases = {tuple(words(m)) for m in markers}
    phrases.discard(())
    return sorted(phrases, key=len, reverse=True)  # longest first: "let me double-check" before "double-check"


def marker_ratio(thinking: str, markers: Sequence[str] = DEFAULT_MARKERS) -> float:
    """Share of the thinking's words covered by a marker phrase (whole words, case-insensitive, no overlaps)."""
    ws = words(thinking)
    if not ws:
        return 0.0
    lexicon = _compile_lexicon(markers)
    covered = 0
    i = 0
    while i < len(ws):
        match = next((p for p in lexicon if tuple(ws[i : i + len(p)]) == p), None)
        if match is None:
            i += 1
        else:
            covered += len(match)
            i += len(match)
    return covered / len(ws)


def overthink_score(marker: float, efficiency: float) -> float:
    """0.1 * marker ratio + 0.9 * (1 - efficiency ratio): 0 for a trace that stops at its first correct answer."""
    return MARKER_WEIGHT * marker + EFFICIENCY_WEIGHT * (1.0 - efficiency)


@dataclass(frozen=True)
class TraceMetrics:
    steps: list[str]
    first_correct: int  # index into steps
    efficiency: float
    marker: float
    score: float


def steps_metrics(
    steps: Sequence[str], is_correct: Callable[[str], bool], markers: Sequence[str] = DEFAULT_MARKERS
) -> TraceMetrics:
    """Metrics of a trace already cut into steps; TraceError if no step states the correct answer."""
    if not steps:
        raise TraceError("trace has no reasoning steps inside its think tags")
    first = first_correct_step(steps, is_correct)
    if first is None:
        raise TraceError("no reasoning step states the correct answer")
    efficiency = efficiency_ratio(first, len(steps))
    marker = marker_ratio("\n\n".join(steps), markers)
    return TraceMetrics(list(steps), first, efficiency, marker, overthink_score(marker, efficiency))


def trace_metrics(
    text: str, is_correct: Callable[[str], bool], markers: Sequence[str] = DEFAULT_MARKERS
) -> TraceMetrics:
    """Steps, first correct step, efficiency, marker ratio and overthink score of a full `<think>...` trace."""
    thinking, _ = split_trace(text)
    return steps_metrics(split_steps(thinking), is_correct, markers)
