"""FSDP2 sharding for `trainer=fsdp`: the strategy Hydra configs name, and the function that shards a model.

`trainer=fsdp` is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`:
the strategy starts the processes and builds a device mesh, `LitLM.configure_model` shards the model with
`shard_model` (one unit per layer of the stack, then the root), and checkpoints are distributed: a directory with
one shard file per rank (`torch.distributed.checkpoint`), which loads into any number of ranks, or into one process
without a process group (`sdt.training.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from sdt.models import LanguageModel


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure data parallelism: every process is one FSDP2 shard (data-parallel
    size = world size, no tensor parallelism), whatever the number of devices and nodes.

    The parent's defaults ("auto") would put the devices of a node into the tensor-parallel dimension instead."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def fsdp_strategy(**kwargs) -> FSDP2Strategy:
    """`trainer=fsdp`'s strategy (kwargs: `ModelParallelStrategy`'s, e.g. `save_distributed_checkpoint`)."""
    return FSDP2Strategy(**kwargs)


def _all_reduce_mean(grad: Tensor) -> Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def shard_model(model: LanguageModel, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True) -> None:
    """Shard `model` in place with FSDP2: one unit per layer of the stack (a dense block, an SDT pair, an STT or MoD
    layer), then the root (embeddings, final norm, head). Applying it twice changes nothing.

    FSDP2 cannot shard 0-d parameters (the surprise gate's log o_ce and log m_cu): they stay whole on every rank,
    and their gradients are averaged across ranks by a hook, as data parallelism would.
    """
    if isinstance(model, FSDPModule):
        return
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    # The root's parameters are used once per step (embedding, then head): kept gathered until the backward is done.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=scalars)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in scalars:
            p.register_hook(_all_reduce_mean)
