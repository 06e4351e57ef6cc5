"""Exact answer extraction and comparison."""

from __future__ import annotations

from sdt.data.reasoning.answers import answer_checker, answers_match, extract_answer


def test_extract_answer_prefers_the_last_boxed_then_the_last_statement():
    assert extract_answer(r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2}}") == "x^{2}"
    assert extract_answer("The answer is 12. No wait, the answer is 13.") == "13"
    assert extract_answer("the answer is: $-4$") == "-4"
    assert extract_answer("no answer here") is None


def test_answers_match_exactly():
    assert answers_match("12", "12.0") and answers_match("+12", "12") and answers_match("1,200", "1200")
    assert not answers_match("12.01", "12")
    assert not answers_match("120", "12")
    assert answers_match(r"\left(1, 2\right)", "(1,2)")
    assert not answers_match(None, "1")
    check = answer_checker("36")
    assert check("So the answer is 36.") and not check("So the answer is 63.") and not check("36")
