"""Shared fixtures: the real Hydra configs composed with tiny overrides, a small real corpus, one trained run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

if TYPE_CHECKING:
    from sdt.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

# The tiny model of every test, stated once: tests that need other dimensions on purpose change only those (and say
# why). Both forms derive from it: `model.*` overrides of the real Hydra configs, and ModelConfig fields.
TINY_DIMS: dict[str, int] = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64}
TINY_VOCAB = 64  # for models built without a tokenizer; a run's vocabulary comes from its data


def tiny_model_overrides(**changes: Any) -> list[str]:
    """TINY_DIMS as `model.<key>=<value>` Hydra overrides; `changes` replace or add keys."""
    return [f"model.{key}={value}" for key, value in {**TINY_DIMS, **changes}.items()]


def tiny_model_fields(**changes: Any) -> dict[str, Any]:
    """The tiny model's ModelConfig fields (no arch) as a dict; `changes` replace or add fields."""
    return {"vocab_size": TINY_VOCAB, **TINY_DIMS, **changes}


def tiny_model_config(arch: str = "dense", **changes: Any) -> ModelConfig:
    """A ModelConfig of `arch` with the tiny model's fields; `changes` replace or add fields."""
    from sdt.models import ModelConfig

    return ModelConfig(arch=arch, **tiny_model_fields(**changes))


# A model and run small enough for a unit test, on the real configs.
TINY_MODEL = tiny_model_overrides()
TINY_TRAINER = [
    "trainer=cpu",
    "trainer.max_steps=6",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def tiny_data(paths: list[str]) -> list[str]:
    return [
        "data=text_files",
        f"data.paths=[{','.join(paths)}]",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.tokenizer.vocab_size=320",
    ]


def compose_cfg(
    config_name: str, overrides: list[str], out_dir: Path, cache_dir: Path, hydra: bool = False
) -> DictConfig:
    """Compose a real config from conf/ as the CLI would, with the run and cache dirs pinned (`hydra`: with the
    `hydra` node)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[
                *overrides,
                f"paths.root_dir={ROOT}",
                f"paths.output_dir={out_dir}",
                f"paths.cache_dir={cache_dir}",
            ],
            return_hydra_config=hydra,
        )
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdt-cache")


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> list[str]:
    """Three short excerpts of real plays as .txt files (split into train/val/test by lines)."""
    from sdt.data import ShakespeareCorpus

    docs = ShakespeareCorpus().documents("train")[:3]
    out = tmp_path_factory.mktemp("corpus")
    paths = []
    for i, doc in enumerate(docs):
        p = out / f"play{i}.txt"
        p.write_text(doc[:30_000], encoding="utf-8")
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_files, cache_dir) -> Path:
    """One tiny training run (6 steps) shared by the evaluation and resume tests."""
    from sdt.training.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("train", [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)], out, cache_dir)
    train(cfg)
    return out


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # Never contact W&B from tests, whatever a test's logger config says.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SDT_CACHE_DIR=str(cache_dir), WANDB_MODE="disabled", HYDRA_FULL_ERROR="0", PYTHONPATH=str(ROOT))
    return env


def run_cli(
    args: list[str], cache_dir: Path, *, cwd: Path = ROOT, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python <args>` as a user runs it (a script such as train.py, `-m module` or `-c code`), in its own process
    with one torch thread, the cache dir pinned and W&B off; output captured, never raises on a non-zero exit."""
    full_env = cli_env(cache_dir) | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def launch_train(args: list[str], cache_dir: Path, **popen: Any) -> subprocess.Popen:
    """A real `python train.py` in its own process (one torch thread), for tests that signal or kill it."""
    env = cli_env(cache_dir) | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True, **popen)
