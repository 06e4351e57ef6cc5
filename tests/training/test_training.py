"""train.py end to end through the real Hydra configs: checkpoints, logged metrics, resume."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import sdt.training.train
from sdt.models import ModelConfig
from sdt.training.checkpoint import load_checkpoint
from sdt.training.lit_module import LitLM
from sdt.training.train import train
from tests.conftest import TINY_DIMS, TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data


def test_train_writes_checkpoints_with_everything_evaluation_needs(trained_run):
    last = trained_run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (trained_run / "checkpoints" / "best.ckpt").is_file()
    ckpt = load_checkpoint(str(last))  # loads with weights_only=True
    # max_steps=6 is not a multiple of val_check_interval=4: the final step must still be validated and saved.
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["model"]["d_model"] == TINY_DIMS["d_model"]
    assert ckpt["hyper_parameters"]["model"]["vocab_size"] % 64 == 0
    assert ckpt["sdt"]["tokenizer"] and ckpt["sdt"]["config"]["data"]["corpus"] == "text_files"
    assert set(ckpt["sdt"]["data_stats"]) == {"train", "val", "test"}


def test_last_checkpoint_is_the_final_step_even_when_validation_gets_worse(tmp_path, corpus_files, cache_dir):
    # mode=max makes the first validation the "best" for ever after: best.ckpt stays at step 4, and last.ckpt must
    # still move on to the final step (Lightning's save_last alone would leave it at step 4).
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), "callbacks.model_checkpoint.mode=max"]
    overrides += ["trainer.max_steps=8"]
    result = train(compose_cfg("train", overrides, tmp_path, cache_dir))
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))["global_step"] == 8
    assert load_checkpoint(str(tmp_path / "checkpoints" / "best.ckpt"))["global_step"] == 4
    assert result["last_checkpoint"].endswith("last.ckpt") and result["best_checkpoint"].endswith("best.ckpt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_train_logs_loss_ppl_lr_and_throughput(trained_run):
    with open(trained_run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/loss", "train/ppl", "train/lr", "train/tokens_per_s", "val/loss", "val/ppl"} <= columns
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    ppl = [float(r["val/ppl"]) for r in rows if r["val/ppl"]]
    assert len(val) == 2  # step 4 and the final step 6
    assert math.isclose(ppl[-1], math.exp(val[-1]), rel_tol=1e-4)
    tps = [float(r["train/tokens_per_s"]) for r in rows if r["train/tokens_per_s"]]
    assert tps and all(t > 0 for t in tps)
    compute = [r for r in rows if r.get("compute/flops_ratio_vs_dense")]
    # Logged once; the default model is SDT at capacity 0.5: cheaper than dense, with 3/4 of its KV entries.
    assert len(compute) == 1 and 0 < float(compute[0]["compute/flops_ratio_vs_dense"]) < 1
    assert float(compute[0]["compute/kv_entries_ratio_vs_dense"]) == 0.75


def test_training_reduces_the_loss(tmp_path, corpus_files, cache_dir):
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)]
    overrides += ["trainer.max_steps=40", "trainer.val_check_interval=40", "optim.warmup_steps=5", "optim.lr=3e-3"]
    result = train(compose_cfg("train", overrides, tmp_path, cache_dir))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert losses[-1] < losses[0] - 0.5
    assert result["metrics"]["val/loss"] < math.log(320)  # better than a uniform guess over the vocabulary


def test_resume_continues_the_step_count_with_the_checkpoint_architecture(
    tmp_path, trained_run, corpus_files, cache_dir
):
    last = trained_run / "checkpoints" / "last.ckpt"
    overrides = [*TINY_TRAINER, *tiny_data(corpus_files), f"ckpt_path={last}", "trainer.max_steps=10"]
    # A different d_model on the command line must not matter: resuming takes the architecture from the checkpoint.
    overrides.append(f"model.d_model={2 * TINY_DIMS['d_model']}")
    result = train(compose_cfg("train", overrides, tmp_path, cache_dir))
    assert result["global_step"] == 10
    ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert ckpt["global_step"] == 10 and ckpt["hyper_parameters"]["model"]["d_model"] == TINY_DIMS["d_model"]


def test_seeded_runs_are_reproducible(tmp_path, corpus_files, cache_dir):
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), "trainer.max_steps=3"]
    a = train(compose_cfg("train", overrides, tmp_path / "a", cache_dir))
    b = train(compose_cfg("train", overrides, tmp_path / "b", cache_dir))
    wa = load_checkpoint(a["last_checkpoint"])["state_dict"]
    wb = load_checkpoint(b["last_checkpoint"])["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_model_compile_trains_and_checkpoints_eager_names(tmp_path, corpus_files, cache_dir):
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), "trainer.max_steps=2", "model.compile=true"]
    result = train(compile_cfg := compose_cfg("train", overrides, tmp_path, cache_dir))
    assert compile_cfg.model.compile and result["global_step"] == 2
    state = load_checkpoint(result["last_checkpoint"])["state_dict"]
    assert not any("_orig_mod" in k for k in state)  # compiled in place: checkpoints load into eager models


@pytest.mark.slow  # two Python start-ups and a short training run
def test_sublayer_routing_trains_through_the_entry_point_and_a_bad_value_is_one_line(tmp_path, corpus_files, cache_dir):
    """`python train.py debug=fast model=sdt model.routed_sublayer=attention` trains, and the checkpoint's model
    routes attention only: evaluation rebuilds it from the checkpoint alone."""
    from sdt.evaluation.loading import load_model
    from tests.conftest import run_cli

    run = tmp_path / "run"
    args = ["train.py", "debug=fast", "model=sdt", "model.routed_sublayer=attention", *TINY_MODEL, *TINY_TRAINER]
    args += [*tiny_data(corpus_files), "trainer.max_steps=2", f"hydra.run.dir={run}"]
    proc = run_cli(args, cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["model"]["routed_sublayer"] == "attention"
    model = load_model(ckpt, torch.device("cpu"))
    assert all(layer.routed_sublayer == "attention" for _, layer in model.routed_layers())
    bad = run_cli(["train.py", "model.routed_sublayer=ffn", f"hydra.run.dir={tmp_path / 'bad'}"], cache_dir)
    assert bad.returncode == 2 and bad.stdout == ""
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: model.routed_sublayer must be one of") and "'ffn'" in line, line
    assert not (tmp_path / "bad").exists()


def test_train_builds_the_model_config_once_and_the_layers_read_that_object(
    tmp_path, corpus_files, cache_dir, monkeypatch
):
    # The capacity's path to Top-K (docs/architecture.md): `model.*` -> the one ModelConfig -> RoutedLayer.capacity.
    built: list[ModelConfig] = []
    for name in ("from_dict", "from_saved"):
        real = getattr(ModelConfig, name).__func__

        def spy(cls, d, real=real):
            built.append(real(cls, d))
            return built[-1]

        monkeypatch.setattr(ModelConfig, name, classmethod(spy))
    modules: list[LitLM] = []

    class Recorded(LitLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modules.append(self)

    monkeypatch.setattr(sdt.training.train, "LitLM", Recorded)
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), "model=sdt", "model.capacity=0.25"]
    train(compose_cfg("train", overrides, tmp_path, cache_dir))
    assert len(built) == 1 and len(modules) == 1
    cfg = built[0]
    assert modules[0].model_config is cfg and modules[0].model.config is cfg
    assert [layer.capacity for _, layer in modules[0].model.routed_layers()] == [0.25]
