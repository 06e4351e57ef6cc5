"""What `train()` must do differently inside a Hydra multirun (capacity sweeps, model sweeps)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def dense_duplicate_of(cfg: DictConfig) -> str | None:
    """In a sweep such as `model=dense,sdt model.capacity=0.125,0.25`, the dense jobs differ only in a capacity
    that dense ignores: they are the same point. The first such job claims the point (an atomic marker file in the
    sweep dir) and trains; the others return the claiming job's output dir and train nothing.
    """
    if not in_multirun() or cfg.model.get("arch") != "dense":
        return None
    # The job's own overrides identify its point in the sweep (the resolved config would not: it embeds the job's
    # output dir); drop the capacity, which dense ignores.
    overrides = sorted(o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("model.capacity="))
    key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:16]
    marker_dir = os.path.join(HydraConfig.get().sweep.dir, ".dense_points")
    os.makedirs(marker_dir, exist_ok=True)
    marker = os.path.join(marker_dir, key)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(marker) as f:
            return f.read().strip() or None
    with os.fdopen(fd, "w") as f:
        f.write(str(cfg.paths.output_dir))
    return None


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


def same_point_result(cfg: DictConfig, original_dir: str) -> dict[str, Any]:
    out = str(cfg.paths.output_dir)
    os.makedirs(out, exist_ok=True)
    note = {"same_point_as": original_dir, "reason": "dense ignores model.capacity; trained once per sweep"}
    with open(os.path.join(out, "same_point.json"), "w") as f:
        json.dump(note, f, indent=2)
    log.info("dense job identical to %s (dense ignores model.capacity): not trained again", original_dir)
    return {"metrics": {}, "global_step": None, "best_checkpoint": None, "last_checkpoint": None, **note}
