"""Two gloo processes (ddp_spawn) train exactly like one process that sees both processes' batches at once."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sdt.lit_module import LitLM
from tests.conftest import ROOT, TINY_MODEL, TINY_TRAINER, cli_env, tiny_data

MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32}
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
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", *overrides]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 6
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
