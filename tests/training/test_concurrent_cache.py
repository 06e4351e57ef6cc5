"""Two runs started at the same moment on a fresh, shared cache directory: both train, the tokenizer and the token
streams are built once (one run builds under the cache lock, the other waits and reuses them), and both train on
identical data."""

from __future__ import annotations

import json
import subprocess

import pytest

from sdt.training.checkpoint import load_checkpoint
from tests.conftest import TINY_MODEL, TINY_TRAINER, launch_train, tiny_data


@pytest.mark.slow  # two real train.py processes
def test_two_runs_started_together_on_a_fresh_cache_build_it_once(tmp_path, corpus_files):
    cache = tmp_path / "cache"
    assert not cache.exists()
    procs = {}
    for name in ("a", "b"):
        args = [f"hydra.run.dir={tmp_path / name}", *TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)]
        args += [
            "+callbacks.record._target_=tests.faults.RecordBatches",
            f"+callbacks.record.path={tmp_path}/{name}.jsonl",
        ]
        procs[name] = launch_train(args, cache, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for proc in procs.values():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]

    logs = {name: (tmp_path / name / "train.log").read_text() for name in procs}
    assert sum("trained BPE" in log for log in logs.values()) == 1, "the tokenizer was trained twice"
    assert sum("tokenized train" in log for log in logs.values()) == 1, "the token streams were built twice"
    assert all("damaged" not in log for log in logs.values())
    assert len(list((cache / "tokenizers").iterdir())) == len(list((cache / "tokens").iterdir())) == 1

    a, b = (load_checkpoint(str(tmp_path / name / "checkpoints" / "last.ckpt")) for name in procs)
    assert a["global_step"] == b["global_step"] == 6
    assert a["sdt"]["tokenizer"] == b["sdt"]["tokenizer"] and a["sdt"]["data_stats"] == b["sdt"]["data_stats"]
    batches = [
        [json.loads(line)["batch"] for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in procs
    ]
    assert len(batches[0]) == 6 and batches[0] == batches[1]  # the same batches, step by step
