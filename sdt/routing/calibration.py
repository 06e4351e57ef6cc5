"""Threshold calibration under its former path; it lives with the models in `sdt.models.calibration`
(benchmarks/compute.py still imports it from here)."""

from sdt.models.calibration import calibrate_thresholds, mode_of_score, quantile

__all__ = ["calibrate_thresholds", "mode_of_score", "quantile"]
