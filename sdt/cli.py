"""Entry-point glue: turn user errors into one clear line and a non-zero exit instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from sdt.errors import UserError

EXIT_USER_ERROR = 2


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    try:
        return task(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except InterpolationResolutionError as e:  # e.g. ${package_file:...} naming a package that is not installed
        print(
            f"error: {str(e).splitlines()[0].removeprefix('UserError raised while resolving interpolation: ')}",
            file=sys.stderr,
        )
        sys.exit(EXIT_USER_ERROR)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "a required option"
        print(f"error: {key} is required (pass {key}=...)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# Config groups and keys of train.py that evaluate.py does not have: Hydra would answer "Could not override ..." with
# a hint about HYDRA_FULL_ERROR; the model to evaluate comes from the checkpoint.
TRAINING_ONLY = ("model", "trainer", "optim", "callbacks", "logger", "experiment", "debug")
EVAL_MODEL_KEYS = ("model.init_from",)


def reject_training_overrides(argv: list[str]) -> None:
    """Stop with one line when an evaluate.py override names a training option (`model=<name>`, `trainer.*`, ...)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        group = key.split(".", 1)[0]
        if group in TRAINING_ONLY and key not in EVAL_MODEL_KEYS:
            print(
                f"error: evaluate.py has no {key}= (a train.py option): evaluation takes the model, with its "
                "architecture and options, from ckpt_path=<.ckpt> or model.init_from=<HF dir | .gguf | hub id>",
                file=sys.stderr,
            )
            sys.exit(EXIT_USER_ERROR)
