"""Self-braking training data (arXiv 2505.14604, section 3): trim an overthinking trace after enough re-checks, let
the model see the start of the next re-check without learning to write it, and teach it to stop there.

Both constructions act on traces whose overthink score exceeds `threshold` (0.2); other traces stay whole.

* exact: keep the foundation solution (the steps up to the first correct answer) and the first re-check (the steps
  up to the next step that states the correct answer again); the first `masked_sentences` sentences of the next
  re-check become the masked slice; then the braking text, then the final answer.
* dynamic: add steps one by one, as long as the overthink score of the trace cut after them stays <= `threshold`;
  those steps are kept. The following steps, as long as the score stays <= `mask_threshold` (0.25), become the
  masked slice; when even the next step passes 0.25 its first `masked_sentences` sentences are the masked slice.

The result is a list of segments whose texts concatenate to the training completion:

    kept     "<think>\\n" + kept steps             loss
    masked   "\\n\\n" + the masked slice          no loss: the model sees it, never learns to write it
    braking  "\\n\\n" + braking sentence/token    loss
    answer   "\\n</think>\\n\\n" + final answer   loss

so the tokenised loss mask follows from the segment roles alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from sdt.common.errors import UserError
from sdt.data.reasoning.metrics import (
    DEFAULT_MARKERS,
    THINK_CLOSE,
    THINK_OPEN,
    TraceError,
    efficiency_ratio,
    marker_ratio,
    overthink_score,
    split_steps,
    split_trace,
    steps_metrics,
)

BrakingVariant = Literal["none", "exact", "dynamic"]  # plain SFT on full traces | trimmed at a fixed | dynamic point
VARIANTS: tuple[BrakingVariant, ...] = get_args(BrakingVariant)
ROLES = ("kept", "masked", "braking", "answer")
LOSS_ROLES = frozenset({"kept", "braking", "answer"})
DEFAULT_BRAKING_SENTENCE = "I have verified my answer. No need to continue thinking."
STEP_SEPARATOR = "\n\n"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Segment:
    text: str
    role: str  # kept | masked | braking | answer

    @property
    def has_loss(self) -> bool:
        return self.role in LOSS_ROLES


@dataclass
class BrakingConfig:
    """How traces are trimmed. `stop_token`, when set, replaces the braking sentence."""

    variant: BrakingVariant = "exact"
    threshold: float = 0.2
    mask_threshold: float = 0.25
    braking_sentence: str = DEFAULT_BRAKING_SENTENCE
    stop_token: str | None = None
    masked_sentences: int = 1
    markers: Sequence[str] = field(default_factory=lambda: list(DEFAULT_MARKERS))

    def __post_init__(self) -> None:
        p = "data.braking"
        if self.variant not in VARIANTS:  # the data config's key is `data.braking`
            raise UserError(f"{p} must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        for key, value in (("threshold", self.threshold), ("mask_threshold", self.mask_threshold)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise UserError(f"data.braking_{key} must be a number in [0, 1], got {value!r}")
        if self.mask_threshold < self.threshold:
            raise UserError(
                f"data.braking_mask_threshold={self.mask_threshold} must be >= data.braking_threshold={self.threshold}"
            )
        if not self.braking_text.strip():
            raise UserError("data.braking_sentence (or data.stop_token) must not be empty")
        if isinstance(self.masked_sentences, bool) or not isinstance(self.masked_sentences, int):
            raise UserError(f"data.masked_sentences must be an integer >= 1, got {self.masked_sentences!r}")
        if self.masked_sentences < 1:
            raise UserError(f"data.masked_sentences must be >= 1, got {self.masked_sentences}")

    @property
    def braking_text(self) -> str:
        return self.stop_token if self.stop_token else self.braking_sentence


@dataclass(frozen=True)
class BrakingResult:
    segments: list[Segment]
    score: float  # overthink score of the original trace
    trimmed: bool

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def first_sentences(step: str, n: int) -> str:
    return " ".join(_SENTENCE_END.split(step.strip())[:n])


def prefix_score(steps: Sequence[str], first_correct: int, end: int, markers: Sequence[str]) -> float:
    """Overthink score of the trace cut after steps[:end] (end > first_correct)."""
    return overthink_score(
        marker_ratio(STEP_SEPARATOR.join(steps[:end]), markers), efficiency_ratio(first_correct, end)
    )


def _exact_cut(
    steps: Sequence[str], first: int, is_correct: Callable[[str], bool], cfg: BrakingConfig
) -> tuple[int, list[str], str] | None:
    """(steps kept, masked steps, masked partial step), or None when there is no second re-check to cut."""
    recheck_end = next((i for i in range(first + 1, len(steps)) if is_correct(steps[i])), None)
    if recheck_end is None or recheck_end + 1 >= len(steps):
        return None
    return recheck_end + 1, [], first_sentences(steps[recheck_end + 1], cfg.masked_sentences)


def _dynamic_cut(steps: Sequence[str], first: int, cfg: BrakingConfig) -> tuple[int, list[str], str] | None:
    kept = first + 1
    while kept < len(steps) and prefix_score(steps, first, kept + 1, cfg.markers) <= cfg.threshold:
        kept += 1
    if kept >= len(steps):
        return None
    masked_end = kept
    while masked_end < len(steps) and prefix_score(steps, first, masked_end + 1, cfg.markers) <= cfg.mask_threshold:
        masked_end += 1
    if masked_end > kept:
        return kept, list(steps[kept:masked_end]), ""
    return kept, [], first_sentences(steps[kept], cfg.masked_sentences)


def whole_trace_segments(steps: Sequence[str], answer: str) -> list[Segment]:
    return [
        Segment(THINK_OPEN + "\n" + STEP_SEPARATOR.join(steps), "kept"),
        Segment("\n" + THINK_CLOSE + "\n\n" + answer, "answer"),
    ]


def build_braking_segments(
    trace: str, is_correct: Callable[[str], bool], cfg: BrakingConfig | None = None
) -> BrakingResult:
    """Segments of the training completion for `trace` under `cfg.variant`.

    Raises TraceError for a trace without think tags, without steps, without a final answer, or in which no step
    states the correct answer (callers that build datasets skip such traces and count them).
    """
    cfg = cfg or BrakingConfig()
    thinking, answer = split_trace(trace)
    if not answer:
        raise TraceError(f"trace has nothing after {THINK_CLOSE} (no final answer)")
    steps = split_steps(thinking)
    metrics = steps_metrics(steps, is_correct, cfg.markers)
    whole = BrakingResult(whole_trace_segments(steps, answer), metrics.score, trimmed=False)
    if cfg.variant == "none" or metrics.score <= cfg.threshold:
        return whole
    if cfg.variant == "exact":
        cut = _exact_cut(steps, metrics.first_correct, is_correct, cfg)
    else:
        cut = _dynamic_cut(steps, metrics.first_correct, cfg)
    if cut is None:
        return whole
    kept, masked_steps, masked_partial = cut
    masked = STEP_SEPARATOR.join(masked_steps) if masked_steps else masked_partial
    segments = [Segment(THINK_OPEN + "\n" + STEP_SEPARATOR.join(steps[:kept]), "kept")]
    if masked:
        segments.append(Segment(STEP_SEPARATOR + masked, "masked"))
    segments += [
        Segment(STEP_SEPARATOR + cfg.braking_text, "braking"),
        Segment("\n" + THINK_CLOSE + "\n\n" + answer, "answer"),
    ]
    return BrakingResult(segments, metrics.score, trimmed=True)
