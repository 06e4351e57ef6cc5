"""Exact resume: a run killed with SIGKILL mid-epoch and resumed from last.ckpt continues exactly like a run that was
never interrupted (same batches in the same order, same losses, same learning rates), on the real `train.py`, from
one token .npy (text_files) and from token shards (hf_hub)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sdt.training.checkpoint import load_checkpoint
from tests.conftest import TINY_MODEL, TINY_TRAINER, launch_train, tiny_data
from tests.data.data_helpers import write_jsonl

MAX_STEPS = 40
EPOCH_BATCHES = {"npy": 24, "shards": 27}  # batches of 4 blocks in one epoch of the small corpus


@pytest.fixture(scope="module", params=["npy", "shards"])
def small_corpus(request, tmp_path_factory, corpus_files) -> tuple[str, list[str]]:
    """One short text: an epoch is about 24 batches, so the runs below cross an epoch boundary. As one .txt file
    (text_files: one token .npy), or as a directory of JSON Lines documents (hf_hub: token shards of 1024 tokens,
    four of them, so that batches straddle shard boundaries)."""
    text = Path(corpus_files[0]).read_text(encoding="utf-8")[:6000]
    if request.param == "npy":
        out = tmp_path_factory.mktemp("small-corpus") / "small.txt"
        out.write_text(text, encoding="utf-8")
        return request.param, tiny_data([str(out)])
    out = tmp_path_factory.mktemp("small-jsonl")
    write_jsonl(out / "train.jsonl", [p for p in text.split("\n\n") if p.strip()])
    other = Path(corpus_files[1]).read_text(encoding="utf-8")
    write_jsonl(out / "validation.jsonl", [other[:1500]])
    write_jsonl(out / "test.jsonl", [other[1500:3000]])
    data = [o for o in tiny_data(["x"]) if not o.startswith(("data=", "data.paths"))]
    return request.param, ["data=hf_hub", f"data.name={out}", "data.test_split=test", "data.shard_tokens=1024", *data]


def overrides(out_dir: Path, record: Path, corpus: tuple[str, list[str]]) -> list[str]:
    trainer = [o for o in TINY_TRAINER if not o.startswith("trainer.max_steps")]
    return [
        f"hydra.run.dir={out_dir}",
        *TINY_MODEL,
        "model.dropout=0.1",  # random masks: resuming must restore the random number generators too
        *trainer,
        *corpus[1],
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=8",
        "trainer.log_every_n_steps=1",
        "trainer.deterministic=true",
        "optim.warmup_steps=5",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "+callbacks.record._target_=tests.faults.RecordBatches",
        f"+callbacks.record.path={record}",
    ]


def start(args: list[str], cache_dir: Path) -> subprocess.Popen:
    return launch_train(args, cache_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 900) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow  # three real runs in subprocesses: about a minute on two cores
def test_sigkilled_run_resumes_exactly_where_it_stopped(tmp_path, small_corpus, cache_dir):
    epoch_batches = EPOCH_BATCHES[small_corpus[0]]
    # The reference: never interrupted.
    ref_dir = tmp_path / "reference"
    finish(start(overrides(ref_dir, tmp_path / "reference.jsonl", small_corpus), cache_dir))
    reference = records(tmp_path / "reference.jsonl")
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    # The epoch is shorter than the run, so the resume below also has to get epoch boundaries right.
    assert load_checkpoint(str(ref_dir / "checkpoints" / "last.ckpt"))["epoch"] == 1

    # The same run, slowed down so the test can kill it from outside once a mid-run checkpoint exists.
    killed_dir, killed_log = tmp_path / "killed", tmp_path / "killed.jsonl"
    args = overrides(killed_dir, killed_log, small_corpus)
    args += ["+callbacks.slow._target_=tests.faults.SlowDown", "+callbacks.slow.seconds=0.2"]
    proc = start(args, cache_dir)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if killed_log.is_file() and max(records(killed_log), default=0) >= epoch_batches + 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = records(killed_log)
    last = killed_dir / "checkpoints" / "last.ckpt"
    state = load_checkpoint(str(last))  # a complete file: written atomically
    resumed_from = state["global_step"]
    assert epoch_batches < resumed_from < max(killed) < MAX_STEPS  # killed after the checkpoint, mid-run
    # The checkpoint knows the position in the data: mid-way through the second epoch.
    assert state["LMDataModule"]["train_epoch"] == 1
    assert state["LMDataModule"]["train_batches_done"] == resumed_from - epoch_batches > 0

    # Resume. Steps the killed run did after its checkpoint are redone, as an uninterrupted run did them.
    resumed_log = tmp_path / "resumed.jsonl"
    resumed_args = overrides(tmp_path / "resumed", resumed_log, small_corpus) + [f"ckpt_path={last}"]
    finish(start(resumed_args, cache_dir))
    resumed = records(resumed_log)
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))

    for step in range(1, MAX_STEPS + 1):
        got = killed[step] if step <= resumed_from else resumed[step]
        want = reference[step]
        assert got["batch"] == want["batch"], f"step {step}: a different batch than the uninterrupted run"
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), f"step {step}: learning rate"
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), f"step {step}: loss"
    # And the final weights are the same.
    a = load_checkpoint(str(ref_dir / "checkpoints" / "last.ckpt"))["state_dict"]
    b = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))["state_dict"]
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
