"""Experiment logging (sdt/training/experiment_logging.py, conf/logger/wandb.yaml): one W&B run per job, finished also
when the job fails, the whole resolved config in every logger, names / groups / tags from the config, per-role
learning rates. W&B runs offline; the tests read the run files it writes (tests/wandb_records.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sdt.training.lit_module import LitLM
from sdt.training.optim import OptimConfig, build_optimizer, role_learning_rates
from sdt.training.resolvers import register_resolvers
from sdt.training.train import train
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, run_cli, tiny_data, tiny_model_config
from tests.wandb_records import read_offline_run

# The tiny run of conftest, logging to W&B (offline) and CSV.
TINY_WANDB = [*TINY_MODEL, *[o for o in TINY_TRAINER if not o.startswith("logger=")], "logger=wandb"]


def offline_runs(root: Path) -> list[Path]:
    return sorted(root.rglob("wandb/offline-run-*"))


def test_each_parameter_role_has_its_learning_rate():
    from sdt.models import build_model

    model = build_model(tiny_model_config("sdt"))
    cfg = OptimConfig.from_dict({"lr": 1e-3, "group_lr": {"prior": 2e-3, "surprise": 5e-2}})
    rates = role_learning_rates(build_optimizer(model, cfg))
    assert rates["base"] == 1e-3 and rates["prior"] == 2e-3 and rates["surprise"] == 5e-2
    assert "router" in rates  # every role is logged, those on the default rate too


def test_wandb_config_names_tags_and_groups_a_run_from_its_config(tmp_path):
    register_resolvers()
    cfg = compose_cfg("train", ["logger=wandb", "model=stt", "model.capacity=0.25"], tmp_path, tmp_path)
    wandb_cfg = cfg.logger.wandb
    # Composed outside Hydra's command line (no multirun): no job suffix, no group.
    assert wandb_cfg.name == "train-stt-c0.25" and wandb_cfg.group is None
    assert list(wandb_cfg.tags) == ["stt", "capacity=0.25", "experiment=none"]


@pytest.mark.slow
def test_a_two_job_multirun_writes_two_complete_wandb_runs(tmp_path, corpus_files, cache_dir):
    sweep = tmp_path / "sweep"
    args = ["train.py", "-m", *TINY_WANDB, *tiny_data(corpus_files), "trainer.max_steps=4"]
    args += [f"hydra.sweep.dir={sweep}", "model.capacity=0.25,0.5"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    proc = run_cli(args, cache_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb run already in progress" not in proc.stderr

    runs = {int(p.parents[1].name): read_offline_run(p) for p in offline_runs(sweep)}
    assert sorted(runs) == [0, 1]  # one run per job, in that job's own dir
    for job, capacity in ((0, 0.25), (1, 0.5)):
        run = runs[job]
        assert run.name == f"train-sdt-c{capacity}-{job}"
        assert run.group == str(sweep)  # the sweep's runs are one group in W&B
        assert run.tags == ["sdt", f"capacity={capacity}", "experiment=none"]
        assert run.exit_code == 0  # finished when its job ended
        config = run.config
        # The whole resolved config, not only the LightningModule's hyper-parameters.
        assert config["model"]["capacity"] == capacity and config["model"]["vocab_size"] % 64 == 0
        assert config["data"]["paths"] == corpus_files and config["data"]["seq_len"] == 32
        assert config["trainer"]["max_steps"] == 4 and config["optim"]["lr"] > 0
        assert config["hydra"]["choices"]["data"] == "text_files" and config["hydra"]["job_num"] == job
        assert f"model.capacity={capacity}" in config["hydra"]["overrides"]
        assert config["hydra"]["sweep_dir"] == str(sweep)
        assert {"train/loss", "val/loss", "train/lr/base", "train/lr/prior", "train/lr/surprise"} <= run.history_keys
        # The CSV logger gets the same config.
        hparams = yaml.safe_load((sweep / str(job) / "csv" / "hparams.yaml").read_text())
        assert hparams["data"]["paths"] == corpus_files and hparams["model"]["capacity"] == capacity
        assert f"model.capacity={capacity}" in hparams["hydra"]["overrides"]


@pytest.mark.slow
def test_a_failed_job_finishes_its_run_and_the_next_job_starts_its_own(tmp_path, corpus_files, cache_dir, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    overrides = [*TINY_WANDB, *tiny_data(corpus_files), "trainer.max_steps=2", "trainer.val_check_interval=2"]

    def broken_step(self, batch, batch_idx):
        raise RuntimeError("job failed mid-training")

    with monkeypatch.context() as patch:
        patch.setattr(LitLM, "training_step", broken_step)
        with pytest.raises(RuntimeError, match="job failed mid-training"):
            train(compose_cfg("train", overrides, tmp_path / "job0", cache_dir))
    assert wandb.run is None  # nothing left open for the next job to reuse
    train(compose_cfg("train", overrides, tmp_path / "job1", cache_dir))
    assert wandb.run is None

    (failed_dir,) = offline_runs(tmp_path / "job0")
    (ok_dir,) = offline_runs(tmp_path / "job1")
    failed, ok = read_offline_run(failed_dir), read_offline_run(ok_dir)
    assert failed.exit_code == 1 and ok.exit_code == 0
    assert "train/loss" in ok.history_keys and "train/loss" not in failed.history_keys
    assert ok.config["data"]["paths"] == corpus_files and failed.config["trainer"]["max_steps"] == 2
