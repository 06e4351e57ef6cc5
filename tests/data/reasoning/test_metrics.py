"""Overthinking metrics on hand-written traces with values computed by hand."""

from __future__ import annotations

import pytest

from sdt.data.reasoning.answers import answer_checker
from sdt.data.reasoning.metrics import (
    TraceError,
    efficiency_ratio,
    first_correct_step,
    marker_ratio,
    overthink_score,
    split_steps,
    split_trace,
    trace_metrics,
)

TRACE = """<think>
We add 2 and 3.

2 + 3 = 5, so the answer is 5.

Wait, let me double-check: 3 + 2 = 5.

Hmm, the answer is 5.
</think>

The answer is 5."""


def test_split_trace_and_steps():
    thinking, answer = split_trace("Sure. " + TRACE)
    assert answer == "The answer is 5."
    assert thinking.startswith("We add") and thinking.endswith("the answer is 5.")
    assert split_steps(thinking) == [
        "We add 2 and 3.",
        "2 + 3 = 5, so the answer is 5.",
        "Wait, let me double-check: 3 + 2 = 5.",
        "Hmm, the answer is 5.",
    ]
    # Blank lines with spaces still separate steps; single newlines do not.
    assert split_steps("a\nb\n  \n\nc") == ["a\nb", "c"]


@pytest.mark.parametrize(
    "text, message",
    [("no tags at all", "no <think> tag"), ("<think> never closed", "no closing </think>")],
)
def test_traces_without_think_tags_raise(text, message):
    with pytest.raises(TraceError, match=message):
        split_trace(text)


def test_first_correct_step_and_efficiency():
    steps = split_steps(split_trace(TRACE)[0])
    assert first_correct_step(steps, answer_checker("5")) == 1
    assert first_correct_step(steps, answer_checker("6")) is None
    assert efficiency_ratio(1, 4) == pytest.approx(0.5)
    assert efficiency_ratio(3, 4) == 1.0
    with pytest.raises(ValueError):
        efficiency_ratio(4, 4)


def test_marker_ratio_counts_whole_words_and_phrases():
    # words: wait 2 2 4 let me double-check yes hmm -> 9; markers: wait (1) + let me double-check (3) + hmm (1)
    assert marker_ratio("Wait, 2 + 2 = 4. Let me double-check: yes. Hmm.") == pytest.approx(5 / 9)
    # Substrings of other words never count.
    assert marker_ratio("He awaits the hmmm, verifying alternatives.") == 0.0
    # Case-insensitive; the longest phrase wins and words are not counted twice.
    assert marker_ratio("LET ME CHECK AGAIN now") == pytest.approx(4 / 5)
    # A configurable lexicon.
    assert marker_ratio("ok so ok", markers=["ok"]) == pytest.approx(2 / 3)
    assert marker_ratio("") == 0.0


def test_overthink_score_and_trace_metrics():
    assert overthink_score(0.5, 0.6) == pytest.approx(0.1 * 0.5 + 0.9 * 0.4)
    assert overthink_score(0.0, 1.0) == 0.0
    m = trace_metrics(TRACE, answer_checker("5"))
    # words: we add 2 and 3 (5) | 2 3 5 so the answer is 5 (8) | wait let me double-check 3 2 5 (7) |
    # hmm the answer is 5 (5) = 25 words; markers: wait, let me double-check (3 words), hmm -> 5
    assert m.first_correct == 1
    assert m.efficiency == pytest.approx(2 / 4)
    assert m.marker == pytest.approx(5 / 25)
    assert m.score == pytest.approx(0.1 * 5 / 25 + 0.9 * 0.5)


def test_trace_without_a_correct_step_raises():
    with pytest.raises(TraceError, match="correct answer"):
        trace_metrics(TRACE, answer_checker("7"))
    with pytest.raises(TraceError, match="no reasoning steps"):
        trace_metrics("<think>\n\n</think> 5", answer_checker("5"))
