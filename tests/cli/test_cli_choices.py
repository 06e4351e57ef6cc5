"""Every choice a command line validates has one owner, the code that uses it: the validation reads the list from
there, accepts each value the code accepts and refuses what it does not.

Covered: evaluate.py's splits (and reasoning.split), tasks, search modes and devices (sdt/cli/validation.py), the
routing modes of `python -m sdt.generate` and of the lm-eval model, the devices of both. A scan of the command-line
modules also fails on a literal list of any of these choices, the way a second declaration would start.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdt import generate, harness
from sdt.cli import dispatch, validation
from sdt.common.errors import UserError
from sdt.data.corpus import SPLITS as CORPUS_SPLITS
from sdt.evaluation import lm, loading
from sdt.models.config import ModelConfig
from sdt.routing.selection import CAUSAL_MODES, ROUTING_MODES, CausalMode, RoutingMode
from sdt.search import evaluate as search_evaluate
from tests.conftest import ROOT, compose_cfg

# The modules that check what a user types, and so where a second copy of a choice list would be declared.
CLI_MODULES = [
    "sdt/cli/validation.py",
    "sdt/cli/__init__.py",
    "sdt/generate.py",
    "sdt/export.py",
    "sdt/harness.py",
    "sdt/report.py",
    "sdt/cli/dispatch.py",
    "sdt/search/evaluate.py",
]


@pytest.fixture
def eval_cfg(tmp_path):
    def make(*overrides: str):
        return compose_cfg("eval", list(overrides), tmp_path / "run", tmp_path / "cache")

    return make


def test_each_owner_is_its_literal_type():
    assert lm.SPLIT_NAMES == typing.get_args(lm.Split) and "all" in lm.SPLIT_NAMES
    assert search_evaluate.SEARCH_MODES == typing.get_args(search_evaluate.SearchMode)
    assert loading.DEVICES == typing.get_args(loading.Device)
    assert ROUTING_MODES == typing.get_args(RoutingMode) and CAUSAL_MODES == typing.get_args(CausalMode)
    assert set(CAUSAL_MODES) < set(ROUTING_MODES)
    # the model's own option is typed with the same list that the generate and lm-eval checks read
    assert typing.get_type_hints(ModelConfig)["inference_routing"] == CausalMode | None


def test_the_validators_use_the_owners_objects():
    assert validation.SPLIT_NAMES is lm.SPLIT_NAMES
    assert validation.CORPUS_SPLITS is CORPUS_SPLITS  # reasoning.split: a split of the corpus
    assert validation.check_task is dispatch.check_task
    assert validation.check_device is loading.check_device is generate.check_device is harness.check_device
    assert dispatch.SEARCH_MODES is search_evaluate.SEARCH_MODES
    assert generate.CAUSAL_MODES is harness.CAUSAL_MODES is CAUSAL_MODES


@pytest.mark.parametrize("split", lm.SPLIT_NAMES)
def test_every_split_the_evaluation_scores_passes_validation(split, eval_cfg):
    validation.validate_eval_config(eval_cfg(f"splits=[{split}]"))


def test_a_split_the_evaluation_does_not_know_is_refused(eval_cfg):
    with pytest.raises(UserError, match=r"splits must be a non-empty list of val, test, all, got \['train'\]"):
        validation.validate_eval_config(eval_cfg("splits=[train]"))


@pytest.mark.parametrize("task", list(dispatch.TASKS))
def test_every_task_evaluate_runs_passes_validation(task, eval_cfg):
    validation.validate_eval_config(eval_cfg(f"task={task}"))


def test_a_task_evaluate_does_not_run_is_refused(eval_cfg):
    with pytest.raises(UserError, match="task must be one of lm, reasoning"):
        validation.validate_eval_config(eval_cfg("task=poetry"))


@pytest.mark.parametrize("search", search_evaluate.SEARCH_MODES)
def test_every_search_mode_passes_validation_and_needs_a_searchable_task(search, eval_cfg):
    validation.validate_eval_config(eval_cfg(f"search={search}", "task=basic_mc"))
    for task in dispatch.TASKS:  # evaluate.py's own tasks are not item sources
        with pytest.raises(UserError, match=f"search={search} needs task="):
            validation.validate_eval_config(eval_cfg(f"search={search}", f"task={task}"))


def test_an_unknown_search_mode_is_refused(eval_cfg):
    with pytest.raises(UserError, match="search must be one of cola, cola_router"):
        validation.validate_eval_config(eval_cfg("search=beam", "task=basic_mc"))


@pytest.mark.parametrize("split", CORPUS_SPLITS)
def test_every_corpus_split_passes_as_the_reasoning_split(split, eval_cfg):
    validation.validate_eval_config(eval_cfg("task=reasoning", f"reasoning.split={split}"))


def test_a_reasoning_split_the_corpora_do_not_have_is_refused(eval_cfg):
    with pytest.raises(UserError, match="reasoning.split must be one of train, val, test, got 'dev'"):
        validation.validate_eval_config(eval_cfg("task=reasoning", "reasoning.split=dev"))


def _runnable_devices() -> list[str]:
    return [d for d in loading.DEVICES if d != "cuda" or torch.cuda.is_available()]


@pytest.mark.parametrize("device", _runnable_devices())
def test_every_device_the_evaluation_picks_passes_validation(device, eval_cfg):
    validation.validate_eval_config(eval_cfg(f"device={device}"))
    assert loading.pick_device(device).type in ("cpu", "cuda")
    generate.check_request(OmegaConf.create({**generate.DEFAULTS, "prompt": "hi", "device": device}))
    assert harness.harness_device(device).type == loading.pick_device(device).type


@pytest.mark.parametrize("device", ["banana", "cuda:x", "mps"])
def test_a_device_the_evaluation_cannot_pick_is_refused_everywhere(device, eval_cfg):
    message = f"device must be one of auto, cpu, cuda \\(or cuda:<index>\\), got '{device}'"
    with pytest.raises(UserError, match=message):
        validation.validate_eval_config(eval_cfg(f"device={device}"))
    with pytest.raises(UserError, match=message):
        loading.pick_device(device)
    with pytest.raises(UserError, match=message):
        generate.check_request(OmegaConf.create({**generate.DEFAULTS, "prompt": "hi", "device": device}))
    with pytest.raises(UserError, match=message):
        harness.harness_device(device)


def test_lm_eval_default_device_falls_back_where_it_does_not_exist(monkeypatch):
    """lm-eval's command line passes cuda:0 without --device; as its hf model does, run on what exists."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.harness_device("cuda:0") == torch.device("cpu")
    assert harness.harness_device("cuda") == torch.device("cpu")
    assert harness.harness_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert harness.harness_device("cuda:3") == torch.device("cuda")  # no fourth GPU: the one there is
    assert harness.harness_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("routing", CAUSAL_MODES)
def test_every_causal_mode_passes_the_generate_check(routing):
    generate.check_request(OmegaConf.create({**generate.DEFAULTS, "prompt": "hi", "routing": routing}))


@pytest.mark.parametrize("routing", [m for m in ROUTING_MODES if m not in CAUSAL_MODES] + ["greedy"])
def test_a_non_causal_or_unknown_mode_is_refused_by_generate(routing):
    with pytest.raises(UserError, match="routing must be one of threshold, student, budget"):
        generate.check_request(OmegaConf.create({**generate.DEFAULTS, "prompt": "hi", "routing": routing}))


def _string_collections(path: Path) -> list[tuple[int, set[str]]]:
    """(line, values) of every tuple, list or set literal of two or more strings, outside `Literal[...]`."""
    tree = ast.parse(path.read_text())
    inside_literal: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
            inside_literal.update(id(n) for n in ast.walk(node.slice))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in inside_literal:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(values) >= 2 and len(values) == len(node.elts):
                found.append((node.lineno, set(values)))
    return found


def test_no_command_line_module_declares_a_choice_list_of_its_own():
    owners = {
        "splits": set(lm.SPLIT_NAMES),
        "tasks": set(dispatch.TASKS),
        "search modes": set(search_evaluate.SEARCH_MODES),
        "devices": set(loading.DEVICES),
        "routing modes": set(ROUTING_MODES),
    }
    copies = [
        f"{module}:{line} {sorted(values)} repeats the {what} of their owner"
        for module in CLI_MODULES
        for line, values in _string_collections(ROOT / module)
        for what, choices in owners.items()
        if values <= choices
    ]
    assert not copies, "\n".join(copies)


def test_the_scan_finds_a_second_declaration(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('from typing import Literal\nA = Literal["val", "test"]\nEVAL_SPLITS = ("val", "test")\n')
    assert _string_collections(probe) == [(3, {"val", "test"})]
