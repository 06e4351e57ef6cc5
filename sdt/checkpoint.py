"""Reading checkpoints written by `train.py`, with clear errors for missing, corrupt or foreign files."""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

from sdt.errors import UserError


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an `sdt` Lightning checkpoint safely (`weights_only=True`).

    Our checkpoints hold only tensors and plain Python containers, so safe loading always suffices; a file that
    needs arbitrary unpickling was not written by `sdt` and is rejected rather than executed.
    """
    if not path:
        raise UserError("no checkpoint given: pass ckpt_path=<path to .ckpt>")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot read checkpoint {path}: it is corrupt, truncated or not a safe sdt checkpoint ({first_line})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "sdt" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not an sdt checkpoint (expected keys state_dict, hyper_parameters, sdt)")
    return ckpt


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's own weights from a LitLM checkpoint (LightningModule prefix `model.` removed)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
