"""Every bad value on the command line of `train.py` and `evaluate.py`, whichever part of the stack it would reach
(Hydra, Lightning's Trainer, a callback, the model, data or optimiser configs), ends the run with one line
`error: <message naming the key>`, exit code 2, no traceback, and nothing written: no run directory, no cache.

The table runs the real entry scripts in this process (`runpy`, as `python train.py ...` runs them): the same code
path from argv to exit code, without paying a Python start-up per value. `test_cli_*` check the same through real
subprocesses."""

from __future__ import annotations

import logging
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from sdt.cli import EXIT_USER_ERROR
from tests.conftest import ROOT, TINY_MODEL, TINY_TRAINER, run_cli, tiny_data

# (override, what the error line must name). Values Lightning accepts at construction and fails on mid-run, or
# silently misuses, are in here as much as those it rejects at once.
TRAIN_BAD_VALUES = [
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.max_epochs=-5", "trainer.max_epochs"),
    ("trainer.precision=banana", "trainer.precision"),
    ("trainer.accelerator=banana", "trainer.accelerator"),
    ("trainer.strategy=nope", "trainer.strategy"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=abc", "trainer.devices"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.num_sanity_val_steps=-5", "trainer.num_sanity_val_steps"),
    ("trainer.deterministic=maybe", "trainer.deterministic"),
    ("trainer.enable_progress_bar=sometimes", "trainer.enable_progress_bar"),
    ("trainer.foo=1", "trainer.foo"),  # Hydra: not a key of the config
    ("optim.group_lr={prior: 1e-3}", "++optim.group_lr="),  # a dict adding keys to an empty one: how to add them
    ("+trainer.foo=1", "trainer.foo"),  # Lightning: not an argument of the Trainer
    ("seed=abc", "seed"),
    ("seed=-1", "seed"),
    ("seed=[1", "seed=[1"),  # an override Hydra cannot parse
    ("ckpt_path=does/not/exist.ckpt", "does/not/exist.ckpt"),
    ("optim.lr=abc", "optim.lr"),
    ("optim.router_warmup_steps=10", "optim.router_warmup_steps was removed: "),  # a removed option: why it went
    ("++optim.router_warmup_steps=10", "optim.router_warmup_steps was removed: "),
    ("distill.weight=abc", "distill.weight"),
    ("distill.temperature=0", "distill.temperature"),
    ("model.capacity_start=1.0", "model.capacity_start was removed: "),
    ("model.always_execute_first=-1", "model.always_execute_first"),
    ("model.routed_sublayer=ffn", "model.routed_sublayer"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.warmup_steps=1.5", "optim.warmup_steps"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("+optim.momentum=0.9", "momentum"),
    ("data.seq_len=abc", "data.seq_len"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.tokenizer.vocab_size=10", "data.tokenizer.vocab_size"),
    ("model=nope", "model/nope"),
    ("model.d_model=abc", "model.d_model"),
    ("model.n_layers=0", "model.n_layers"),
    ("model.capacity=2", "model.capacity"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.compile=maybe", "model.compile"),
    ("model.activation_checkpointing=maybe", "model.activation_checkpointing"),
    ("trainer.float32_matmul_precision=fast", "trainer.float32_matmul_precision"),
    ("callbacks.nan_guard.policy=ignore", "callbacks.nan_guard.policy"),
    ("callbacks.last_checkpoint.every_n_train_steps=-1", "callbacks.last_checkpoint.every_n_train_steps"),
    ("callbacks.model_checkpoint.mode=sideways", "callbacks.model_checkpoint"),
    ("callbacks.progress_bar.refresh_rate=abc", "callbacks.progress_bar.refresh_rate"),
    ("callbacks.routing_health.every_n_steps=0", "callbacks.routing_health.every_n_steps"),
    ("callbacks.preemption.signals=[SIGKILL]", "callbacks.preemption.signals"),
]
EVAL_BAD_VALUES = [
    ("seed=abc", "seed"),
    ("device=banana", "device"),
    ("splits=[train]", "splits"),
    ("max_batches=0", "max_batches"),
    ("batch_size=-1", "batch_size"),
    ("recalibrate=maybe", "recalibrate"),
    ("generation.max_new_tokens=-1", "generation.max_new_tokens"),
    ("samples.temperature=-1", "samples.temperature"),
    ("samples.top_k=abc", "samples.top_k"),
    ("task=banana", "task"),
]


@pytest.fixture
def entry(tmp_path, monkeypatch, capsys):
    """Run an entry script in-process with argv; returns (exit code, stdout, stderr). Hydra's global state and the
    logging it configures are put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("SDT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as a user's shell has it; run_cli sets its own

    def run(script: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [script, f"hydra.run.dir={tmp_path / 'run'}", *args])
        capsys.readouterr()
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    root.handlers[:], root.level = handlers, level
    HydraConfig.instance().cfg = None


def assert_one_line_error(code: int, out: str, err: str, names: str) -> None:
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err + out and out == ""
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line, err
    assert names in line, line


def assert_nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a bad value must write nothing"


@pytest.mark.parametrize("override, names", TRAIN_BAD_VALUES, ids=[v for v, _ in TRAIN_BAD_VALUES])
def test_train_bad_value_is_one_line_exit_2_and_writes_nothing(entry, tmp_path, override, names):
    assert_one_line_error(*entry("train.py", override), names)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (
            ["model=dense", "model.capacity=0.25"],
            "model.capacity is not an option of the chosen model; the models with it: model=sdt, stt, mod",
        ),
        (["model=dense", "++model.capacity=0.25"], "model=dense has no capacity"),
        (["model=dense", "model/recipe=convert"], "model/recipe= is an option of the routed models"),
        (["model=sdt", "model.mod_gate=ste"], "the models with it: model=mod"),
    ],
)
def test_an_option_of_another_model_is_one_line_exit_2_and_writes_nothing(entry, tmp_path, overrides, names):
    assert_one_line_error(*entry("train.py", *overrides), names)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("override, names", EVAL_BAD_VALUES, ids=[v for v, _ in EVAL_BAD_VALUES])
def test_evaluate_bad_value_is_one_line_exit_2_and_writes_nothing(entry, tmp_path, trained_run, override, names):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert_one_line_error(*entry("evaluate.py", f"ckpt_path={ckpt}", override), names)
    assert_nothing_written(tmp_path)


def test_table_covers_every_part_of_the_config():
    keys = {override.lstrip("+").split("=")[0].split(".")[0] for override, _ in TRAIN_BAD_VALUES}
    assert {"trainer", "seed", "optim", "data", "model", "callbacks", "ckpt_path"} <= keys
    assert len(TRAIN_BAD_VALUES) + len(EVAL_BAD_VALUES) >= 30


def test_good_values_pass_validation_and_train(entry, tmp_path, corpus_files):
    # The checks must not reject what is valid: the tiny run the other tests use trains through the same path.
    code, _, err = entry("train.py", *TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), "trainer.max_steps=2")
    assert code == 0, err
    assert (tmp_path / "run" / "train_result.json").is_file()


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache")


def test_cli_bad_value_reaching_lightning_is_one_line(tmp_path):
    proc = _cli(["train.py", "trainer.max_steps=-5"], tmp_path)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "trainer.max_steps")
    assert_nothing_written(tmp_path)


@pytest.mark.slow  # a Python start-up per value
@pytest.mark.parametrize(
    "script, override, names",
    [
        ("train.py", "trainer.precision=banana", "trainer.precision"),
        ("train.py", "seed=abc", "seed"),
        ("train.py", "model=nope", "model/nope"),
        ("train.py", "trainer.foo=1", "trainer.foo"),
        ("evaluate.py", "device=banana", "device"),
    ],
)
def test_cli_bad_values_are_one_line(tmp_path, script, override, names):
    proc = _cli([script, override], tmp_path)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, names)
    assert_nothing_written(tmp_path)
