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
