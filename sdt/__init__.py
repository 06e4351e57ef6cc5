"""sdt: a training framework for surprise-gated (adaptive-compute) transformers."""

__version__ = "0.1.0"
