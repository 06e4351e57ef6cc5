"""Routing plots write real PNGs, size the heatmap by sequence length, and read sparse CSVLogger files."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import pytest

from sdt.analysis.plots import display_token, plot_executed_fraction, plot_gate_contributions, plot_routing_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which always follows the 8-byte signature."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def decisions(n_layers: int, T: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n_layers, T)) < 0.5).astype(float)


def test_display_token_escapes():
    assert display_token("a\nb") == "a⏎b"
    assert display_token(" the") == "␣the"
    assert display_token("$") == r"\$"
    assert display_token("") == "∅"
    assert display_token("\x00") == "\\x00"
    assert len(display_token("x" * 50)) == 12


def test_heatmap_writes_png_that_grows_with_T(tmp_path):
    layers = ["layer 1", "layer 3", "layer 5"]
    sizes = []
    for T in (8, 128):
        tokens = [f"tok{i}" if i % 7 else " the\n" for i in range(T)]
        out = plot_routing_heatmap(decisions(3, T), tokens, layers, str(tmp_path / f"heat_{T}.png"))
        assert out == str(tmp_path / f"heat_{T}.png")
        sizes.append(png_size(out))
    assert sizes[1][0] > sizes[0][0]
    assert (tmp_path / "heat_128.png").stat().st_size < 1_000_000  # small enough to commit next to a paper


def test_heatmap_gate_values_and_shape_check(tmp_path):
    gates = np.random.default_rng(1).random((2, 16))
    out = plot_routing_heatmap(gates, list("abcdefghijklmnop"), ["L1", "L3"], str(tmp_path / "sub" / "gates.png"))
    assert png_size(out)[0] > 0
    with pytest.raises(ValueError, match="shape"):
        plot_routing_heatmap(gates, list("abc"), ["L1", "L3"], str(tmp_path / "bad.png"))


def test_executed_fraction(tmp_path):
    out = plot_executed_fraction([0.48, 0.52, 0.5], ["L1", "L3", "L5"], str(tmp_path / "frac.png"), capacity=0.5)
    assert png_size(out)[0] > 0
    assert png_size(plot_executed_fraction([0.3], ["L1"], str(tmp_path / "one.png")))[0] > 0


def write_metrics(path, with_dominance: bool = True) -> None:
    """A CSVLogger-style file: routing columns filled every other row, validation rows leave them empty."""
    names = ["epoch", "step", "train/loss", "val/loss"]
    for layer in (1, 3):
        names += [f"routing/layers.{layer}.s_ce", f"routing/layers.{layer}.s_cu"]
        if with_dominance:
            names.append(f"routing/layers.{layer}.ce_dominant_fraction")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for step in range(0, 40, 2):
            row = {"epoch": 0, "step": step, "train/loss": 5 - step / 10}
            for layer in (1, 3):
                t = step / 40
                row[f"routing/layers.{layer}.s_ce"] = 0.3 + 0.5 * t + 0.01 * layer
                if layer == 1 or step % 4 == 0:  # layer 3 logs S_CU less often: means must handle ragged layers
                    row[f"routing/layers.{layer}.s_cu"] = 0.8 - 0.5 * t
                if with_dominance:
                    row[f"routing/layers.{layer}.ce_dominant_fraction"] = t
            writer.writerow(row)
            if step % 10 == 0:
                writer.writerow({"epoch": 0, "step": step, "val/loss": 4.5})  # sparse row: routing columns empty


def test_gate_contributions(tmp_path):
    heights = {}
    for with_dominance in (True, False):
        metrics = tmp_path / f"metrics_{with_dominance}.csv"
        write_metrics(metrics, with_dominance)
        path = str(tmp_path / f"gates_{with_dominance}.png")
        assert plot_gate_contributions(str(metrics), path) == path
        width, heights[with_dominance] = png_size(path)
        assert width > 0
    assert heights[True] > heights[False]  # the ce_dominant_fraction panel is drawn only when logged


def test_gate_contributions_without_routing_columns(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,routing/layers.1.executed_fraction\n0,0,5.0,0.5\n0,1,4.9,\n")
    out_path = tmp_path / "gates.png"
    assert plot_gate_contributions(str(metrics), str(out_path)) is None
    assert not out_path.exists()
    # Columns present but never filled: nothing to plot either.
    empty = tmp_path / "empty.csv"
    empty.write_text("step,routing/layers.1.s_ce,routing/layers.1.s_cu\n0,,\n1,,\n")
    assert plot_gate_contributions(str(empty), str(out_path)) is None
    assert not out_path.exists()
