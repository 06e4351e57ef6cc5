"""The synthetic task is honest: correct traces, exact checker, problem-disjoint splits, real re-checks."""

from __future__ import annotations

import random

from sdt.data.reasoning.answers import answer_checker
from sdt.data.reasoning.metrics import marker_ratio, split_steps, split_trace, trace_metrics
from sdt.data.reasoning.synthetic import Problem, all_problems, check_answer, make_example, make_split, problem_split


def test_answers_are_computed_from_the_numbers():
    assert Problem("add_sub", 4, 7, 8).answer == 3
    assert Problem("mul_add", 5, 7, 1).answer == 36
    assert Problem("mul_sub", 3, 4, 5).answer == 7
    assert Problem("add_mul", 2, 3, 4).answer == 20
    assert all(p.answer >= 0 for p in all_problems())


def test_splits_are_disjoint_in_problems_and_reproducible():
    splits = {s: make_split(s, 300, seed=3) for s in ("train", "val", "test")}
    keys = {s: {e.problem for e in ex} for s, ex in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert all(problem_split(p) == "test" for p in keys["test"])
    again = make_split("test", 300, seed=3)
    assert [e.trace for e in again] == [e.trace for e in splits["test"]]
    assert [e.trace for e in make_split("test", 300, seed=4)] != [e.trace for e in again]


def test_traces_are_correct_and_rechecks_are_redundant():
    rng = random.Random(0)
    for p in random.Random(1).sample(all_problems(), 50):
        ex = make_example(p, rng, min_rechecks=0, max_rechecks=4)
        thinking, final = split_trace(ex.trace)
        assert check_answer(final, p.answer) and ex.answer == str(p.answer)
        # The prompt states the numbers, not the result of the first operation the trace computes.
        assert f"= {p.first}" not in ex.question
        m = trace_metrics(ex.trace, answer_checker(ex.answer))
        # Only the foundation's last step and the re-checks state the answer; every re-check restates it.
        stated = [i for i, s in enumerate(m.steps) if answer_checker(ex.answer)(s)]
        assert len(stated) == 1 + ex.num_rechecks and stated[0] == m.first_correct
        after = "\n\n".join(split_steps(thinking)[m.first_correct + 1 :])
        assert (marker_ratio(after) > 0) == (ex.num_rechecks > 0)


def test_check_answer_is_exact():
    assert check_answer("The answer is 36.", 36)
    assert not check_answer("The answer is 360.", 36)
    assert not check_answer("The answer is 3.6.", 36)
    assert not check_answer("36", 36)  # no stated answer
