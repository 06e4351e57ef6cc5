"""Train a model: `python train.py [model=dense|...] [data=...] [key=value ...]` (see README)."""

import hydra
from omegaconf import DictConfig

from sdt.cli import run_cli, run_task
from sdt.training.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run_task(train, cfg)
    # Returned to Hydra so sweepers (e.g. Optuna) can optimise the final validation loss.
    return result["metrics"].get("val/loss")


if __name__ == "__main__":
    run_cli(main)
