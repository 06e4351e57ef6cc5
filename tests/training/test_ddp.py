"""Two gloo processes (ddp_spawn) train exactly like one process that sees both processes' batches at once."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sdt.training.lit_module import LitLM
from tests.conftest import TINY_MODEL, TINY_TRAINER, run_cli, tiny_data, tiny_model_fields

MODEL = tiny_model_fields()
OPTIM = {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1}


class FixedBlocks(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 64, (32, 17), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i, :-1], "targets": self.tokens[i, 1:]}


class Module(LitLM):
    def train_dataloader(self):
        # Unshuffled: rank r gets the items r, r+2, ...; one process with the doubled batch sees exactly the union
        # of both ranks' batches at every step. (Lightning's own distributed sampler would shuffle.)
        ds = FixedBlocks()
        world = self.trainer.world_size
        sampler = (
            DistributedSampler(ds, num_replicas=world, rank=self.global_rank, shuffle=False) if world > 1 else None
        )
        return DataLoader(ds, batch_size=self.hparams_batch, sampler=sampler, shuffle=False)


def fit(devices: int, batch: int, tmp_path) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = Module(model=MODEL, optim=OPTIM)
    module.hparams_batch = batch
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        default_root_dir=tmp_path,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.slow  # two spawned processes (~17 s)
def test_two_process_ddp_equals_one_process_with_doubled_batch(tmp_path):
    single = fit(devices=1, batch=8, tmp_path=tmp_path / "single")
    ddp = fit(devices=2, batch=4, tmp_path=tmp_path / "ddp")
    init = Module(model=MODEL, optim=OPTIM).model.state_dict()
    # Training moved the weights, and both runs moved them identically.
    assert any(not torch.allclose(single[k], init[k]) for k in single)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_train_py_with_two_cpu_processes_trains_a_routed_model(tmp_path, corpus_files, cache_dir):
    """The real entry point under DDP (trainer=ddp_cpu): data module, Top-K routing and threshold calibration on
    every rank, checkpoint written once. Top-K shapes are static, so no rank can wait on another."""
    trainer = [o if o != "trainer=cpu" else "trainer=ddp_cpu" for o in TINY_TRAINER]
    overrides = [*TINY_MODEL, "model=sdt", *trainer, *tiny_data(corpus_files)]
    proc = run_cli(["train.py", f"hydra.run.dir={tmp_path}", *overrides], cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 6
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def _records(path) -> dict[tuple[int, int], float]:
    """(step, rank) -> fingerprint of the batch that rank trained on at that step."""
    return {(r["step"], r["rank"]): r["batch"] for r in map(json.loads, path.read_text().splitlines())}


def _run(tmp_path, name: str, corpus_files, cache_dir, processes: int, max_steps: int, *extra: str) -> dict:
    """A tiny run in `tmp_path/<name>/` recording its batches in `tmp_path/<name>.jsonl`."""
    from sdt.training.train import train
    from tests.conftest import compose_cfg

    trainer = [o for o in TINY_TRAINER if o not in ("trainer=cpu", "trainer.max_steps=6")]
    overrides = [*TINY_MODEL, "trainer=ddp_cpu" if processes == 2 else "trainer=cpu", *trainer]
    overrides += [*tiny_data(corpus_files), f"trainer.max_steps={max_steps}", "trainer.val_check_interval=100"]
    overrides += [
        "+callbacks.record._target_=tests.faults.RecordBatches",
        f"+callbacks.record.path={tmp_path}/{name}.jsonl",
    ]
    return train(compose_cfg("train", [*overrides, *extra], tmp_path / name, cache_dir))


@pytest.mark.slow  # four runs, two of them with two spawned processes
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(tmp_path, corpus_files, cache_dir, caplog, before, after):
    """A checkpoint of a `before`-process run resumed on `after` processes: the step count goes on from the
    checkpoint's, and the data order restarts at the beginning of the checkpoint's epoch, split as a fresh
    `after`-process run splits it (a warning says so), since the old position does not exist in the new split."""
    fresh = _run(tmp_path, "fresh", corpus_files, cache_dir, after, 4)  # the order `after` processes see
    first = _run(tmp_path, "first", corpus_files, cache_dir, before, 4)
    assert first["global_step"] == fresh["global_step"] == 4 and first["world_size"] == before
    ckpt = torch.load(first["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["LMDataModule"] == {"train_epoch": 0, "train_batches_done": 4, "batch_size": 4, "world_size": before}

    with caplog.at_level("WARNING"):
        resumed = _run(tmp_path, "resumed", corpus_files, cache_dir, after, 8, f"ckpt_path={first['last_checkpoint']}")
    assert resumed["global_step"] == 8 and resumed["world_size"] == after
    if after == 1:  # a spawned run warns in its child processes, outside caplog
        assert f"on 1 ranks (checkpoint: 4 on {before}): the data order restarts at epoch 0" in caplog.text
    got, want = _records(tmp_path / "resumed.jsonl"), _records(tmp_path / "fresh.jsonl")
    # Steps 5..8 ran (4 optimizer steps, each on `after` x data.batch_size sequences), on the batches a fresh
    # `after`-process run trains on at steps 1..4.
    assert sorted(got) == [(step, rank) for step in range(5, 9) for rank in range(after)]
    assert all(got[(step + 4, rank)] == want[(step, rank)] for step in range(1, 5) for rank in range(after))
    final = torch.load(resumed["last_checkpoint"], map_location="cpu", weights_only=True)
    assert final["LMDataModule"]["world_size"] == after and final["LMDataModule"]["train_batches_done"] == 8
