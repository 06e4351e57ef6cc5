"""Data pipeline: corpora, tokenizers, token shards of large corpora and the LightningDataModule that packs token
streams into training blocks."""

from sdt.data.config import DataConfig, TokenizerConfig
from sdt.data.corpora import build_corpus
from sdt.data.corpus import Corpus
from sdt.data.datamodule import LMDataModule, PackedDataset
from sdt.data.hf_hub import HFHubCorpus
from sdt.data.shakespeare import ShakespeareCorpus
from sdt.data.shards import ShardedTokens
from sdt.data.text_files import TextFilesCorpus
from sdt.data.tokenizer import Tokenizer, get_tokenizer, train_bpe

__all__ = [
    "Corpus",
    "DataConfig",
    "HFHubCorpus",
    "LMDataModule",
    "PackedDataset",
    "ShakespeareCorpus",
    "ShardedTokens",
    "TextFilesCorpus",
    "Tokenizer",
    "TokenizerConfig",
    "build_corpus",
    "get_tokenizer",
    "train_bpe",
]
