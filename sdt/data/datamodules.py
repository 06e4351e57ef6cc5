"""The data module of a `data` config, whatever its corpus: reasoning SFT examples for the reasoning corpora
(`sdt.data.reasoning.datamodule`), packed language-model blocks otherwise (`sdt.data`)."""

from __future__ import annotations

from typing import Any

import lightning as L

from sdt.data import DataConfig, LMDataModule, Tokenizer
from sdt.data.reasoning.datamodule import REASONING_CORPORA, ReasoningDataConfig, ReasoningDataModule


def data_config_class(data: dict[str, Any]) -> type[DataConfig | ReasoningDataConfig]:
    """The config class that `data.corpus` is validated with."""
    return ReasoningDataConfig if data.get("corpus") in REASONING_CORPORA else DataConfig


def build_datamodule(data: dict[str, Any], tokenizer: Tokenizer | None = None) -> tuple[Any, L.LightningDataModule]:
    """(config, data module) for a `data` config."""
    if data_config_class(data) is ReasoningDataConfig:
        reasoning_cfg = ReasoningDataConfig.from_dict(data)
        return reasoning_cfg, ReasoningDataModule(reasoning_cfg, tokenizer=tokenizer)
    cfg = DataConfig.from_dict(data)
    return cfg, LMDataModule(cfg, tokenizer=tokenizer)
