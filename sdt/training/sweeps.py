"""What a Hydra multirun does for `sdt`: the grid over model options (`model_grid`), and what `train()` must do
differently inside one (multi-device jobs, process groups)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from sdt.models.config import ModelConfig, model_options

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def applicable_overrides(overrides: Sequence[str], arch: str) -> list[str]:
    """The overrides that apply to a model of architecture `arch`: an override of a model option that only other
    architectures have (`model.capacity=0.5` for dense) is left out; every other override is kept, so a typo still
    fails as Hydra reports it."""
    options = {f.name for f in dataclasses.fields(ModelConfig)}
    own = set(model_options(arch))

    def applies(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        name = key.removeprefix("model.")
        return not key.startswith("model.") or name not in options or name in own

    return [o for o in overrides if applies(o)]


def model_grid(jobs: Sequence[Sequence[str]], arch_of: Callable[[Sequence[str]], str]) -> list[list[str]]:
    """The jobs of a grid sweep (each a list of overrides), each with only the model options its model has; jobs that
    are then the same run once, in the order of their first appearance.

    `arch_of(overrides)` is the architecture a job composes to; it is given the job's overrides without any model
    option a dense model lacks, which compose for every model.
    """
    out: list[list[str]] = []
    left_out: dict[str, set[str]] = {}
    for job in jobs:
        arch = arch_of(applicable_overrides(job, "dense"))
        kept = applicable_overrides(job, arch)
        left_out.setdefault(arch, set()).update(o.split("=", 1)[0].lstrip("+~") for o in job if o not in kept)
        if kept not in out:
            out.append(kept)
    for arch, keys in left_out.items():
        if keys:
            log.info("model=%s has no %s: its jobs run without them", arch, ", ".join(sorted(keys)))
    if len(out) < len(jobs):
        log.info("%d grid points, %d jobs: a model runs once per value of the options it has", len(jobs), len(out))
    return out


def make_multirun_safe(cfg: DictConfig) -> None:
    """Lightning's subprocess DDP relaunches `sys.argv` once per device; inside a Hydra multirun that re-runs the whole
    sweep in every child. Each multi-device job of a local sweep therefore spawns its workers instead (ddp_spawn):
    a clean process group per job, and a 2-device job really runs as 2 processes."""
    if not in_multirun():
        return
    strategy = cfg.trainer.get("strategy")
    devices = cfg.trainer.get("devices", 1)
    multi = (
        devices == -1 or devices == "auto" or (isinstance(devices, int) and devices > 1) or isinstance(devices, list)
    )
    if multi and strategy in ("ddp", "auto", None) and not os.environ.get("SLURM_JOB_ID"):
        log.warning(
            "multirun job with %s devices: using strategy=ddp_spawn (subprocess DDP would re-run the sweep)", devices
        )
        with open_dict(cfg):
            cfg.trainer.strategy = "ddp_spawn"


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def release_distributed() -> None:
    """After a multirun job: destroy its process group and forget its rendezvous address, so the next job of the
    sweep (same Python process) forms a clean group of its own instead of colliding with a stale one."""
    if not in_multirun():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name in DIST_ENV:
        os.environ.pop(name, None)
