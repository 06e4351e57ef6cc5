"""Routing plots write real PNGs that show the data they are given (read back pixel by pixel where a cell or bar is
drawn), size the heatmap by sequence length, and read sparse CSVLogger files."""

from __future__ import annotations

import csv
import struct
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from sdt.analysis.plots import (
    display_token,
    executed_fraction_figure,
    gate_contributions_figure,
    plot_executed_fraction,
    plot_gate_contributions,
    plot_routing_heatmap,
    routing_heatmap_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which always follows the 8-byte signature."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def png_colours(png_path: str, fig: Figure, ax: Axes) -> Callable[[float, float], np.ndarray]:
    """RGB of the written PNG at a data point (x, y) of `ax`; `fig` is the same figure built again from the same
    inputs (drawn here, so its layout is the one savefig wrote)."""
    png = matplotlib.image.imread(png_path)  # (H, W, 4), rows from the top
    fig.canvas.draw()
    assert png.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))

    def colour_at(x: float, y: float) -> np.ndarray:
        px, py = ax.transData.transform((x, y))  # display pixels, from the bottom left
        return png[int(png.shape[0] - py), int(px), :3]

    return colour_at


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


def test_heatmap_draws_each_decision_in_its_cell(tmp_path):
    # Layer 1 executes every token, layer 3 none, layer 5 five chosen positions: rows, columns and colours must match.
    executed = np.zeros((3, 16))
    executed[0] = 1.0
    executed[2, [0, 3, 4, 9, 15]] = 1.0
    args = (executed, [f"t{i}" for i in range(16)], ["layer 1", "layer 3", "layer 5"])
    out = plot_routing_heatmap(*args, str(tmp_path / "heat.png"))
    fig = routing_heatmap_figure(*args)
    ax = fig.axes[0]
    colour_at = png_colours(out, fig, ax)
    blues = matplotlib.colormaps["Blues"]
    executed_rgb, skipped_rgb = np.array(blues(1.0)[:3]), np.array(blues(0.0)[:3])
    assert np.abs(executed_rgb - skipped_rgb).max() > 0.5  # an all-executed and an all-skipped row look different
    for layer in range(3):
        for t in range(16):
            expected = executed_rgb if executed[layer, t] else skipped_rgb
            np.testing.assert_allclose(colour_at(t, layer), expected, atol=0.02, err_msg=f"{layer},{t}")
    # Row y is labelled with layer y, column x with token x; each row's executed share is printed on the right.
    assert [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()] == list(enumerate(args[2]))
    assert [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels()] == list(enumerate(args[1]))
    assert [t.get_text() for t in ax.child_axes[0].get_yticklabels()] == ["100%", "0%", "31%"]


def test_heatmap_gate_values_and_shape_check(tmp_path):
    gates = np.random.default_rng(1).random((2, 16))
    args = (gates, list("abcdefghijklmnop"), ["L1", "L3"])
    out = plot_routing_heatmap(*args, str(tmp_path / "sub" / "gates.png"))
    fig = routing_heatmap_figure(*args)
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # gate values get a colour bar
    colour_at = png_colours(out, fig, ax)
    viridis = matplotlib.colormaps["viridis"]
    for layer in range(2):
        for t in range(16):
            expected = viridis(gates[layer, t])[:3]
            np.testing.assert_allclose(colour_at(t, layer), expected, atol=0.02, err_msg=f"{layer},{t}")
    with pytest.raises(ValueError, match="shape"):
        plot_routing_heatmap(gates, list("abc"), ["L1", "L3"], str(tmp_path / "bad.png"))


def test_executed_fraction(tmp_path):
    fractions, labels = [1.0, 0.0, 0.25, 0.5], ["L1", "L3", "L5", "L7"]
    out = plot_executed_fraction(fractions, labels, str(tmp_path / "frac.png"), capacity=0.5)
    fig = executed_fraction_figure(fractions, labels, capacity=0.5)
    ax = fig.axes[0]
    # One bar per layer, in order, as tall as its fraction, labelled with it; the capacity as one horizontal line.
    assert [p.get_height() for p in ax.patches] == fractions
    assert [p.get_x() + p.get_width() / 2 for p in ax.patches] == pytest.approx(range(4))
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.texts] == ["100%", "0%", "25%", "50%"]
    assert [list(line.get_ydata()) for line in ax.lines] == [[0.5, 0.5]]
    # In the PNG: the foot of each bar is the bar colour, an empty layer's is background.
    bar, background = np.array(to_rgb("tab:blue")), np.array(fig.get_facecolor()[:3])
    colour_at = png_colours(out, fig, ax)
    for i, f in enumerate(fractions):
        expected = bar if f > 0 else background
        np.testing.assert_allclose(colour_at(i, max(0.2 * f, 0.05)), expected, atol=0.02)
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


def test_gate_contributions_plot_the_logged_values(tmp_path):
    metrics = tmp_path / "metrics.csv"
    write_metrics(metrics)
    top, bottom = gate_contributions_figure(str(metrics)).axes
    steps = np.arange(0, 40, 2)
    t = steps / 40

    def lines(ax, color: str) -> list:
        return [line for line in ax.lines if line.get_color() == color]

    # Per signal: a thin line per layer with the values it logged (validation rows add nothing), then the mean.
    *ce_layers, ce_mean = lines(top, "tab:blue")
    *cu_layers, cu_mean = lines(top, "tab:orange")
    assert len(ce_layers) == len(cu_layers) == 2
    np.testing.assert_allclose(ce_layers[1].get_ydata(), 0.3 + 0.5 * t + 0.03)
    np.testing.assert_array_equal(cu_layers[1].get_xdata(), steps[steps % 4 == 0])  # layer 3's ragged S_CU
    np.testing.assert_array_equal(ce_mean.get_xdata(), steps)
    np.testing.assert_allclose(ce_mean.get_ydata(), 0.3 + 0.5 * t + 0.02)  # mean of layers 1 and 3
    np.testing.assert_allclose(cu_mean.get_ydata(), 0.8 - 0.5 * t)  # the mean over the layers logged that step
    *_, dominant_mean = lines(bottom, "tab:green")
    np.testing.assert_allclose(dominant_mean.get_ydata(), t)


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
