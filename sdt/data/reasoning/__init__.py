"""The data of self-braking reasoning: overthinking metrics of a trace, braking data construction, a synthetic task,
answer parsing and the SFT data module (`datamodule`). Its evaluation is `sdt.reasoning`."""

from sdt.data.reasoning.braking import BrakingConfig, BrakingResult, Segment, build_braking_segments
from sdt.data.reasoning.metrics import (
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
