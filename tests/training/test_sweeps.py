"""Hydra multirun: each job in its own dir, a model option sweeping only the models that have it (dense once per
capacity sweep), multi-device jobs really multi-process, and `python -m sdt.report` over the result."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, run_cli, tiny_data

TINY_RUN = [
    *TINY_MODEL,
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def multirun(sweep_dir: Path, cache_dir: Path, corpus_files: list[str], *overrides: str) -> list[Path]:
    cmd = [
        "train.py",
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY_RUN,
        *tiny_data(corpus_files),
        *overrides,
    ]
    proc = run_cli(cmd, cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def report(sweep_dir: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    return run_cli(
        ["-m", "sdt.report", str(sweep_dir), "--max-batches", "2", "--cache-dir", str(cache_dir)],
        cache_dir,
        timeout=600,
    )


@pytest.mark.slow  # a real two-job multirun in subprocesses: the default suite stays within its time budget
def test_two_job_multirun_produces_two_runs_and_a_report(tmp_path, cache_dir, corpus_files):
    sweep = tmp_path / "sweep"
    jobs = multirun(sweep, cache_dir, corpus_files, "model=dense,mod", "model.capacity=0.5")
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
    proc = report(sweep, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["arch"] for r in rows) == ["dense", "mod"]
    mod = next(r for r in rows if r["arch"] == "mod")
    assert float(mod["flops_ratio_vs_dense"]) < 1.0 and mod["routing"] == "student"
    assert float(mod["val_perplexity"]) > 1.0 and mod["val_perplexity_topk_oracle"]
    for png in ("pareto_ppl_vs_flops.png", "kv_cache_ratio.png", "loss_curves.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mod | 0.500 | student |" in (sweep / "report.md").read_text()


@pytest.mark.slow  # a subprocess of the report CLI (~13 s)
def test_report_on_a_dir_without_runs_is_a_clear_error(tmp_path, cache_dir):
    proc = report(tmp_path, cache_dir)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no runs")


@pytest.mark.slow
def test_a_mixed_sweep_runs_dense_once_and_each_routed_model_at_each_capacity(tmp_path, cache_dir, corpus_files):
    jobs = multirun(tmp_path / "sweep", cache_dir, corpus_files, "model=dense,sdt", "model.capacity=0.25,0.5")
    assert len(jobs) == 3  # dense has no capacity: one job, not two identical ones
    overrides = [(j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert sum("model=dense" in o for o in overrides) == 1
    assert all("model.capacity" not in o for o in overrides if "model=dense" in o)
    assert all((j / "checkpoints" / "last.ckpt").is_file() for j in jobs)


@pytest.mark.slow
def test_multirun_over_devices_runs_each_job_with_its_own_process_count(tmp_path, cache_dir, corpus_files):
    # strategy=ddp would relaunch the whole sweep per rank; the framework must spawn a clean group per job instead.
    jobs = multirun(
        tmp_path / "sweep", cache_dir, corpus_files, "model=dense", "trainer.strategy=ddp", "trainer.devices=1,2"
    )
    sizes = [json.loads((j / "train_result.json").read_text())["world_size"] for j in jobs]
    assert sizes == [1, 2]
