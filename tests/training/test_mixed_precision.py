"""Training under `trainer.precision=bf16-mixed` and `16-mixed` (autocast, which runs on CPU too) through `train.py`'s
`train`, for every architecture, with and without skip maps and with the conversion recipe's options; then the
checkpoint such a run writes is evaluated, generated from and exported like any other.

The default suite trains a representative subset (each architecture once, each precision twice, skip maps, the
recipe and activation checkpointing included); the slow suite trains the whole matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sdt.cli.dispatch import evaluate
from sdt.evaluation.loading import load_model
from sdt.export import export
from sdt.generate import main as generate_main
from sdt.training.checkpoint import load_checkpoint, model_state_dict
from sdt.training.train import train
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data

PRECISIONS = ["bf16-mixed", "16-mixed"]
# The conversion recipe (conf/model/recipe/convert.yaml), at tiny scale (no pretrained weights, so no skip-map fit).
RECIPE = [
    "model.n_layers=4",
    "model.dense_first=1",
    "model.dense_last=1",
    "model.always_execute_first=1",
    "model.routed_attention=full",
    "model.student_norm=true",
    "model.skip_map=linear",
    "distill.weight=1.0",
    "distill.teacher=self",
]
VARIANTS = {
    "plain": ["model.skip_map=none"],
    "skip_map": ["model.skip_map=linear"],
    "recipe": RECIPE,
    # model.activation_checkpointing re-runs each layer under the autocast state of its first run.
    "checkpointed": ["model.skip_map=linear", "model.activation_checkpointing=true"],
}
# (arch, variant, precision) trained in the default suite; the rest of the matrix runs in the slow suite.
FAST = {
    ("sdt", "skip_map", "bf16-mixed"),  # the default model on a GPU preset: what crashed before
    ("mod", "checkpointed", "16-mixed"),
    ("stt", "recipe", "bf16-mixed"),
    ("dense", "plain", "16-mixed"),
}
MATRIX = [
    pytest.param(arch, variant, precision, marks=[] if (arch, variant, precision) in FAST else [pytest.mark.slow])
    for arch in ("dense", "mod", "sdt", "stt")
    for variant in (("plain",) if arch == "dense" else tuple(VARIANTS))
    for precision in PRECISIONS
]


def train_mixed(arch: str, variant: str, precision: str, out: Path, corpus_files: list[str], cache_dir: Path) -> dict:
    overrides = [
        f"model={arch}",
        *TINY_MODEL,
        *TINY_TRAINER,
        *tiny_data(corpus_files),
        *(VARIANTS[variant] if arch != "dense" else []),  # dense has no routing options: its one variant is plain
        f"trainer.precision={precision}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "data.calibration_blocks=4",
    ]
    return train(compose_cfg("train", overrides, out, cache_dir))


@pytest.mark.parametrize("arch, variant, precision", MATRIX)
def test_every_architecture_trains_under_mixed_precision(arch, variant, precision, tmp_path, corpus_files, cache_dir):
    result = train_mixed(arch, variant, precision, tmp_path, corpus_files, cache_dir)
    assert result["global_step"] == 2
    assert math.isfinite(result["metrics"]["val/loss"]), result["metrics"]
    ckpt = load_checkpoint(result["last_checkpoint"])
    # Autocast computes in half precision; the weights (and what is saved) stay fp32.
    weights = model_state_dict(ckpt)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    # Quantile grids hold +inf at the top for positions that always execute (always_execute_first); NaN would mean
    # uncalibrated.
    for name, value in weights.items():
        if name.endswith(".quantiles"):
            assert not torch.isnan(value).any(), name
        elif value.is_floating_point():
            assert torch.isfinite(value).all(), name
    if arch != "dense":
        # Calibrated before the final validation, under autocast, from the fp32 routing scores.
        thresholds = [v for k, v in weights.items() if k.endswith(".threshold")]
        assert thresholds and all(torch.isfinite(t).all() for t in thresholds)
        fractions = {k: v for k, v in result["metrics"].items() if k.endswith("executed_fraction")}
        assert fractions and all(0.0 < v <= 1.0 for v in fractions.values()), fractions


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, corpus_files, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("bf16_sdt")
    train_mixed("sdt", "skip_map", "bf16-mixed", out, corpus_files, cache_dir)
    return out / "checkpoints" / "last.ckpt"


def test_a_mixed_precision_checkpoint_evaluates_generates_and_exports(bf16_run, tmp_path, cache_dir, capsys):
    overrides = [
        f"ckpt_path={bf16_run}",
        "samples.prompts=[KING]",
        "samples.max_new_tokens=4",
        "generation.max_new_tokens=8",
        "generation.repeats=1",
        "max_batches=1",
        "plots=false",
    ]
    result = evaluate(compose_cfg("eval", overrides, tmp_path / "eval", cache_dir))
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["perplexity"] == pytest.approx(result["perplexity"])
    assert math.isfinite(result["perplexity"]) and math.isfinite(result["splits"]["test"]["nll"])

    generate_main([f"ckpt_path={bf16_run}", "prompt=KING:", "max_new_tokens=4", "temperature=0"])
    assert "KING:" in capsys.readouterr().out

    from transformers import AutoModelForCausalLM

    out = export(str(bf16_run), str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ours = load_model(load_checkpoint(str(bf16_run)), torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids, routing=ours.config.inference_routing).logits
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
