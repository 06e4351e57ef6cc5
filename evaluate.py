"""Evaluate a checkpoint: `python evaluate.py ckpt_path=<path to .ckpt> [data=...]` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from sdt.cli import reject_training_overrides, run_cli, run_task
from sdt.cli.dispatch import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_task(evaluate, cfg)


if __name__ == "__main__":
    reject_training_overrides(sys.argv[1:])
    run_cli(main)
