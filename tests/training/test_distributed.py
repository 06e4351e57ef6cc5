"""Two gloo processes under DDP and under FSDP compute the same loss and gradients as one process that sees both
processes' batches at once, for a dense and a routed (SDT, Top-K) model: no rank-dependent shapes, no collective
that only some ranks reach (which would deadlock), no batch statistic that depends on how the batch was split.

FSDP is `trainer=fsdp`'s sharding: PyTorch's FSDP2 (`fully_shard`) applied by `sdt.training.distributed.shard_model`,
the function `LitLM.configure_model` calls under Lightning's ModelParallelStrategy (one unit per layer of the stack,
then the root; SDT's 0-d surprise scalars stay whole, their gradients averaged across ranks). The run through Lightning
itself, with sharded checkpoints that resume on another number of ranks, is `tests/training/test_fsdp.py`."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from sdt.models import ModelConfig, build_model
from sdt.training.distributed import shard_model
from tests.conftest import tiny_model_config

WORLD = 2
BATCH = 8  # combined; each rank gets BATCH // WORLD sequences
STEPS = 2


def model_config(arch: str) -> ModelConfig:
    extra = {"capacity": 0.5} if arch == "sdt" else {}
    return tiny_model_config(arch, **extra)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 64, (STEPS, BATCH, 25), generator=torch.Generator().manual_seed(0))
    return tokens[..., :-1], tokens[..., 1:]


def total_loss(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = module(x, y)
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


def train_steps(module, params_of, x_all, y_all, rank: int, world: int) -> dict:
    """Loss (averaged over ranks) and full gradients at every step, SGD in between."""
    per = BATCH // world
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    losses, grads = [], []
    for step in range(STEPS):
        x, y = x_all[step, rank * per : (rank + 1) * per], y_all[step, rank * per : (rank + 1) * per]
        optimizer.zero_grad()
        loss = total_loss(module, x, y)
        loss.backward()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        grads.append(params_of(module))
        optimizer.step()
    return {"loss": losses, "grads": grads}


def full_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace("module.", ""): p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None
    }


def fsdp_full_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Each rank holds a shard of every sharded gradient (a DTensor); gather the whole.
    return {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def worker(rank: int, world: int, init_file: str, arch: str, wrapper: str, result_file: str) -> None:
    torch.set_num_threads(1)
    # A collective one rank never reaches fails after the timeout instead of hanging the test run.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        model = build_model(model_config(arch))
        if wrapper == "ddp":
            module, params_of = DDP(model), full_grads
        else:
            module = model
            shard_model(model)  # what trainer=fsdp's LitLM.configure_model does, on the default mesh
            params_of = fsdp_full_grads
        x, y = data()
        out = train_steps(module, params_of, x, y, rank, world)
        if rank == 0:
            torch.save(out, result_file)
    finally:
        dist.destroy_process_group()
    # Gloo's process group joins its worker threads in its destructor, holding the GIL, while a worker thread may
    # still be releasing a Python-owned tensor of the last all-reduce and waiting for that GIL: a deadlock at exit in
    # about one run in ten (the DDP reducer owns the group, so it dies with `module`). The result is saved and
    # nothing is left to clean up, so the process leaves without running destructors.
    os._exit(0)


def single_process(arch: str) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config(arch))
    x, y = data()
    return train_steps(model, full_grads, x, y, rank=0, world=1)


@pytest.mark.slow  # four pairs of spawned processes: about 20 s each on two cores
@pytest.mark.parametrize("arch", ["dense", "sdt"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path, arch, wrapper):
    reference = single_process(arch)
    result_file = tmp_path / "rank0.pt"
    context = mp.start_processes(
        worker,
        args=(WORLD, str(tmp_path / "rendezvous"), arch, wrapper, str(result_file)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{wrapper} workers still running after 300 s: a rank is stuck in a collective")
    got = torch.load(result_file, weights_only=True)
    assert got["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert reference["loss"][1] != reference["loss"][0]  # the step in between changed the model
    for step in range(STEPS):
        ref, dist_grads = reference["grads"][step], got["grads"][step]
        assert set(dist_grads) == set(ref)
        for name in ref:
            torch.testing.assert_close(dist_grads[name], ref[name], atol=1e-5, rtol=1e-4, msg=f"{name} step {step}")
