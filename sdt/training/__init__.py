"""Training: `train` (train.py's task), the Lightning module, optimizer groups, distillation, distributed
strategies, callbacks, checkpoints, loggers and sweeps. Each module is imported by its own name
(`from sdt.training.train import train`), so importing one does not load the rest."""
