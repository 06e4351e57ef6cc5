"""The package's modules as the flat set of files a routed export ships (see this package's docstring).

`shipped_sources()` starts at `modeling_sdt.py` and follows every import of an `sdt` module, recursively, to the
package files the exported model runs: the model assembly (`sdt/models/`), the routing (`sdt/routing/`), the blocks
and the KV cache (`sdt/blocks/`) and the two foundation modules they use. Each module ships under its last name
(`sdt/routing/topk.py` as `topk.py`, a package's `__init__.py` as the package's name, `routing.py`), and in each the
only lines that change are its imports of `sdt` modules: `from sdt.routing.topk import X` becomes
`from .topk import X`, the one form transformers' dynamic-module loader follows (a flat sibling). Every other line,
docstrings and comments included, is the package's own (tests/test_export_code.py compares them line by line).

A module that would not work flat is refused with a `ShippingError` naming it: one importing a third-party package
other than torch (transformers: the wrapper only), `import sdt...` or a submodule by name
(`from sdt.routing import topk`), a relative import beyond its own package, or two modules sharing a last name.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(HERE)  # sdt/
PACKAGE = os.path.basename(PACKAGE_DIR)  # "sdt"
MODELING_FILE = os.path.join(HERE, "modeling_sdt.py")  # the wrapper: the module `auto_map` names
# Third-party packages the shipped files may import: torch everywhere, transformers in the wrapper only.
ALLOWED_PACKAGES = frozenset({"torch"})
WRAPPER_PACKAGES = frozenset({"torch", "transformers"})

_PACKAGE_IMPORT = re.compile(rf"\bfrom\s+{PACKAGE}(?:\.\w+)*\s+import\b")


class ShippingError(ValueError):
    """A package module that cannot ship flat in an export (the message names it)."""


@dataclass(frozen=True)
class ShippedModule:
    module: str  # dotted name in the package, e.g. sdt.routing.topk
    path: str  # its file
    flat_name: str  # its name in the export directory, without .py
    source: str  # its text with the `sdt` import lines rewritten


def module_file(module: str) -> str | None:
    """The file of package module `module` (sdt.a.b -> sdt/a/b.py or sdt/a/b/__init__.py), None if none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = os.path.join(PACKAGE_DIR, *parts[1:])
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))
    parts = rel[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def flat_name(module: str) -> str:
    return module.rpartition(".")[2]


def _package_of(module: str, path: str) -> str:
    return module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: str, tree: ast.AST, wrapper: bool) -> tuple[list[str], dict[int, str]]:
    """(package modules `module` imports, {line of a `from sdt.<...> import` statement: the module it names}),
    checking every import."""
    allowed = set(sys.stdlib_module_names) | (WRAPPER_PACKAGES if wrapper else ALLOWED_PACKAGES)
    where = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))
    targets: list[str] = []
    rewrites: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == PACKAGE:
                    raise ShippingError(f"{where}:{node.lineno}: `import {alias.name}` (use `from ... import`)")
                if top not in allowed:
                    raise ShippingError(f"{where}:{node.lineno} imports {alias.name}, which an export does not ship")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top = (node.module or "").split(".")[0]
                if top != PACKAGE:
                    if top not in allowed:
                        raise ShippingError(
                            f"{where}:{node.lineno} imports {node.module}, which an export does not ship"
                        )
                    continue
                target, rewrite = node.module or "", True
            elif node.level == 1 and node.module:  # a sibling in its own package: flat already
                target, rewrite = f"{_package_of(module, path)}.{node.module}", False
            else:
                raise ShippingError(f"{where}:{node.lineno}: a relative import beyond a sibling module")
            if module_file(target) is None:
                raise ShippingError(f"{where}:{node.lineno} imports {target}, not a module of the package")
            sub = [a.name for a in node.names if module_file(f"{target}.{a.name}") is not None]
            if sub:
                raise ShippingError(f"{where}:{node.lineno} imports module(s) {sub} by name: import their names")
            if target == PACKAGE:
                raise ShippingError(f"{where}:{node.lineno} imports the top-level package {target}")
            targets.append(target)
            if rewrite:
                rewrites[node.lineno] = target
    return targets, rewrites


def flat_source(text: str, rewrites: dict[int, str], where: str = "") -> str:
    """`text` with the `from sdt.<...> import` on each line of `rewrites` (line -> the module it names) made
    `from .<flat name> import`; every other line as it is."""
    lines = text.splitlines(keepends=True)
    for lineno, target in rewrites.items():
        new, n = _PACKAGE_IMPORT.subn(f"from .{flat_name(target)} import", lines[lineno - 1], count=1)
        if n != 1:  # the module name continues on another line: not written in this package
            raise ShippingError(f"{where}:{lineno}: cannot rewrite the import {lines[lineno - 1].strip()!r}")
        lines[lineno - 1] = new
    return "".join(lines)


def _read_module(module: str, path: str, wrapper: bool) -> tuple[list[str], str]:
    """(package modules `module` imports, its shipped text)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    targets, rewrites = _imports(module, path, ast.parse(text, filename=path), wrapper)
    return targets, flat_source(text, rewrites, os.path.relpath(path, os.path.dirname(PACKAGE_DIR)))


def shipped_modules(start: str = MODELING_FILE) -> list[ShippedModule]:
    """The wrapper and every package module it needs, in the order they were found, with their shipped text."""
    first = module_name(start)
    todo, seen = [first], {first}
    out: list[ShippedModule] = []
    while todo:
        module = todo.pop(0)
        path = module_file(module)
        assert path is not None, module
        targets, source = _read_module(module, path, wrapper=module == first)
        out.append(ShippedModule(module, path, flat_name(module), source))
        for target in targets:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    names: dict[str, str] = {}
    for shipped in out:
        other = names.setdefault(shipped.flat_name, shipped.module)
        if other != shipped.module:
            raise ShippingError(f"{other} and {shipped.module} would both ship as {shipped.flat_name}.py")
    return out


def shipped_sources() -> dict[str, str]:
    """File name in the export directory -> its text."""
    return {f"{m.flat_name}.py": m.source for m in shipped_modules()}
