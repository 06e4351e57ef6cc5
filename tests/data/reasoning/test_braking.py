"""Exact and dynamic self-braking construction on fixed traces: the kept, masked and braking segments."""

from __future__ import annotations

import pytest

from sdt.common.errors import UserError
from sdt.data.reasoning.answers import answer_checker
from sdt.data.reasoning.braking import DEFAULT_BRAKING_SENTENCE, BrakingConfig, build_braking_segments
from sdt.data.reasoning.metrics import TraceError

STEPS = [
    "We add the numbers.",
    "2 + 3 = 5.",
    "So the answer is 5.",  # first correct answer: the foundation solution is steps 0-2
    "Wait.",
    "2 + 3 = 5 again. The answer is 5.",  # end of the first re-check
    "Hmm, once more. 3 + 2 = 5.",
    "The answer is 5.",
    "Wait, fine. The answer is 5.",
]
TRACE = "<think>\n" + "\n\n".join(STEPS) + "\n</think>\n\nThe answer is 5."
CHECK = answer_checker("5")
ANSWER = "\n</think>\n\nThe answer is 5."


def roles(result):
    return [(s.role, s.text) for s in result.segments]


def test_exact_keeps_foundation_and_first_recheck_then_masks_the_next_one():
    r = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="exact"))
    assert r.trimmed and r.score > 0.2
    assert roles(r) == [
        ("kept", "<think>\n" + "\n\n".join(STEPS[:5])),
        ("masked", "\n\nHmm, once more."),  # the first sentence of the next re-check
        ("braking", "\n\n" + DEFAULT_BRAKING_SENTENCE),
        ("answer", ANSWER),
    ]


def test_dynamic_adds_steps_up_to_the_thresholds():
    # Cut after 3 steps the score is 0.1 * 0/12 = 0; after 4 it is 0.9 * (1 - 3/4) + 0.1 * 1/13 = 0.2327 (> 0.2,
    # <= 0.25: masked); after 5 it is >= 0.9 * (1 - 3/5) = 0.36 (> 0.25: stop).
    r = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="dynamic"))
    assert roles(r) == [
        ("kept", "<think>\n" + "\n\n".join(STEPS[:3])),
        ("masked", "\n\nWait."),
        ("braking", "\n\n" + DEFAULT_BRAKING_SENTENCE),
        ("answer", ANSWER),
    ]
    # A lower mask threshold leaves no whole step to mask: the first sentence of the next step is masked instead.
    r = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="dynamic", mask_threshold=0.22))
    assert [s.role for s in r.segments] == ["kept", "masked", "braking", "answer"]
    assert r.segments[1].text == "\n\nWait."
    # A higher threshold keeps more steps.
    r = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="dynamic", threshold=0.3, mask_threshold=0.4))
    assert r.segments[0].text == "<think>\n" + "\n\n".join(STEPS[:4])
    assert r.segments[1] == type(r.segments[1])("\n\n" + STEPS[4], "masked")


# 6 steps, first correct at index 4: 0.9 * (1 - 5/6) + 0.1 * 1/26 = 0.154, below the 0.2 threshold.
LOW = (
    "<think>\nWe add the two numbers.\n\nThey are 2 and 3.\n\n2 + 3 = 5.\n\nThat is 5.\n\nSo the answer is 5."
    "\n\nWait, the answer is 5.\n</think>\n\nThe answer is 5."
)
# 4 steps, first correct at 2: 0.9 * (1 - 3/4) + 0.1 * 1/15 = 0.232, above 0.2, but with a single re-check.
SHORT = "<think>\nWe add.\n\n2 + 3 = 5.\n\nSo the answer is 5.\n\nWait, the answer is 5.\n</think>\n\nThe answer is 5."


def test_traces_below_the_threshold_and_plain_sft_stay_whole():
    for variant in ("exact", "dynamic"):
        r = build_braking_segments(LOW, CHECK, BrakingConfig(variant=variant))
        assert r.score == pytest.approx(0.9 * (1 - 5 / 6) + 0.1 / 26)
        assert not r.trimmed and r.text == LOW
        assert [s.role for s in r.segments] == ["kept", "answer"]
    whole = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="none"))
    assert not whole.trimmed and whole.text == TRACE


def test_single_recheck_above_the_threshold():
    exact = build_braking_segments(SHORT, CHECK, BrakingConfig(variant="exact"))
    assert exact.score == pytest.approx(0.9 * 0.25 + 0.1 / 15)
    assert not exact.trimmed  # no second re-check to cut into
    dynamic = build_braking_segments(SHORT, CHECK, BrakingConfig(variant="dynamic"))
    assert roles(dynamic) == [
        ("kept", "<think>\nWe add.\n\n2 + 3 = 5.\n\nSo the answer is 5."),
        ("masked", "\n\nWait, the answer is 5."),
        ("braking", "\n\n" + DEFAULT_BRAKING_SENTENCE),
        ("answer", ANSWER),
    ]


def test_stop_token_replaces_the_braking_sentence():
    r = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="exact", stop_token="<|stop|>"))
    assert ("braking", "\n\n<|stop|>") in roles(r)


def test_bad_traces_raise_trace_errors():
    with pytest.raises(TraceError, match="no <think> tag"):
        build_braking_segments("The answer is 5.", CHECK)
    with pytest.raises(TraceError, match="no final answer"):
        build_braking_segments("<think>\nSo the answer is 5.\n</think>\n", CHECK)
    with pytest.raises(TraceError, match="correct answer"):
        build_braking_segments(TRACE, answer_checker("6"))


def test_bad_config_names_the_key():
    with pytest.raises(UserError, match="data.braking"):
        BrakingConfig(variant="sometimes")
    with pytest.raises(UserError, match="mask_threshold"):
        BrakingConfig(threshold=0.3, mask_threshold=0.25)
