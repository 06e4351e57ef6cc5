"""Every third-party module the code imports is declared in pyproject.toml: the package's own code (and the entry
points, benchmarks and scripts beside it) against `dependencies` and the optional extras, the tests against those plus
`dev`. A module imported at module level, outside a `try: ... except ImportError`, must be a core dependency: a plain
`pip install -e .` would otherwise fail on import."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCAL = {"sdt", "tests", "benchmarks", "scripts", "train", "evaluate"}
# Imported, optionally, by a benchmark only and declared nowhere, each with the reason.
BENCHMARK_ONLY = {
    "litdata": "benchmarks/data_prep.py --litdata compares it; its releases need a newer torch than the project's range",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0])


CORE = {requirement_name(r) for r in PYPROJECT["dependencies"]}
EXTRAS = {extra: {requirement_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, optional) for every absolute import in `path`; optional when it sits inside a function or
    a `try` block that handles ImportError (the code runs without it)."""
    found: list[tuple[str, bool]] = []

    def handles_import_error(node: ast.Try) -> bool:
        names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        return any("ImportError" in n or "ModuleNotFoundError" in n for n in names)

    def visit(node: ast.AST, optional: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = optional or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Try) and handles_import_error(child):
                inner = True
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                found.append((child.module.split(".")[0], inner))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def third_party(module: str, path: Path) -> bool:
    sibling = (path.parent / f"{module}.py").is_file()  # benchmarks/ and scripts/ import their neighbours
    return module not in sys.stdlib_module_names and module not in LOCAL and not sibling


@functools.cache
def module_distributions() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once


def distributions(module: str) -> set[str]:
    return {normalise(d) for d in module_distributions().get(module, [])}


def source_files(*dirs: str) -> list[Path]:
    files = [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]
    return [p for p in files if "transformers_code" not in p.parts or p.name.startswith("modeling")]


PACKAGE_FILES = source_files("sdt", "benchmarks", "scripts") + [ROOT / "train.py", ROOT / "evaluate.py"]


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_imports_are_declared(path):
    declared_anywhere = CORE.union(*EXTRAS.values())
    for module, optional in imports(path):
        if not third_party(module, path):
            continue
        if module in BENCHMARK_ONLY and optional and path.parent.name == "benchmarks":
            continue
        dists = distributions(module)
        assert dists, f"{path.name} imports {module!r}, which no installed distribution provides"
        allowed = declared_anywhere if optional else CORE
        assert dists & allowed, (
            f"{path.relative_to(ROOT)} imports {module!r} (from {sorted(dists)})"
            + (" inside a function or ImportError guard" if optional else " at module level")
            + f": declare it in pyproject.toml's {'dependencies or an extra' if optional else 'dependencies'}"
        )


def test_test_imports_are_declared_in_dev():
    allowed = CORE | EXTRAS["dev"]
    for path in source_files("tests"):
        for module, _ in imports(path):
            if third_party(module, path):
                dists = distributions(module)
                assert dists & allowed, f"tests/{path.name} imports {module!r} ({sorted(dists)}): add it to dev"


def test_the_checker_sees_an_undeclared_import(tmp_path):
    # The checker itself: a module-level import of an installed but undeclared distribution is caught, and an
    # optional import of an extra is allowed only through the guard.
    probe = tmp_path / "probe.py"
    probe.write_text("import pytest\ntry:\n    import lm_eval\nexcept ImportError:\n    pass\n")
    found = dict(imports(probe))
    assert found == {"pytest": False, "lm_eval": True}
    assert not distributions("pytest") & CORE and distributions("lm_eval") & EXTRAS["eval"]
