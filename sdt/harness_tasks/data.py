"""Loads the data files next to these task YAMLs, wherever lm-eval is run from (`custom_dataset: !function ...`).

`dataset_kwargs.data_files` would be resolved against the working directory, not the YAML's; these loaders use the
directory of this file instead. lm-eval calls them with the task's metadata and dataset_kwargs, which they ignore.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _test_split(name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / name))})


def next_line(**kwargs) -> datasets.DatasetDict:
    return _test_split("shakespeare_next_line.jsonl")


def tempest(**kwargs) -> datasets.DatasetDict:
    return _test_split("tempest_text.jsonl")
