"""The LightningModule's training-time recipe options: router warm-up, distillation, the capacity schedule."""

import csv

import pytest
import torch
from lightning.pytorch import seed_everything

from sdt.checkpoint import load_checkpoint, model_state_dict
from sdt.lit_module import LitLM
from sdt.optim import parameter_role
from sdt.training import train
from tests.conftest import TINY_TRAINER, compose_cfg, tiny_data, tiny_model_overrides
from tests.faults import CrashedOnPurpose

ROUTED_TINY = tiny_model_overrides(n_layers=4)  # model=sdt (the default) with two decision/dynamic pairs, not one


def run(tmp_path, corpus_files, cache_dir, *extra):
    overrides = [*ROUTED_TINY, *TINY_TRAINER, *tiny_data(corpus_files), "optim.warmup_steps=0", *extra]
    train(compose_cfg("train", overrides, tmp_path, cache_dir))
    ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        return ckpt, list(csv.DictReader(f))


def test_router_warmup_trains_only_the_routing_modules(tmp_path, corpus_files, cache_dir):
    ckpt, _ = run(tmp_path / "warm", corpus_files, cache_dir, "optim.router_warmup_steps=6", "seed=3")
    hp = ckpt["hyper_parameters"]
    seed_everything(3, workers=True)  # train() seeds before building the model: the same initial weights
    fresh = LitLM(model=hp["model"], optim=hp["optim"]).model
    trained = model_state_dict(ckpt)
    moved = {"base": [], "routing": []}
    for name, p in fresh.named_parameters():
        key = "base" if parameter_role(fresh, name) == "base" else "routing"
        moved[key].append(not torch.equal(p.detach(), trained[name]))
    assert moved["base"] and not any(moved["base"])  # every backbone weight untouched for all 6 steps
    assert any(moved["routing"])


def test_distillation_is_logged_apart_from_the_lm_loss(tmp_path, corpus_files, cache_dir):
    _, rows = run(tmp_path, corpus_files, cache_dir, "distill.weight=1.0", "distill.temperature=2.0")
    distill = [float(r["train/aux/distill"]) for r in rows if r.get("train/aux/distill")]
    assert distill and all(d >= 0 for d in distill)
    total = [float(r["train/total_loss"]) for r in rows if r.get("train/total_loss")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/total_loss")]
    assert all(t > lo for t, lo in zip(total, loss, strict=True))  # the KL adds to the LM loss, not replaces it


def test_capacity_schedule_trains_at_full_capacity_first_and_ends_at_the_target(tmp_path, corpus_files, cache_dir):
    _, rows = run(
        tmp_path, corpus_files, cache_dir, "model.capacity=0.25", "model.capacity_start=1.0",
        "model.capacity_warmup=0.5", "model.capacity_levels=2", "trainer.log_every_n_steps=1",
    )  # fmt: skip
    key = next(k for k in rows[0] if k.startswith("routing/layers.") and k.endswith("executed_fraction"))
    executed = [float(r[key]) for r in rows if r.get(key)]
    assert executed[0] == 1.0  # steps 0-2 at capacity 1.0 (Top-K keeps every token)
    assert executed[-1] == 0.25  # from half-way on, the target
    val = [float(r[k]) for r in rows for k in r if k.startswith("val_routing/") and r[k]]
    assert val and abs(val[-1] - 0.25) < 0.15  # the final calibration used the target capacity


def test_resume_is_exact_under_the_full_recipe(tmp_path, corpus_files, cache_dir):
    recipe = [
        "model.capacity=0.25", "model.capacity_start=1.0", "model.capacity_warmup=0.5", "model.capacity_levels=3",
        "model.always_execute_first=1", "distill.weight=0.5", "optim.router_warmup_steps=2",
        "trainer.max_steps=8", "trainer.val_check_interval=8", "callbacks.last_checkpoint.every_n_train_steps=3",
    ]  # fmt: skip
    base = [*ROUTED_TINY, *TINY_TRAINER, *tiny_data(corpus_files), "optim.warmup_steps=0", *recipe]
    train(compose_cfg("train", base, tmp_path / "ref", cache_dir))
    crash = ["+callbacks.crash._target_=tests.faults.CrashAtStep", "+callbacks.crash.step=5"]
    with pytest.raises(CrashedOnPurpose):
        train(compose_cfg("train", base + crash, tmp_path / "crashed", cache_dir))
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(str(last))["global_step"] == 3  # mid-schedule (capacity 0.625 in force), mid-warm-up
    train(compose_cfg("train", [*base, f"ckpt_path={last}"], tmp_path / "resumed", cache_dir))
    a = load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "last.ckpt"))["state_dict"]
    b = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
