"""Configuration of the data pipeline: which corpus, how it is tokenized, how it is batched.

Both dataclasses are built from plain dicts (what Hydra hands over as `cfg.data`) with `from_dict`, which rejects
unknown keys so that a typo in an override fails loudly instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sdt.common.config_checks import check_int, check_literal_fields, check_str, from_mapping
from sdt.common.errors import UserError

Corpus = Literal["shakespeare", "text_files", "hf_hub"]
TokenizerKind = Literal["bpe", "pretrained"]  # a BPE trained on the corpus, or a Hugging Face tokenizer
CORPORA: tuple[Corpus, ...] = get_args(Corpus)
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)


def check_fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 0.5:
        raise UserError(f"{key} must be a number in [0, 0.5), got {value!r}")


def check_batching(cfg: Any, p: str) -> None:
    """Validate the batching keys every data config has (seq_len, batch_size, eval_batch_size, num_workers) and
    default eval_batch_size to batch_size."""
    check_int(f"{p}.seq_len", cfg.seq_len, minimum=2)
    check_int(f"{p}.batch_size", cfg.batch_size, minimum=1)
    check_int(f"{p}.eval_batch_size", cfg.eval_batch_size, minimum=1, allow_none=True)
    if cfg.eval_batch_size is None:
        cfg.eval_batch_size = cfg.batch_size
    check_int(f"{p}.num_workers", cfg.num_workers, minimum=0)


@dataclass
class TokenizerConfig:
    """How text becomes token ids.

    kind=bpe trains a byte-level BPE on the train split (cached per corpus and settings); kind=pretrained loads a
    Hugging Face tokenizer from `path` (a local directory or a hub id).
    """

    kind: TokenizerKind = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    path: str | None = None
    max_train_chars: int | None = None  # cap on the text BPE is trained on; None = the whole train split

    def __post_init__(self) -> None:
        p = "data.tokenizer"
        check_literal_fields(self, p)
        check_int(f"{p}.vocab_size", self.vocab_size)
        if self.kind == "bpe" and self.vocab_size < 256 + len(SPECIAL_TOKENS):
            # Byte-level BPE starts from all 256 bytes plus the special tokens; anything smaller cannot be trained.
            raise UserError(
                f"{p}.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for kind=bpe "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special token), got {self.vocab_size}"
            )
        check_int(f"{p}.min_frequency", self.min_frequency, minimum=0)
        check_str(f"{p}.path", self.path, allow_none=True)
        if self.kind == "pretrained" and self.path is None:
            raise UserError(f"{p}.path is required when {p}.kind=pretrained (a local directory or a hub id)")
        check_int(f"{p}.max_train_chars", self.max_train_chars, minimum=1, allow_none=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenizerConfig:
        return from_mapping(cls, d, "data.tokenizer")


@dataclass
class DataConfig:
    """Everything that determines the token streams and the batches drawn from them."""

    corpus: Corpus = "shakespeare"
    seq_len: int = 256
    batch_size: int = 16
    eval_batch_size: int | None = None  # None = batch_size
    num_workers: int = 0
    # Blocks held out from the end of the train split (at most 10% of it) to calibrate the causal routing
    # thresholds of routed models; never trained on.
    calibration_blocks: int = 32
    # Relative paths are resolved against the working directory when the datamodule is built; under Hydra the
    # caller passes an absolute path so runs in different output dirs share one cache.
    cache_dir: str = ".cache/sdt"

    # text_files
    paths: list[str] = field(default_factory=list)
    text_column: str = "text"  # jsonl/parquet field, and hf_hub column

    # hf_hub
    name: str | None = None
    config_name: str | None = None
    train_split: str = "train"
    val_split: str | None = "validation"
    test_split: str | None = None
    streaming: bool = True
    max_train_docs: int | None = None  # None: the whole train split
    max_eval_docs: int = 500
    # Sharded preparation (hf_hub): tokenizing worker processes (None: the cores available) and tokens per shard.
    num_proc: int | None = None
    shard_tokens: int = 2**25

    # Held-out shares for text_files, and for hf_hub when a val/test split is missing.
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 1234  # shuffling order only: splits never depend on it, so all seeds are evaluated on the same text

    def __post_init__(self) -> None:
        p = "data"
        check_literal_fields(self, p)
        check_batching(self, p)
        check_int(f"{p}.calibration_blocks", self.calibration_blocks, minimum=0)
        check_str(f"{p}.cache_dir", self.cache_dir)

        # A single path is a common CLI shorthand (data.paths=corpus.txt); OmegaConf lists arrive as ListConfig.
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        try:
            self.paths = [str(x) for x in self.paths]
        except TypeError:
            raise UserError(f"{p}.paths must be a list of paths or globs, got {self.paths!r}") from None
        check_str(f"{p}.text_column", self.text_column)

        check_str(f"{p}.name", self.name, allow_none=True)
        check_str(f"{p}.config_name", self.config_name, allow_none=True)
        check_str(f"{p}.train_split", self.train_split)
        check_str(f"{p}.val_split", self.val_split, allow_none=True)
        check_str(f"{p}.test_split", self.test_split, allow_none=True)
        if not isinstance(self.streaming, bool):
            raise UserError(f"{p}.streaming must be true or false, got {self.streaming!r}")
        check_int(f"{p}.max_train_docs", self.max_train_docs, minimum=1, allow_none=True)
        check_int(f"{p}.max_eval_docs", self.max_eval_docs, minimum=1)
        check_int(f"{p}.num_proc", self.num_proc, minimum=1, allow_none=True)
        check_int(f"{p}.shard_tokens", self.shard_tokens, minimum=1024)

        check_fraction(f"{p}.val_fraction", self.val_fraction)
        check_fraction(f"{p}.test_fraction", self.test_fraction)
        check_int(f"{p}.seed", self.seed)

        if isinstance(self.tokenizer, Mapping):
            self.tokenizer = TokenizerConfig.from_dict(self.tokenizer)
        if not isinstance(self.tokenizer, TokenizerConfig):
            raise UserError(f"{p}.tokenizer must be a mapping, got {self.tokenizer!r}")

        if self.corpus == "text_files" and not self.paths:
            raise UserError(f"{p}.paths must list at least one file or glob when {p}.corpus=text_files")
        if self.corpus == "hf_hub" and self.name is None:
            raise UserError(f"{p}.name is required when {p}.corpus=hf_hub (a hub id or a local dataset directory)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a plain (or OmegaConf) mapping; the nested `tokenizer` mapping becomes a TokenizerConfig."""
        return from_mapping(cls, d, "data")
