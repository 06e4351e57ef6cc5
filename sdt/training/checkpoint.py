"""Writing checkpoints atomically, and reading them back with clear errors for missing, corrupt or foreign files."""

from __future__ import annotations

import errno
import glob
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sdt.common.errors import UserError


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` to a temporary file in the target's directory, flushed to disk, then renamed over `path`.

    The rename is atomic on POSIX file systems, so `path` always holds either the previous complete checkpoint or
    the new complete one, whatever kills the process (SIGKILL, out of memory, node failure) and whenever.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (the directory entry), where the platform allows it.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with every file written atomically (temporary file, then rename).

    Lightning's own writer serialises into memory first but then writes the bytes straight into the final path (or
    renames across file systems), so a process killed mid-write leaves a truncated `last.ckpt`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        try:
            atomic_torch_save(checkpoint, str(path))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFullError(str(path), checkpoint.get("global_step")) from None

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        # A distributed checkpoint resumes in a single process too (trainer=gpu or cpu after trainer=fsdp).
        if is_sharded_checkpoint(str(path)):
            return read_sharded_checkpoint(str(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class DiskFullError(UserError):
    """The disk (or quota) filled up while a checkpoint was written; the previous file at that path is intact."""

    def __init__(self, path: str, step: int | None) -> None:
        kept = (
            f"the previous {os.path.basename(path)} is intact and loads"
            if os.path.isfile(path)
            else "no earlier checkpoint existed at that path"
        )
        super().__init__(
            f"no space left on the device to write the checkpoint of step {step} to {path}: the run stopped, "
            f"{kept}; free disk space (or set hydra.run.dir on another disk) and resume with ckpt_path={path}"
        )


# A distributed checkpoint (trainer=fsdp) is a directory: torch.distributed.checkpoint's shard files and `.metadata`,
# and Lightning's `meta.pt` with everything that is not weights or optimizer state.
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in (SHARDED_METADATA, ".metadata"))


def checkpoint_exists(path: str) -> bool:
    """A checkpoint file, or a distributed checkpoint's directory."""
    return os.path.isfile(path) or is_sharded_checkpoint(path)


def read_sharded_checkpoint(path: str) -> dict[str, Any]:
    """A distributed checkpoint, saved by any number of ranks, as one Lightning checkpoint dictionary in this
    process (no process group): full tensors in `state_dict`, and each optimizer's state keyed by parameter index as
    `torch.optim.Optimizer.load_state_dict` takes it."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    ckpt = torch.load(os.path.join(path, SHARDED_METADATA), map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        tensors = _load_state_dict_from_keys(checkpoint_id=path)
    ckpt["state_dict"] = tensors.pop("state_dict")
    n_optimizers = sum(1 for key in tensors if key.startswith("optimizer_"))
    ckpt["optimizer_states"] = [_indexed_optimizer_state(tensors[f"optimizer_{i}"]) for i in range(n_optimizers)]
    return ckpt


def _indexed_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) -> the optimizer's own format (keyed
    by the parameter's position across the param groups, in order)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an `sdt` Lightning checkpoint safely (`weights_only=True`): a .ckpt file, or the directory of a
    distributed (sharded) checkpoint, whatever number of ranks wrote it.

    Our checkpoints hold only tensors and plain Python containers, so safe loading always suffices; a file that
    needs arbitrary unpickling was not written by `sdt` and is rejected rather than executed.
    """
    if not path:
        raise UserError("no checkpoint given: pass ckpt_path=<path to .ckpt>")
    if not checkpoint_exists(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        if is_sharded_checkpoint(path):
            ckpt = read_sharded_checkpoint(path)
        else:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Safe loading refused an object: the file is a pickle that would run code (a class or function it
        # names) to load. Our checkpoints never need that; executing a foreign file's code is what we refuse.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"the Python object {found.group(1)}" if found else "Python objects beyond tensors and containers"
        raise UserError(
            f"cannot read checkpoint {path} safely: it needs {what}, which safe loading (torch.load with "
            "weights_only=True) will not import and run; sdt checkpoints never do, so this file was not written by "
            "sdt (or was tampered with)"
        ) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(
            f"cannot read checkpoint {path}: it is corrupt or truncated, or not a checkpoint ({_first_line(e)})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "sdt" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not an sdt checkpoint (expected keys state_dict, hyper_parameters, sdt)")
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's own weights from a LitLM checkpoint (LightningModule prefix `model.` removed)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def resolve_resume_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """`ckpt_path` as given; for `ckpt_path=last`, the newest checkpoint this run directory holds (None: start from
    scratch).

    The candidates are `checkpoints/last.ckpt` (periodic saves, SIGTERM) and Lightning's `hpc_ckpt_<n>.ckpt`
    (written on SLURM's SIGUSR1 before it requeues the job). `last` lets a requeued job, which reruns the same
    command in the same run directory, resume wherever its previous attempt got to, and start fresh the first time.
    """
    if ckpt_path != "last":
        return ckpt_path or None
    candidates = [
        os.path.join(output_dir, "checkpoints", "last.ckpt"),
        *glob.glob(os.path.join(output_dir, "hpc_ckpt_*.ckpt")),
    ]
    existing = [c for c in candidates if checkpoint_exists(c)]
    return max(existing, key=os.path.getmtime) if existing else None
