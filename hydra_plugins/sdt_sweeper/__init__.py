"""Hydra's grid sweeper, with each job given only the model options its model has (`sdt.training.sweeps.model_grid`).

`python train.py -m model=dense,sdt model.capacity=0.125,0.5` runs three jobs: dense (which has no capacity) once,
SDT at each capacity. Selected by conf/train.yaml (`hydra/sweeper: model_grid`). Hydra instantiates sweepers only from
the `hydra_plugins` package, hence this thin subclass; the rule itself is `sdt.training.sweeps`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override

from sdt.training.sweeps import model_grid


class ModelGridSweeper(BasicSweeper):
    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        grid = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs = model_grid(grid, self.arch_of)
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

    def arch_of(self, overrides: Sequence[str]) -> str:
        """The architecture of the model a job with these overrides composes."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        return str(cfg.model.arch)
