"""Self-braking reasoning: overthinking metrics, braking data construction, a synthetic task and its evaluation."""

from sdt.reasoning.braking import BrakingConfig, BrakingResult, Segment, build_braking_segments
from sdt.reasoning.metrics import (
    DEFAULT_MARKERS,
    TraceError,
    TraceMetrics,
    efficiency_ratio,
    first_correct_step,
    marker_ratio,
    overthink_score,
    split_steps,
    split_trace,
    trace_metrics,
)

__all__ = [
    "DEFAULT_MARKERS",
    "BrakingConfig",
    "BrakingResult",
    "Segment",
    "TraceError",
    "TraceMetrics",
    "build_braking_segments",
    "efficiency_ratio",
    "first_correct_step",
    "marker_ratio",
    "overthink_score",
    "split_steps",
    "split_trace",
    "trace_metrics",
]
