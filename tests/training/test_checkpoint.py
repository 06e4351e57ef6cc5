"""Checkpoints are written atomically and read back safely, with clear errors for anything else."""

from __future__ import annotations

import io
import os
import time

import pytest
import torch

import sdt.training.checkpoint
from sdt.common.errors import UserError
from sdt.training.checkpoint import DiskFullError, atomic_torch_save, load_checkpoint, resolve_resume_path
from sdt.training.train import train
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data


def half_written_save(real_save, fail_on_call: int):
    """torch.save that, on its `fail_on_call`-th call, writes half of the bytes and then fails (disk full, killed)."""
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError(28, "No space left on device")

    return save


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(1000)}, str(path))
    monkeypatch.setattr(sdt.training.checkpoint.torch, "save", half_written_save(torch.save, fail_on_call=1))
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000)}, str(path))
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(1000))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the half-written temporary file is gone too


def test_training_that_crashes_mid_checkpoint_keeps_the_last_complete_one(
    tmp_path, corpus_files, cache_dir, monkeypatch
):
    # last.ckpt every 2 steps, no best.ckpt: the second write (step 4) fails half-way.
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), "trainer.val_check_interval=100"]
    overrides += ["callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint=null"]
    cfg = compose_cfg("train", overrides, tmp_path, cache_dir)
    monkeypatch.setattr(sdt.training.checkpoint.torch, "save", half_written_save(torch.save, fail_on_call=2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(DiskFullError) as err:
        train(cfg)
    monkeypatch.undo()
    # A clear error (one line from train.py, exit 2: a UserError), naming the step, the file and what to do.
    assert str(err.value) == (
        f"no space left on the device to write the checkpoint of step 4 to {last}: the run stopped, the previous "
        f"last.ckpt is intact and loads; free disk space (or set hydra.run.dir on another disk) and resume with "
        f"ckpt_path={last}"
    )
    ckpt = load_checkpoint(str(last))
    assert ckpt["global_step"] == 2  # the write at step 4 failed; step 2's file is intact and loads
    assert os.listdir(tmp_path / "checkpoints") == ["last.ckpt"]


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(100)}, "sdt": {}, "hyper_parameters": {}}, buf)
    path.write_bytes(buf.getvalue()[:-100])
    with pytest.raises(UserError, match=r"cannot read checkpoint .*last\.ckpt: it is corrupt or truncated"):
        load_checkpoint(str(path))


class NotATensor:
    pass


def test_checkpoint_that_needs_code_to_load_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "sdt": NotATensor(), "hyper_parameters": {}}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert "safely" in message and "weights_only=True" in message
    assert "NotATensor" in message  # names what it would have had to import


def test_resume_path_last_means_this_run_directory(tmp_path):
    assert resolve_resume_path(None, str(tmp_path)) is None
    assert resolve_resume_path("some/file.ckpt", str(tmp_path)) == "some/file.ckpt"
    assert resolve_resume_path("last", str(tmp_path)) is None  # first attempt: nothing to resume, start fresh
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_resume_path("last", str(tmp_path)) == str(tmp_path / "checkpoints" / "last.ckpt")
    # A newer checkpoint that Lightning wrote on SLURM's SIGUSR1 wins.
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(hpc, (time.time() + 10, time.time() + 10))
    assert resolve_resume_path("last", str(tmp_path)) == str(hpc)
