"""Entry-point glue: turn user errors into one clear line and exit code 2 instead of a traceback. The package is
the entry layer: `validation` checks a composed config before anything runs, `dispatch` picks what
`evaluate.py` runs for a task.

Three layers, from the outside in:
- `run_cli` runs an `@hydra.main` function and turns Hydra's own errors (an unknown config group or key, an
  override that does not parse) into one line;
- `CheckConfigFirst`, a Hydra callback (conf/hydra/default.yaml), validates the composed config (`sdt.cli.validation`)
  before Hydra creates the run directory, so a bad value writes nothing;
- `run_task` runs the task itself and turns the user errors it raises (and Lightning's configuration errors) into one
  line; inside a sweep it also validates each job's config first.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from sdt.cli.validation import foreign_model_option, removed_option, validate_eval_config, validate_train_config
from sdt.common.errors import EXIT_USER_ERROR, UserError


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with EXIT_USER_ERROR."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def validator_for(cfg: DictConfig) -> Callable[[DictConfig], None] | None:
    return {"train": validate_train_config, "eval": validate_eval_config}.get(str(cfg.get("task_name")))


def _report_user_errors(fn: Callable[[], Any]) -> Any:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return fn()
    except UserError as e:
        fail(str(e))
    except InterpolationResolutionError as e:  # e.g. ${package_file:...} naming a package that is not installed
        fail(str(e).splitlines()[0].removeprefix("UserError raised while resolving interpolation: "))
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "a required option"
        fail(f"{key} is required (pass {key}=...)")
    except MisconfigurationException as e:  # Lightning rejecting a combination only found out mid-run
        fail(f"trainer: {e}")


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `task(cfg)`; a user error ends the process with one line on stderr and exit code 2."""
    global _task_started
    _task_started = True
    if HydraConfig.initialized() and HydraConfig.get().mode is not None and HydraConfig.get().mode.name == "MULTIRUN":
        validate = validator_for(cfg)
        if validate is not None:  # single runs were validated by CheckConfigFirst before the run dir existed
            _report_user_errors(lambda: validate(cfg))
    return _report_user_errors(lambda: task(cfg))


class CheckConfigFirst(Callback):
    """Validate a single run's config before Hydra creates its run directory, writes `.hydra/` or opens the log."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        validate = validator_for(config)
        if validate is None:
            return
        HydraConfig.instance().set_config(config)  # ${hydra:...} interpolations resolve from it
        cfg = OmegaConf.masked_copy(config, [str(k) for k in config if k != "hydra"])
        if "paths" in cfg:
            with open_dict(cfg):
                # Not created yet (Hydra makes it after this hook): validation needs its name, never the directory.
                cfg.paths.output_dir = os.path.abspath(str(config.hydra.run.dir))
        _report_user_errors(lambda: validate(cfg))


_task_started = False


def _hydra_error_line(e: BaseException) -> str:
    if isinstance(e, MissingConfigException):
        # "In 'train': Could not find 'model/nope'\n\nAvailable options in 'model':\n\tdense\n..."
        missing = getattr(e, "missing_cfg_file", None)
        options = getattr(e, "options", None)
        if missing and options:
            group = missing.rsplit("/", 1)[0]
            return f"no config {missing}: {group}= takes one of {', '.join(options)}"
        return str(e).strip().splitlines()[0]
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {e.message}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Could not override 'model/recipe'"):  # only routed models select a recipe
        return "model/recipe= is an option of the routed models (model=sdt, stt, mod): dense has no routing to convert"
    found = re.match(r"Could not override '(.+)'\.", lines[0]) if lines else None
    if found and "not in struct" in str(e.__cause__ or e):
        key = found.group(1)
        inner = re.search(r"full_key: (\S+)", str(e.__cause__ or ""))
        if inner and inner.group(1).startswith(key + "."):  # a dict value that adds keys to an existing dict
            return (
                f"{key}: the dict adds {inner.group(1)}, which the config does not have; to add keys inside "
                f"{key}, write ++{key}={{...}} (or +{inner.group(1)}=...)"
            )
        return (
            removed_option(key)
            or foreign_model_option(key)
            or f"{key} is not a key of the config (a typo? to add a new key, use +{key}=...)"
        )
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).strip().splitlines()[0])
    return " ".join(lines)


def run_cli(main: Callable[[], Any]) -> Any:
    """Call an `@hydra.main` function; Hydra's own errors (composing the config, parsing overrides) become one line.

    Hydra prints those itself, over several lines, unless HYDRA_FULL_ERROR=1 makes it raise them to us. Errors that
    are not the user's (bugs) then keep their full traceback.
    """
    global _task_started
    _task_started = False
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return main()
    except (HydraException, OmegaConfBaseException) as e:
        if _task_started:  # raised by the task, after composition: not a command-line problem
            raise
        fail(_hydra_error_line(e))


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
            fail(
                f"evaluate.py has no {key}= (a train.py option): evaluation takes the model, with its "
                "architecture and options, from ckpt_path=<.ckpt> or model.init_from=<HF dir | .gguf | hub id>"
            )
