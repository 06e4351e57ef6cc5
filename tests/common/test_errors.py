"""Bad input gives one clear line on stderr, a non-zero exit, no traceback, and overwrites nothing."""

from __future__ import annotations

import subprocess

import pytest
import torch
from hydra.errors import MissingConfigException

from sdt.cli import EXIT_USER_ERROR, run_task
from sdt.cli.dispatch import evaluate
from sdt.training.train import train
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, run_cli, tiny_data


def run_expecting_user_error(task, cfg, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_task(task, cfg)
    assert exc.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def tiny_train_cfg(tmp_path, cache_dir, paths, *extra):
    return compose_cfg("train", [*TINY_MODEL, *TINY_TRAINER, *tiny_data(paths), *extra], tmp_path / "out", cache_dir)


def test_d_model_not_divisible_by_heads(tmp_path, cache_dir, corpus_files, capsys):
    cfg = tiny_train_cfg(tmp_path, cache_dir, corpus_files, "model.d_model=30", "model.n_heads=4")
    assert "not divisible by model.n_heads" in run_expecting_user_error(train, cfg, capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_sequence_longer_than_model_positions(tmp_path, cache_dir, corpus_files, capsys):
    cfg = tiny_train_cfg(tmp_path, cache_dir, corpus_files, "data.seq_len=128", "model.max_seq_len=64")
    assert "longer than model.max_seq_len" in run_expecting_user_error(train, cfg, capsys)


def test_empty_corpus(tmp_path, cache_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    cfg = tiny_train_cfg(tmp_path, cache_dir, [str(empty)])
    assert "empty" in run_expecting_user_error(train, cfg, capsys)


def test_non_utf8_corpus(tmp_path, cache_dir, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    cfg = tiny_train_cfg(tmp_path, cache_dir, [str(bad)])
    err = run_expecting_user_error(train, cfg, capsys)
    assert "UTF-8" in err and "latin1.txt" in err


def test_missing_checkpoint(tmp_path, cache_dir, capsys):
    cfg = compose_cfg("eval", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "ev", cache_dir)
    assert "checkpoint not found" in run_expecting_user_error(evaluate, cfg, capsys)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint(tmp_path, cache_dir, capsys, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    cfg = compose_cfg("eval", [f"ckpt_path={bad}"], tmp_path / "ev", cache_dir)
    assert "cannot read checkpoint" in run_expecting_user_error(evaluate, cfg, capsys)


def test_truncated_real_checkpoint(tmp_path, cache_dir, trained_run, capsys):
    data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "half.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    cfg = compose_cfg("eval", [f"ckpt_path={bad}"], tmp_path / "ev", cache_dir)
    assert "cannot read checkpoint" in run_expecting_user_error(evaluate, cfg, capsys)


def test_foreign_checkpoint(tmp_path, cache_dir, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    cfg = compose_cfg("eval", [f"ckpt_path={foreign}"], tmp_path / "ev", cache_dir)
    assert "not an sdt checkpoint" in run_expecting_user_error(evaluate, cfg, capsys)


def test_resume_from_missing_checkpoint(tmp_path, cache_dir, corpus_files, capsys):
    cfg = tiny_train_cfg(tmp_path, cache_dir, corpus_files, f"ckpt_path={tmp_path / 'gone.ckpt'}")
    assert "checkpoint not found" in run_expecting_user_error(train, cfg, capsys)


@pytest.mark.parametrize("group, name", [("model", "nope"), ("data", "nope"), ("logger", "nope")])
def test_unknown_config_option_lists_the_choices(tmp_path, cache_dir, group, name):
    with pytest.raises(MissingConfigException, match=f"{group}/{name}"):
        compose_cfg("train", [f"{group}={name}"], tmp_path, cache_dir)


def _cli(args: list[str], cache_dir) -> subprocess.CompletedProcess:
    return run_cli(args, cache_dir)


def test_cli_bad_input_is_one_line_and_overwrites_nothing(tmp_path, cache_dir, trained_run, corpus_files):
    # A bad run pointed at an existing run directory must leave its checkpoint untouched.
    last = trained_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    args = ["train.py", f"hydra.run.dir={trained_run}", *TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)]
    proc = _cli([*args, "model.d_model=30", "model.n_heads=4"], cache_dir)
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.d_model=30 is not divisible")
    assert last.read_bytes() == before


@pytest.mark.slow  # real train.py/evaluate.py subprocesses: the default suite stays within its time budget
def test_cli_unknown_model_and_missing_ckpt(tmp_path, cache_dir):
    proc = _cli(["train.py", "model=nope", f"hydra.run.dir={tmp_path}"], cache_dir)
    assert proc.returncode != 0 and "model/nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(["evaluate.py", f"hydra.run.dir={tmp_path}"], cache_dir)
    assert proc.returncode == EXIT_USER_ERROR and "ckpt_path is required" in proc.stderr


@pytest.mark.parametrize(
    "override", ["model=dense", "model.capacity=0.25", "trainer.max_steps=5", "+optim.lr=1e-3", "experiment=x"]
)
def test_evaluate_says_a_training_option_takes_no_part_in_evaluation(override, capsys):
    from sdt.cli import reject_training_overrides

    with pytest.raises(SystemExit) as e:
        reject_training_overrides(["model.init_from=some/model.gguf", override])
    assert e.value.code == EXIT_USER_ERROR
    key = override.split("=")[0].lstrip("+")
    assert capsys.readouterr().err.strip().splitlines() == [
        (
            f"error: evaluate.py has no {key}= (a train.py option): evaluation takes the model, with its architecture "
            "and options, from ckpt_path=<.ckpt> or model.init_from=<HF dir | .gguf | hub id>"
        )
    ]
    reject_training_overrides(["model.init_from=x.gguf", "data=shakespeare", "hydra.run.dir=out", "--cfg", "job"])


@pytest.mark.slow  # real evaluate.py subprocesses: the default suite stays within its time budget
def test_evaluate_py_refuses_model_name_before_hydra(tmp_path, cache_dir):
    proc = _cli(["evaluate.py", "model=dense", "model.init_from=some/model.gguf"], cache_dir)
    assert proc.returncode == EXIT_USER_ERROR and "HYDRA_FULL_ERROR" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluate.py has no model= (a train.py option)")
