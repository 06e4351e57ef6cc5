"""An offline, checkable reasoning task: two-step arithmetic word problems with overthinking traces.

Each problem combines three small integers with two operations (+, -, x) in a short story; the answer is an
integer the model has to compute (it never appears in the prompt). Its trace is

    <think>
    <foundation solution: restate, (sometimes) list the givens, one step per operation, "So the answer is N.">

    <0 .. max_rechecks redundant re-checks, each opened by a re-check cue ("Wait, let me double-check.", "Hmm, ...",
     "Alternatively, ...") and ending in "The answer is N."; some write the cue as its own step>
    </think>

    The answer is N.

Every intermediate result in a trace is computed from the numbers, so a trace is correct by construction, and
`check_answer` compares the stated integer exactly. Splits are disjoint in the problems themselves: a problem's
family and its three numbers are hashed to train, val or test, so no held-out problem (in any wording) is seen in
training; what transfers is arithmetic, not answers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import product

from sdt.data.reasoning.answers import answers_match, extract_answer

NAMES = ("Tom", "Ana", "Ravi", "Mei", "Lena", "Omar", "Sara", "Ken", "Ines", "Yuki", "Paul", "Nia")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "coins", "eggs")
FAMILIES = ("add_sub", "mul_add", "mul_sub", "add_mul")


@dataclass(frozen=True)
class Problem:
    family: str
    a: int
    b: int
    c: int

    @property
    def first(self) -> int:
        """The result of the first operation."""
        return {"add_sub": self.a + self.b, "add_mul": self.a + self.b}.get(self.family, self.a * self.b)

    @property
    def answer(self) -> int:
        s = self.first
        return {"add_sub": s - self.c, "mul_add": s + self.c, "mul_sub": s - self.c, "add_mul": s * self.c}[self.family]


@dataclass(frozen=True)
class Example:
    problem: Problem
    question: str
    trace: str  # "<think>\n...\n</think>\n\nThe answer is N."
    answer: str
    num_rechecks: int


def all_problems() -> list[Problem]:
    """Every problem of the task: small operands, non-negative answers."""
    problems = []
    for family in FAMILIES:
        if family == "add_mul":
            grid = product(range(2, 7), range(2, 7), range(2, 10))
        else:
            grid = product(range(2, 10), range(2, 10), range(1, 10))
        for a, b, c in grid:
            p = Problem(family, a, b, c)
            if family in ("add_sub", "mul_sub") and c >= p.first:
                continue
            problems.append(p)
    return problems


def problem_split(p: Problem, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """train | val | test, by a fixed hash of the problem (independent of any seed)."""
    digest = hashlib.sha256(f"{p.family}:{p.a}:{p.b}:{p.c}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _question(p: Problem, name: str, item: str) -> str:
    if p.family == "add_sub":
        return f"{name} has {p.a} {item}, gets {p.b} more, then gives {p.c} away. How many {item} does {name} have?"
    if p.family == "mul_add":
        return f"{name} has {p.a} boxes of {p.b} {item} and {p.c} loose {item}. How many {item} does {name} have?"
    if p.family == "mul_sub":
        return f"{name} buys {p.a} packs of {p.b} {item} and uses {p.c}. How many {item} are left?"
    return f"{name} has {p.a} red bags and {p.b} blue bags with {p.c} {item} in each bag. How many {item} are there?"


def _operations(p: Problem, name: str, item: str) -> list[str]:
    """The foundation solution's computation steps."""
    s, n = p.first, p.answer
    if p.family == "add_sub":
        return [f"{name} starts with {p.a} and gets {p.b} more: {p.a} + {p.b} = {s}.", f"Then {s} - {p.c} = {n}."]
    if p.family == "mul_add":
        return [f"The boxes hold {p.a} x {p.b} = {s} {item}.", f"With the loose ones: {s} + {p.c} = {n}."]
    if p.family == "mul_sub":
        return [f"The packs hold {p.a} x {p.b} = {s} {item}.", f"After using {p.c}: {s} - {p.c} = {n}."]
    return [f"There are {p.a} + {p.b} = {s} bags.", f"Each holds {p.c}, so {s} x {p.c} = {n}."]


def _givens(p: Problem) -> str:
    return f"The numbers are {p.a}, {p.b} and {p.c}."


def _recheck_bodies(p: Problem) -> dict[str, str]:
    """Ways to re-check the answer: recompute it forwards, or undo the operations backwards."""
    s, n = p.first, p.answer
    op1 = "+" if p.family in ("add_sub", "add_mul") else "x"
    forward = {
        "add_sub": f"{p.a} + {p.b} = {s} and {s} - {p.c} = {n}.",
        "mul_add": f"{p.a} x {p.b} = {s} and {s} + {p.c} = {n}.",
        "mul_sub": f"{p.a} x {p.b} = {s} and {s} - {p.c} = {n}.",
        "add_mul": f"{p.a} + {p.b} = {s} and {s} x {p.c} = {n}.",
    }[p.family]
    inverse = {
        "add_sub": f"{n} + {p.c} = {s}, which is {p.a} {op1} {p.b}.",
        "mul_add": f"{n} - {p.c} = {s}, which is {p.a} {op1} {p.b}.",
        "mul_sub": f"{n} + {p.c} = {s}, which is {p.a} {op1} {p.b}.",
        "add_mul": f"{s} x {p.c} = {n}, and {s} is {p.a} {op1} {p.b}.",
    }[p.family]
    return {"forward": forward, "inverse": inverse}


# (cue, which re-check follows it)
RECHECK_CUES = (
    ("Wait, let me double-check.", "forward"),
    ("Hmm, let me verify this.", "forward"),
    ("Alternatively, I can check it backwards.", "inverse"),
    ("Let me check again.", "forward"),
    ("But wait, is that right?", "inverse"),
    ("Hmm, to be sure, once more.", "forward"),
)


def make_example(p: Problem, rng: random.Random, min_rechecks: int = 0, max_rechecks: int = 5) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    n = p.answer
    steps = [f"We need the number of {item} at the end."]
    if rng.random() < 0.5:
        steps.append(_givens(p))
    steps += _operations(p, name, item)
    steps.append(f"So the answer is {n}.")
    num_rechecks = rng.randint(min_rechecks, max_rechecks)
    bodies = _recheck_bodies(p)
    for _ in range(num_rechecks):
        cue, kind = rng.choice(RECHECK_CUES)
        body = bodies[kind]
        conclusion = f"The answer is {n}."
        if rng.random() < 0.5:  # the cue as a step of its own, as reasoning models often write it
            steps += [cue, f"{body} {conclusion}"]
        else:
            steps.append(f"{cue} {body} {conclusion}")
    thinking = "\n\n".join(steps)
    answer = f"The answer is {n}."
    trace = f"<think>\n{thinking}\n</think>\n\n{answer}"
    return Example(p, _question(p, name, item), trace, str(n), num_rechecks)


def make_split(
    split: str,
    num_examples: int,
    seed: int,
    min_rechecks: int = 0,
    max_rechecks: int = 5,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    stream: str | None = None,
) -> list[Example]:
    """`num_examples` examples drawn (with replacement) from the problems of `split`, reproducibly from `seed`.

    `stream` names an independent draw from the same problems (default: the split's name)."""
    pool = [p for p in all_problems() if problem_split(p, val_fraction, test_fraction) == split]
    if not pool:
        raise ValueError(f"no problems fall in split {split!r}")
    # A different stream per split, so changing one split's size leaves the others unchanged.
    rng = random.Random(f"{seed}:{stream or split}")
    return [make_example(rng.choice(pool), rng, min_rechecks, max_rechecks) for _ in range(num_examples)]


def check_answer(text: str, reference: str | int) -> bool:
    """Exact check: does `text` state `reference` as its (last) answer?"""
    return answers_match(extract_answer(text), str(reference))
