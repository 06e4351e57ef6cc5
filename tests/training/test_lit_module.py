"""The LightningModule's training-time recipe options (distillation), resume under the recipe, removed options."""

import csv

import pytest
import torch

from sdt.common.errors import UserError
from sdt.training.checkpoint import load_checkpoint
from sdt.training.lit_module import LitLM
from sdt.training.train import train
from tests.conftest import TINY_TRAINER, compose_cfg, tiny_data, tiny_model_overrides
from tests.faults import CrashedOnPurpose

ROUTED_TINY = tiny_model_overrides(n_layers=4)  # model=sdt (the default) with two decision/dynamic pairs, not one


def run(tmp_path, corpus_files, cache_dir, *extra):
    overrides = [*ROUTED_TINY, *TINY_TRAINER, *tiny_data(corpus_files), "optim.warmup_steps=0", *extra]
    train(compose_cfg("train", overrides, tmp_path, cache_dir))
    ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        return ckpt, list(csv.DictReader(f))


def test_distillation_is_logged_apart_from_the_lm_loss(tmp_path, corpus_files, cache_dir):
    _, rows = run(tmp_path, corpus_files, cache_dir, "distill.weight=1.0", "distill.temperature=2.0")
    distill = [float(r["train/aux/distill"]) for r in rows if r.get("train/aux/distill")]
    assert distill and all(d >= 0 for d in distill)
    total = [float(r["train/total_loss"]) for r in rows if r.get("train/total_loss")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/total_loss")]
    assert all(t > lo for t, lo in zip(total, loss, strict=True))  # the KL adds to the LM loss, not replaces it


def test_resume_is_exact_under_the_full_recipe(tmp_path, corpus_files, cache_dir):
    recipe = [
        "model.capacity=0.25", "model.always_execute_first=1", "model.skip_map=linear", "distill.weight=0.5",
        "trainer.max_steps=8", "trainer.val_check_interval=8", "callbacks.last_checkpoint.every_n_train_steps=3",
    ]  # fmt: skip
    base = [*ROUTED_TINY, *TINY_TRAINER, *tiny_data(corpus_files), "optim.warmup_steps=0", *recipe]
    train(compose_cfg("train", base, tmp_path / "ref", cache_dir))
    crash = ["+callbacks.crash._target_=tests.faults.CrashAtStep", "+callbacks.crash.step=5"]
    with pytest.raises(CrashedOnPurpose):
        train(compose_cfg("train", base + crash, tmp_path / "crashed", cache_dir))
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    assert (
        load_checkpoint(str(last))["global_step"] == 3
    )  # mid-run: resumed with the capacity and distillation in force
    train(compose_cfg("train", [*base, f"ckpt_path={last}"], tmp_path / "resumed", cache_dir))
    a = load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "last.ckpt"))["state_dict"]
    b = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hyper_parameters_of_a_checkpoint_from_before_router_warm_up_was_removed_still_load():
    model = {"arch": "sdt", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}
    optim = {"lr": 1e-3, "router_warmup_steps": 0}  # what every checkpoint stored: 0, the option off
    assert LitLM(model=model, optim=optim).optim_config.lr == 1e-3
    with pytest.raises(UserError, match=r"optim.router_warmup_steps was removed: .*3.1% worse"):
        LitLM(model=model, optim={**optim, "router_warmup_steps": 10})
