"""The layering of docs/architecture.md, checked on the source: which packages may import which, no import cycle
(imports inside functions included), and every module importable first, in a fresh interpreter, in any order."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdt"

# Layers, bottom up, as prefixes of module names, and what each may import of `sdt` besides its own layer.
LEAF = "sdt.blocks"
ROUTING = "sdt.routing"
MODELS = "sdt.models"
DATA = "sdt.data"
# Exported next to routed checkpoints: the wrapper over the package's model, shipped with the modules it imports.
EXPORT_CODE = "sdt.transformers_code"
FOUNDATION = {"sdt.common.errors", "sdt.common.config_checks"}  # import only sdt.common.errors; any layer may

# The packages of sdt, bottom up (docs/architecture.md): a package imports only packages of its own layer or below,
# and the package graph has no cycle. Above them, the top-level modules are the `python -m sdt.<tool>` commands.
PACKAGE_LAYERS: list[set[str]] = [
    {"sdt.common"},  # the user-error type and the checks configs run at construction
    {"sdt.blocks"},  # attention, MLP, norms, the KV cache
    {"sdt.routing"},  # Top-K, surprise, gates, students, skip maps, execution of the selected tokens
    {"sdt.models"},  # dense, MoD, SDT, STT, the pretrained transfer, FLOP and KV counts
    {"sdt.data"},  # corpora, tokenizer, shards, data modules (language modelling and reasoning SFT)
    {"sdt.training"},  # the Lightning module, optimizer, distillation, distributed, callbacks, checkpoints
    {"sdt.evaluation", "sdt.analysis", "sdt.transformers_code"},  # evaluation, figures, the exported code
    {"sdt.search", "sdt.reasoning"},  # experiment families on top: chain-of-layers search, self-braking reasoning
    {"sdt.cli"},  # entry layer: config validation, task dispatch, one-line user errors
]
COMMANDS = {"sdt.export", "sdt.generate", "sdt.harness", "sdt.report", "sdt.harness_tasks"}  # above every package


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module named by the statement (for `from a.b import c`: a.b, or a.b.c where that is a module)
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def sdt_imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of an `sdt` module in `path`, resolved to module names, marked when it sits inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "sdt" or alias.name.startswith("sdt."):
                        found.append(Import(name, alias.name, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child)
                if target == "sdt" or target.startswith("sdt."):
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.append(Import(name, sub if sub in modules else target, child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    modules = all_modules()
    return [imp for name, path in modules.items() for imp in sdt_imports(name, path, modules)]


def in_layer(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """importer -> modules executed by its imports. Importing a.b.c runs a and a.b first, so those count too,
    except a package a submodule lives in (already being imported when the submodule runs)."""
    graph: dict[str, set[str]] = {name: set() for name in all_modules()}
    for imp in imports:
        implied = [a for a in ancestors(imp.target) if not in_layer(imp.importer, a)]
        for target in [*implied, imp.target]:
            if target in graph and target != imp.importer:
                graph[imp.importer].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def describe(bad: list[Import]) -> str:
    return "\n".join(sorted({f"{imp.importer} (line {imp.line}) imports {imp.target}" for imp in bad}))


def test_the_scan_sees_the_imports_it_must_judge(imports, tmp_path):
    """Guards the checks below against passing because the scan found nothing."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nfrom . import config\nif TYPE_CHECKING:\n    from sdt.data import DataConfig\n"
        "def f():\n    import sdt.training.train\n    from sdt.routing import topk\n"
    )
    found = sdt_imports("sdt.models.probe", source, {"sdt.models.config": source, "sdt.routing.topk": source})
    assert [(i.target, i.in_function) for i in found] == [
        ("sdt.models.config", False),
        ("sdt.training.train", True),
        ("sdt.routing.topk", True),
    ]
    graph = import_graph(imports)
    assert {"sdt.routing", "sdt.blocks.layers"} <= graph["sdt.models.sdt"]
    assert "sdt.blocks.layers" in graph["sdt.routing.execution"]
    assert "sdt.models.transformer" in graph["sdt.models.calibration"]
    assert "sdt.models" in graph["sdt.training.train"]  # implied by importing a submodule of another package
    assert "sdt.models" in graph["sdt.transformers_code.modeling_sdt"]  # the wrapper builds the package's model
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package(imports):
    cycle = find_cycle(import_graph(imports))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_imports_of_the_package(imports):
    """Imports inside functions are for optional third-party dependencies only, never to dodge a cycle."""
    bad = [imp for imp in imports if imp.in_function]
    assert not bad, describe(bad)


def test_the_leaf_imports_nothing_of_the_package(imports):
    bad = [imp for imp in imports if in_layer(imp.importer, LEAF) and not in_layer(imp.target, LEAF)]
    assert not bad, describe(bad)
    assert any(in_layer(imp.importer, LEAF) for imp in imports)  # the leaf exists and its own imports are seen


def test_foundation_modules_import_only_the_error_type(imports):
    bad = [imp for imp in imports if imp.importer in FOUNDATION and imp.target != "sdt.common.errors"]
    assert not bad, describe(bad)
    assert any(imp.importer == "sdt.common.config_checks" for imp in imports)


def test_routing_imports_only_the_leaf(imports):
    def allowed(imp: Import) -> bool:
        return in_layer(imp.target, LEAF) or in_layer(imp.target, ROUTING)

    bad = [imp for imp in imports if in_layer(imp.importer, ROUTING) and not allowed(imp)]
    assert not bad, describe(bad)


def test_models_import_only_routing_and_the_leaf(imports):
    """Models are plain PyTorch over routing and blocks: no training, evaluation, data or entry points."""
    below = (LEAF, ROUTING, MODELS)
    bad = [
        imp
        for imp in imports
        if in_layer(imp.importer, MODELS)
        and not any(in_layer(imp.target, layer) for layer in below)
        and imp.target not in FOUNDATION
    ]
    assert not bad, describe(bad)


def package_of(module: str) -> str:
    """The unit a module belongs to in the package graph: `sdt.<package>`, or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def layer_of(unit: str) -> int:
    if unit in COMMANDS:
        return len(PACKAGE_LAYERS)
    return next(i for i, layer in enumerate(PACKAGE_LAYERS) if unit in layer)


def test_every_package_and_top_level_module_has_a_layer():
    """A new package must be placed (here and in docs/architecture.md); a new top-level module must be a command."""
    units = {package_of(name) for name in all_modules()} - {"sdt"}
    placed = set().union(*PACKAGE_LAYERS) | COMMANDS
    assert units == placed, f"not placed: {sorted(units - placed)}; gone: {sorted(placed - units)}"
    for name in COMMANDS - {"sdt.harness_tasks"}:
        source = (ROOT / (name.replace(".", "/") + ".py")).read_text()
        assert 'if __name__ == "__main__":' in source, f"{name} is top-level but not a `python -m` command"


def test_the_architecture_page_names_every_module():
    """docs/architecture.md places every module: its table lists each by file name in its package's row."""
    rows: dict[str, str] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`sdt/") and cells[0].endswith("/`"):
            rows[cells[0].strip("`").rstrip("/")] = cells[1]
        elif len(cells) == 2 and cells[0] == "commands":
            rows["sdt"] = cells[1]
    assert "sdt/models" in rows and "sdt" in rows  # the table was found
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        package = str(rel.parent) if rel.parent.name != "harness_tasks" else "sdt"
        if rel.name == "__init__.py" and package != "sdt/cli":
            continue
        name = str(rel) if package == "sdt" else rel.name
        if f"`{name}`" not in rows.get(package, "") and not (package == "sdt" and f"`{rel.name}`" in rows["sdt"]):
            missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not place: {missing}"


def test_no_package_imports_a_package_above_it(imports):
    bad = [
        imp
        for imp in imports
        if package_of(imp.importer) != "sdt" and layer_of(package_of(imp.importer)) < layer_of(package_of(imp.target))
    ]
    assert not bad, describe(bad)


def test_no_import_cycle_between_packages(imports):
    """Modules can be acyclic while their packages are not (a imports b.x, b.y imports a): checked on packages."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        source, target = package_of(imp.importer), package_of(imp.target)
        graph.setdefault(source, set())
        graph.setdefault(target, set())
        if source != target and source != "sdt":
            graph[source].add(target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)
    assert {"sdt.models", "sdt.routing"} <= graph["sdt.training"] | graph["sdt.models"]  # the scan saw edges


def test_data_imports_nothing_of_models_tasks_or_training(imports):
    """`sdt.data` is corpora, tokenizer and the data modules (reasoning SFT data included): nothing above it."""
    bad = [
        imp
        for imp in imports
        if in_layer(imp.importer, DATA) and not in_layer(imp.target, DATA) and imp.target not in FOUNDATION
    ]
    assert not bad, describe(bad)


def test_the_export_code_builds_on_models_routing_and_blocks_only(imports):
    """The wrapper routed exports ship runs the package's model: it may import models, routing, blocks and the
    foundation, which ship with it (what they import in turn is checked by tests/test_export_code.py)."""
    below = (LEAF, ROUTING, MODELS, EXPORT_CODE)
    bad = [
        imp
        for imp in imports
        if in_layer(imp.importer, EXPORT_CODE)
        and not any(in_layer(imp.target, layer) for layer in below)
        and imp.target not in FOUNDATION
    ]
    assert not bad, describe(bad)
    assert any(in_layer(imp.importer, EXPORT_CODE) and in_layer(imp.target, MODELS) for imp in imports)


def _import_in_fresh_interpreter(names: list[str]) -> subprocess.CompletedProcess:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *names],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("order", ["sorted", pytest.param("reversed", marks=pytest.mark.slow)])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(all_modules())
    if order == "reversed":
        names.reverse()
    result = _import_in_fresh_interpreter(names)
    assert result.returncode == 0, result.stderr[-3000:]


# Each module in turn is the first of the package to be imported, in one interpreter: the package's modules are
# dropped from sys.modules before each import, so a cycle through that module fails exactly as it would in a fresh
# interpreter, while torch, Lightning and transformers are imported once (97 fresh interpreters took 8 minutes).
_EACH_FIRST = """
import importlib, json, sys, traceback
failed = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "sdt" or m.startswith("sdt.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


@pytest.mark.slow
def test_each_module_imports_first():
    """Every module is, in its turn, the first of the package to be imported: a cycle through it would fail."""
    names = sorted(all_modules())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _EACH_FIRST, *names]
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{name} imported first:\n{tb}" for name, tb in failed.items())
