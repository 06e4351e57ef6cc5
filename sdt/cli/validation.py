"""Checks of a composed run config before anything runs, so that every bad value gets one message naming its key.

Lightning, Hydra and the libraries below them reject bad values late (a `max_steps=-5` inside the Trainer, a
`seed=abc` inside `seed_everything`, an `accumulate_grad_batches=0` as a division by zero mid-fit) and with their own
exception types. `validate_train_config` and `validate_eval_config` check every key up front, against the type hints
of what the value is handed to (the Trainer, each callback, the project's config dataclasses) and against the ranges
those accept, and raise `UserError("<key> must be ..., got ...")`. They build nothing heavy and write nothing: the
entry points call them before Hydra creates the run directory.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from sdt.cli.dispatch import check_task
from sdt.common.config_checks import removed_options
from sdt.common.errors import UserError
from sdt.data.config import TokenizerConfig
from sdt.data.corpus import SPLITS as CORPUS_SPLITS
from sdt.data.datamodules import data_config_class
from sdt.evaluation.lm import SPLIT_NAMES
from sdt.evaluation.loading import check_device
from sdt.models import ModelConfig
from sdt.models.config import ARCHS, archs_with, foreign_options
from sdt.training.callbacks import MATMUL_PRECISIONS
from sdt.training.checkpoint import checkpoint_exists
from sdt.training.distill import DistillConfig
from sdt.training.optim import OptimConfig

SEED_RANGE = (0, 2**32 - 1)  # what NumPy's generator accepts, and so what Lightning's seed_everything keeps

# Lightning's Trainer accepts these at construction and fails on them later (mid-fit, or not at all but wrongly).
# key: (accepts(value), what it must be)
_TRAINER_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_steps": (lambda v: v >= -1, "an integer >= -1 (-1: no limit)"),
    "min_steps": (lambda v: v is None or v >= 0, "an integer >= 0 or null"),
    "max_epochs": (lambda v: v is None or v >= -1, "an integer >= -1 or null"),
    "min_epochs": (lambda v: v is None or v >= 0, "an integer >= 0 or null"),
    "accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "num_nodes": (lambda v: v >= 1, "an integer >= 1"),
    "log_every_n_steps": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "num_sanity_val_steps": (lambda v: v is None or v >= -1, "an integer >= -1 (-1: the whole validation set)"),
    "check_val_every_n_epoch": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "reload_dataloaders_every_n_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "val_check_interval": (
        lambda v: v is None or isinstance(v, str) or (v >= 1 if isinstance(v, int) else 0.0 < v <= 1.0),
        "an integer >= 1 (steps) or a fraction in (0, 1] of an epoch",
    ),
    "devices": (
        lambda v: not isinstance(v, int) or v >= 1 or v == -1,
        "an integer >= 1, -1 (all), 'auto' or a list of device indices",
    ),
    **{
        f"limit_{split}_batches": (
            lambda v: v is None or (v >= 0 if isinstance(v, int) else 0.0 <= v <= 1.0),
            "an integer >= 0 (batches) or a fraction in [0, 1]",
        )
        for split in ("train", "val", "test", "predict")
    },
    "overfit_batches": (
        lambda v: v >= 0 if isinstance(v, int) else 0.0 <= v <= 1.0,
        "an integer >= 0 (batches) or a fraction in [0, 1]",
    ),
}
# Set by the framework itself (build_trainer), never from the trainer config.
_TRAINER_OWN_KEYS = ("callbacks", "logger", "plugins", "gradient_clip_val")


# ---------------------------------------------------------------------------------------------------------------------
# Values against type hints.


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a plain config value (str, int, float, bool, None, list, dict) is acceptable for `annotation`.

    Hints this cannot judge (a class the value would be instantiated into, a callable) accept anything: the callee
    checks those itself.
    """
    if annotation in (Any, inspect.Parameter.empty):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        # type() too: True == 1 and 1 == 1.0, but precision=True is not precision=1
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(conforms(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(conforms(v, args[1]) for v in value.values())
    if isinstance(annotation, type):
        if isinstance(value, dict) and "_target_" in value:
            return True  # instantiated by Hydra into the object; its own target checks it
        return isinstance(value, annotation)
    return True


def describe(annotation: Any) -> str:
    """`annotation` in words, for messages: 'an integer or null', "one of 'a', 'b'"."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        literals = [a for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        others = [describe(a) for a in args if typing.get_origin(a) is not Literal]
        if literals:
            others.insert(0, "one of " + ", ".join(repr(a) for a in literals))
        return " or ".join(dict.fromkeys(others))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not args:
            return "a list"
        count = f"{len(args)} " if origin is tuple and args[-1] is not Ellipsis else ""
        return f"a list of {count}{describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    return f"a {getattr(annotation, '__name__', annotation)}"


def check_value(key: str, value: Any, annotation: Any) -> None:
    if not conforms(value, annotation):
        raise UserError(f"{key} must be {describe(annotation)}, got {value!r}")


def type_hints(obj: Any) -> dict[str, Any]:
    """Type hints of a function or class, or {} where they cannot be evaluated."""
    try:
        return typing.get_type_hints(obj)
    except (NameError, TypeError, AttributeError):  # a hint naming something not importable: check nothing
        return {}


def check_fields(cls: type, values: Mapping[str, Any], prefix: str) -> None:
    """The types of `values` against the fields of dataclass `cls` (unknown keys are left to `cls.from_dict`)."""
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and f.name in hints and not dataclasses.is_dataclass(hints[f.name]):
            check_value(f"{prefix}.{f.name}", values[f.name], hints[f.name])


def check_arguments(fn: Callable[..., Any], values: Mapping[str, Any], prefix: str, what: str) -> None:
    """`values` as keyword arguments of `fn`: every key must be a parameter, every value fit its hint."""
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = type_hints(fn)
    for key, value in values.items():
        if key not in params:
            if takes_kwargs:
                continue
            valid = ", ".join(k for k, p in params.items() if k != "self" and p.kind is not p.VAR_POSITIONAL)
            raise UserError(f"{prefix}.{key} is not an option of {what}; valid options: {valid}")
        if key in hints:
            check_value(f"{prefix}.{key}", value, hints[key])


def removed_option(key: str) -> str | None:
    """Why the config key `key` (`optim.router_warmup_steps`) was removed, or None for a key that never existed."""
    section, _, name = key.partition(".")
    cls = {"model": ModelConfig, "optim": OptimConfig}.get(section)
    removed = removed_options(cls).get(name) if cls is not None else None
    return None if removed is None else f"{key} was removed: {removed.why}"


def foreign_model_option(key: str) -> str | None:
    """For `model.<option>` that only other architectures have (`model.capacity` of a dense model): which have it."""
    section, _, name = key.partition(".")
    archs = archs_with(name) if section == "model" else ()
    if not archs or len(archs) == len(ARCHS):
        return None
    return f"{key} is not an option of the chosen model; the models with it: model={', '.join(archs)}"


def first_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text or type(e).__name__


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning logs its device summary when a Trainer is built; a trial build must not print it twice."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------------------------------
# The parts of a run config.


def validate_seed(value: Any, key: str = "seed") -> None:
    low, high = SEED_RANGE
    if not conforms(value, int) or not low <= value <= high:
        raise UserError(f"{key} must be an integer in [{low}, {high}], got {value!r}")


def validate_trainer(trainer: dict[str, Any]) -> None:
    """Every `trainer.*` key, then a trial Trainer built from them (device, strategy and precision checks)."""
    from hydra.utils import instantiate
    from lightning.pytorch import Trainer

    precision = trainer.get("float32_matmul_precision")
    if precision is not None and precision not in MATMUL_PRECISIONS:
        raise UserError(
            f"trainer.float32_matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)} or null, got {precision!r}"
        )
    trainer = {k: v for k, v in trainer.items() if k != "float32_matmul_precision"}  # sdt's key, not Lightning's
    options = {k: v for k, v in trainer.items() if k != "_target_"}
    for key in _TRAINER_OWN_KEYS:
        if key in options:
            raise UserError(f"trainer.{key} is set by sdt itself; remove it from the trainer config")
    check_arguments(Trainer.__init__, options, "trainer", "lightning.pytorch.Trainer")
    for key, value in options.items():
        if key in _TRAINER_RANGES:
            accepts, expected = _TRAINER_RANGES[key]
            if not accepts(value):
                raise UserError(f"trainer.{key} must be {expected}, got {value!r}")
    try:
        with quiet_lightning():
            instantiate(trainer, logger=False, enable_checkpointing=False, callbacks=[], _convert_="all")
    except Exception as e:  # noqa: BLE001 - Lightning rejects values with many exception types
        culprit = _culprits(trainer, options)
        raise UserError(f"{culprit or 'trainer: '}{first_line(_root_cause(e))}") from None


def _culprits(trainer: dict[str, Any], options: dict[str, Any]) -> str:
    """'trainer.<key>=<value>: ' for the key whose value alone makes Lightning's Trainer fail (or '')."""
    from hydra.utils import instantiate

    target = {"_target_": trainer.get("_target_", "lightning.pytorch.Trainer")}

    def fails(**kwargs: Any) -> bool:
        try:
            with quiet_lightning():
                instantiate({**target, **kwargs}, logger=False, enable_checkpointing=False, _convert_="all")
        except Exception:  # noqa: BLE001 - as above
            return True
        return False

    # devices and precision are judged on the accelerator they are given, so that one is tried first and kept
    base = {k: options[k] for k in ("accelerator",) if k in options}
    if base and fails(**base):
        return f"trainer.accelerator={base['accelerator']!r}: "
    for key, value in options.items():
        if key not in base and key != "default_root_dir" and fails(**base, **{key: value}):
            return f"trainer.{key}={value!r}: "
    return ""


def _root_cause(e: BaseException) -> BaseException:
    # Hydra wraps the target's exception (InstantiationException "Error in call to target ..."): report the cause.
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def validate_callbacks(callbacks: dict[str, Any] | None) -> None:
    """Every `callbacks.<name>.*` key against its target's constructor, then the callback built (cheap: callbacks
    do their work in hooks)."""
    from hydra.utils import get_class, instantiate

    for name, node in (callbacks or {}).items():
        if node is None:
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise UserError(f"callbacks.{name} must be a mapping with a _target_, got {node!r}")
        try:
            cls = get_class(node["_target_"])
        except (ImportError, AttributeError, ValueError):
            raise UserError(f"callbacks.{name}._target_={node['_target_']!r} is not an importable class") from None
        args = {k: v for k, v in node.items() if not k.startswith("_")}
        check_arguments(cls.__init__, args, f"callbacks.{name}", node["_target_"])
        try:
            instantiate(node)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the callback's constructor rejects a value with
            cause = _root_cause(e)
            if isinstance(cause, UserError):
                raise cause from None
            raise UserError(f"callbacks.{name}: {first_line(cause)}") from None


def validate_optim(optim: dict[str, Any]) -> None:
    check_fields(OptimConfig, optim, "optim")
    OptimConfig.from_dict(optim)


def validate_distill(distill: dict[str, Any] | None) -> None:
    check_fields(DistillConfig, distill or {}, "distill")
    DistillConfig.from_dict(distill)


def validate_model(model: dict[str, Any], tokenizer_vocab: Any = None) -> None:
    if model.get("vocab_size") is None:  # decided by the tokenizer later; any valid size checks the rest now
        model = {**model, "vocab_size": tokenizer_vocab if isinstance(tokenizer_vocab, int) else ModelConfig.vocab_size}
    check_fields(ModelConfig, model, "model")
    ModelConfig.from_dict(model)
    foreign = foreign_options(model)
    if foreign:
        name, value = next(iter(foreign.items()))
        raise UserError(
            f"model.{name}={value!r}: model={model['arch']} has no {name} "
            f"(an option of model={', '.join(archs_with(name))})"
        )


def validate_data(data: dict[str, Any]) -> None:
    """`data.*` against the data config of its corpus (language modelling or reasoning)."""
    cls = data_config_class(data)
    if isinstance(data.get("paths"), str):  # data.paths=notes.txt: the config's shorthand for a list of one
        data = {**data, "paths": [data["paths"]]}
    check_fields(cls, data, "data")
    if isinstance(data.get("tokenizer"), dict):
        check_fields(TokenizerConfig, data["tokenizer"], "data.tokenizer")
    cls.from_dict(data)


def validate_ckpt_path(ckpt_path: Any) -> None:
    if ckpt_path is None or ckpt_path == "last":
        return
    if not isinstance(ckpt_path, str) or not ckpt_path:
        raise UserError(f"ckpt_path must be a path to a .ckpt file, 'last' or null, got {ckpt_path!r}")
    if not checkpoint_exists(ckpt_path):  # a .ckpt file, or a distributed checkpoint's directory (trainer=fsdp)
        raise UserError(f"checkpoint not found: {ckpt_path}")


def plain(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> dict[str, Any]:
    """The config as plain Python values, interpolations resolved (the `hydra` node left out)."""
    return {
        str(k): OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k not in skip
    }


def validate_train_config(cfg: DictConfig) -> None:
    """Everything `python train.py` is given, checked before it builds or writes anything."""
    c = plain(cfg)
    validate_seed(c.get("seed"))
    validate_ckpt_path(c.get("ckpt_path"))
    validate_optim(c.get("optim") or {})
    validate_distill(c.get("distill"))
    validate_data(c.get("data") or {})
    validate_model(c.get("model") or {}, (c.get("data") or {}).get("tokenizer", {}).get("vocab_size"))
    validate_trainer(c.get("trainer") or {})
    validate_callbacks(c.get("callbacks"))


def _check_int(key: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not conforms(value, int) or value < minimum:
        raise UserError(f"{key} must be an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{key} must be true or false, got {value!r}")


def validate_eval_config(cfg: DictConfig) -> None:
    """Everything `python evaluate.py` is given, checked before it loads or writes anything."""
    c = plain(cfg)
    validate_seed(c.get("seed"))
    if c.get("ckpt_path") is not None:
        if c["ckpt_path"] == "last":
            raise UserError("ckpt_path=last resumes training; evaluation takes the path of a .ckpt file")
        validate_ckpt_path(c["ckpt_path"])
    # The choices below are those of the code that uses them (evaluation's devices, splits, tasks, search modes).
    device = c.get("device", "auto")
    check_device(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device={device}, but no CUDA device is available here; use device=cpu or device=auto")
    check_task(c.get("task", "lm"), c.get("search"))
    splits = c.get("splits")
    if not isinstance(splits, list) or not splits or any(s not in SPLIT_NAMES for s in splits):
        raise UserError(f"splits must be a non-empty list of {', '.join(SPLIT_NAMES)}, got {splits!r}")
    _check_int("max_batches", c.get("max_batches"), 1, allow_none=True)
    _check_int("batch_size", c.get("batch_size"), 1, allow_none=True)
    for key in ("recalibrate", "plots"):
        _check_bool(key, c.get(key, False))
    generation = c.get("generation") or {}
    _check_int("generation.max_new_tokens", generation.get("max_new_tokens", 0), 0)
    _check_int("generation.repeats", generation.get("repeats", 1), 1)
    samples = c.get("samples") or {}
    prompts = samples.get("prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"samples.prompts must be a list of strings, got {prompts!r}")
    _check_int("samples.max_new_tokens", samples.get("max_new_tokens", 0), 0)
    _check_int("samples.top_k", samples.get("top_k"), 1, allow_none=True)
    temperature = samples.get("temperature", 1.0)
    if not conforms(temperature, float) or temperature < 0:
        raise UserError(f"samples.temperature must be a number >= 0, got {temperature!r}")
    reasoning = c.get("reasoning") or {}
    if "split" in reasoning and reasoning["split"] not in CORPUS_SPLITS:
        raise UserError(f"reasoning.split must be one of {', '.join(CORPUS_SPLITS)}, got {reasoning['split']!r}")
    for key in ("num_problems", "max_new_tokens", "batch_size"):
        if key in reasoning:
            _check_int(f"reasoning.{key}", reasoning[key], 1)
    if c.get("data") is not None:
        data = dict(c["data"])
        if c.get("batch_size"):
            data["batch_size"] = c["batch_size"]
        validate_data(data)
