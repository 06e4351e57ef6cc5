"""Supervised fine-tuning data for reasoning traces, with a per-token loss mask (self-braking tuning).

Each example is a question, a `<think>...</think>` trace and a reference answer, from the offline synthetic task
(`corpus=reasoning_synthetic`, `sdt.data.reasoning.synthetic`) or a Hugging Face dataset of reasoning traces
(`corpus=reasoning_hub`, e.g. OpenR1-Math). The trace becomes a training completion under `braking`
(none | exact | dynamic, `sdt.data.reasoning.braking`), a list of segments tagged kept / masked / braking / answer.

Prompt formats. `plain` (our own BPE tokenizers) is

    Question: <question>\\nAnswer: <think>\\n...\\n</think>\\n\\n<answer><|endoftext|>

where everything up to and including "Answer: " is the prompt. `chat` renders the question as a user turn with the
tokenizer's chat template (pretrained tokenizers that define one); the assistant turn's content is the completion
and whatever the template appends after it (its end-of-turn token) is trained on. `auto` picks `chat` when the
tokenizer has a chat template, else `plain`.

Items are {"input_ids": (T,), "targets": (T,)} like `PackedDataset`'s, shifted once here: targets[t] is the token
after input_ids[t], or -100 where that token is part of the prompt, of the masked slice, or padding. One example per
row, right-padded to `seq_len`; examples longer than seq_len + 1 tokens are skipped and counted, as are traces
without think tags, without a final answer or without a correct answer step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch.utils.data import DataLoader, Dataset

from sdt.common.config_checks import check_int, check_literal_fields, check_str, from_mapping
from sdt.common.errors import UserError
from sdt.data.cache import cache_key
from sdt.data.config import TokenizerConfig, check_batching
from sdt.data.corpus import SPLITS, Corpus
from sdt.data.datamodule import ResumableDataModule
from sdt.data.reasoning.answers import answer_checker
from sdt.data.reasoning.braking import BrakingConfig, BrakingVariant, Segment, build_braking_segments
from sdt.data.reasoning.metrics import DEFAULT_MARKERS, TraceError
from sdt.data.reasoning.synthetic import make_split
from sdt.data.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

ReasoningCorpus = Literal["reasoning_synthetic", "reasoning_hub"]
PromptFormat = Literal["auto", "plain", "chat"]
REASONING_CORPORA: tuple[ReasoningCorpus, ...] = get_args(ReasoningCorpus)
PLAIN_PROMPT = "Question: {question}\nAnswer: "
IGNORE_INDEX = -100


@dataclass
class ReasoningDataConfig:
    """`data=reasoning_synthetic` / `data=reasoning_hub`: which traces, how they are trimmed, tokenized, batched."""

    corpus: ReasoningCorpus = "reasoning_synthetic"
    braking: BrakingVariant = "none"
    braking_threshold: float = 0.2
    braking_mask_threshold: float = 0.25
    braking_sentence: str = BrakingConfig.braking_sentence
    stop_token: str | None = None  # replaces the braking sentence; added to the tokenizer as a special token
    masked_sentences: int = 1
    markers: list[str] = field(default_factory=lambda: list(DEFAULT_MARKERS))
    prompt_format: PromptFormat = "auto"

    seq_len: int = 256
    batch_size: int = 16
    eval_batch_size: int | None = None
    num_workers: int = 0
    cache_dir: str = ".cache/sdt"
    seed: int = 1234
    # Examples held out (never trained on) to calibrate the causal routing thresholds of routed models; 0 = none.
    calibration_examples: int = 64

    # reasoning_synthetic
    num_train: int = 20000
    num_val: int = 200
    num_test: int = 200
    min_rechecks: int = 0
    max_rechecks: int = 5
    task_seed: int = 0  # which problems and wordings are drawn; not the training seed

    # reasoning_hub
    name: str | None = None  # hub id, or a local data file / directory (.jsonl, .json, .parquet)
    config_name: str | None = None
    train_split: str = "train"
    streaming: bool = True
    question_column: str = "problem"
    trace_column: str = "generations"  # a string, or a list of generations (the first correct one is used)
    answer_column: str = "answer"
    correct_column: str | None = "correctness_math_verify"  # per-generation booleans; null: take the first
    max_train_docs: int | None = 20000
    max_eval_docs: int = 200  # val and test are held out from the start of the train split

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        p = "data"
        check_literal_fields(self, p)
        check_batching(self, p)
        check_str(f"{p}.cache_dir", self.cache_dir)
        check_int(f"{p}.seed", self.seed)
        check_int(f"{p}.calibration_examples", self.calibration_examples, minimum=0)
        for key in ("num_train", "num_val", "num_test"):
            check_int(f"{p}.{key}", getattr(self, key), minimum=1)
        check_int(f"{p}.min_rechecks", self.min_rechecks, minimum=0)
        check_int(f"{p}.max_rechecks", self.max_rechecks, minimum=self.min_rechecks)
        check_int(f"{p}.task_seed", self.task_seed)
        check_str(f"{p}.name", self.name, allow_none=True)
        check_str(f"{p}.config_name", self.config_name, allow_none=True)
        for key in ("train_split", "question_column", "trace_column", "answer_column"):
            check_str(f"{p}.{key}", getattr(self, key))
        check_str(f"{p}.correct_column", self.correct_column, allow_none=True)
        check_int(f"{p}.max_train_docs", self.max_train_docs, minimum=1, allow_none=True)
        check_int(f"{p}.max_eval_docs", self.max_eval_docs, minimum=1)
        if not isinstance(self.streaming, bool):
            raise UserError(f"{p}.streaming must be true or false, got {self.streaming!r}")
        if isinstance(self.markers, str):
            raise UserError(f"{p}.markers must be a list of words or phrases, got {self.markers!r}")
        self.markers = [str(m) for m in self.markers]
        if self.corpus == "reasoning_hub" and self.name is None:
            raise UserError(f"{p}.name is required when {p}.corpus=reasoning_hub (a hub id or a local data file)")
        if isinstance(self.tokenizer, Mapping):
            self.tokenizer = TokenizerConfig.from_dict(self.tokenizer)
        self.braking_config  # validates the braking keys now  # noqa: B018

    @property
    def braking_config(self) -> BrakingConfig:
        return BrakingConfig(
            variant=self.braking,
            threshold=self.braking_threshold,
            mask_threshold=self.braking_mask_threshold,
            braking_sentence=self.braking_sentence,
            stop_token=self.stop_token,
            masked_sentences=self.masked_sentences,
            markers=self.markers,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReasoningDataConfig:
        return from_mapping(cls, d, "data")


@dataclass(frozen=True)
class ReasoningRecord:
    question: str
    trace: str
    answer: str


# ---------------------------------------------------------------------------------------------------------------------
# Sources of records.


def synthetic_records(cfg: ReasoningDataConfig) -> dict[str, list[ReasoningRecord]]:
    """The three splits, and calibration examples: an independent draw from the training problems."""
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test, "calibration": cfg.calibration_examples}
    return {
        split: [
            ReasoningRecord(e.question, e.trace, e.answer)
            for e in make_split(
                "train" if split == "calibration" else split,
                n,
                cfg.task_seed,
                cfg.min_rechecks,
                cfg.max_rechecks,
                stream=split,
            )
        ]
        for split, n in sizes.items()
    }


_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _open_hub_split(cfg: ReasoningDataConfig) -> Any:
    import datasets

    where = f"data.name={cfg.name}"
    path = Path(str(cfg.name)).expanduser()
    try:
        if path.is_file() or path.is_dir() and not (path / "dataset_dict.json").exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS)
            if not files:
                raise UserError(f"{where}: no .jsonl, .json or .parquet files found")
            builder = _FILE_BUILDERS.get(files[0].suffix)
            if builder is None:
                raise UserError(f"{where}: unsupported file type {files[0].suffix} (use .jsonl, .json or .parquet)")
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        return datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.train_split, streaming=cfg.streaming)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"{where}: dataset not found ({e}); give a hub id or a local data file") from None
    except ValueError as e:
        raise UserError(
            f"{where}, data.config_name={cfg.config_name}, data.train_split={cfg.train_split}: {e}"
        ) from None


def _pick_trace(row: Mapping[str, Any], cfg: ReasoningDataConfig) -> str | None:
    traces = row[cfg.trace_column]
    if isinstance(traces, str):
        return traces
    traces = list(traces or [])
    if cfg.correct_column and cfg.correct_column in row and row[cfg.correct_column] is not None:
        flags = list(row[cfg.correct_column])
        traces = [t for t, ok in zip(traces, flags, strict=False) if ok]
    return traces[0] if traces else None


def hub_rows_to_records(
    rows: Iterable[Mapping[str, Any]], cfg: ReasoningDataConfig, skipped: Counter
) -> Iterator[ReasoningRecord]:
    """Records from dataset rows; rows without a (correct) trace are counted in `skipped["no_trace"]`."""
    for i, row in enumerate(rows):
        for column in (cfg.question_column, cfg.trace_column, cfg.answer_column):
            if column not in row:
                raise UserError(
                    f"data.name={cfg.name}: row {i} has no column {column!r} (columns: {', '.join(row)}); set "
                    "data.question_column / data.trace_column / data.answer_column"
                )
        trace = _pick_trace(row, cfg)
        if not trace or row[cfg.answer_column] is None:
            skipped["no_trace"] += 1
            continue
        yield ReasoningRecord(str(row[cfg.question_column]), trace, str(row[cfg.answer_column]))


def hub_records(cfg: ReasoningDataConfig, skipped: Counter) -> dict[str, list[ReasoningRecord]]:
    """val = the first max_eval_docs records, test = the next max_eval_docs, calibration = the next
    calibration_examples, train = up to max_train_docs after."""
    n_eval, n_cal = cfg.max_eval_docs, cfg.calibration_examples
    held_out = 2 * n_eval + n_cal
    limit = None if cfg.max_train_docs is None else cfg.max_train_docs + held_out
    records = list(islice(hub_rows_to_records(_open_hub_split(cfg), cfg, skipped), limit))
    if len(records) <= held_out:
        raise UserError(
            f"data.name={cfg.name}: only {len(records)} usable traces, too few to hold out 2 x data.max_eval_docs="
            f"{n_eval} for val and test and data.calibration_examples={n_cal}, and still train"
        )
    return {
        "val": records[:n_eval],
        "test": records[n_eval : 2 * n_eval],
        "calibration": records[2 * n_eval : held_out],
        "train": records[held_out:],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tokenising segments into (input_ids, targets).


class PromptFormatter:
    """Renders prompts and completions as token ids, with the plain format or a chat template."""

    def __init__(self, tokenizer: Tokenizer, prompt_format: str, hf_tokenizer: Any = None) -> None:
        if prompt_format == "auto":
            prompt_format = "chat" if getattr(hf_tokenizer, "chat_template", None) else "plain"
        if prompt_format == "chat" and not getattr(hf_tokenizer, "chat_template", None):
            raise UserError("data.prompt_format=chat needs a pretrained tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.hf = hf_tokenizer

    def _chat_parts(self, question: str, completion: str) -> tuple[str, str]:
        user = [{"role": "user", "content": question}]
        prompt = self.hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.hf.apply_chat_template(
            [*user, {"role": "assistant", "content": completion}], tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(prompt + completion):
            raise UserError(
                "the tokenizer's chat template changes the assistant's reasoning (e.g. drops <think> blocks); use "
                "data.prompt_format=plain"
            )
        return prompt, full[len(prompt) + len(completion) :]

    def prompt_ids(self, question: str) -> list[int]:
        if self.format == "chat":
            return self.tokenizer.encode(self._chat_parts(question, "")[0])
        return self.tokenizer.encode(PLAIN_PROMPT.format(question=question))

    def example_ids(self, question: str, segments: Sequence[Segment]) -> tuple[list[int], list[bool]]:
        """Token ids of prompt + completion, and for each token whether it is trained on."""
        completion = "".join(s.text for s in segments)
        if self.format == "chat":
            prompt, suffix = self._chat_parts(question, completion)
        else:
            prompt, suffix = PLAIN_PROMPT.format(question=question), ""
        ids = self.tokenizer.encode(prompt)
        loss = [False] * len(ids)
        # Each segment is encoded on its own, so every token belongs to exactly one segment; segments start at a
        # blank line or a tag, where byte-level BPE pre-tokenisation splits anyway.
        for seg in segments:
            seg_ids = self.tokenizer.encode(seg.text)
            ids += seg_ids
            loss += [seg.has_loss] * len(seg_ids)
        end = self.tokenizer.encode(suffix) if suffix else [self.tokenizer.eos_id]
        ids += end
        loss += [True] * len(end)
        return ids, loss


def shift_with_mask(ids: Sequence[int], loss: Sequence[bool], seq_len: int, pad_id: int) -> tuple[list[int], list[int]]:
    """input_ids = ids[:-1], targets[t] = ids[t+1] where that token is trained on, else -100; padded to seq_len."""
    inputs = list(ids[:-1])
    targets = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids[1:], loss[1:], strict=True)]
    pad = seq_len - len(inputs)
    return inputs + [pad_id] * pad, targets + [IGNORE_INDEX] * pad


class MaskedSFTDataset(Dataset):
    """Pre-tokenised (input_ids, targets) rows of equal length."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets  # (N, T) int64 each

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[i], "targets": self.targets[i]}


def collate_trimmed(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows and drop the padding columns no row of the batch needs (no target past them), which changes no
    loss (attention is causal) and saves the compute of padding."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    used = (batch["targets"] != IGNORE_INDEX).any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {k: v[:, :width] for k, v in batch.items()}


class _TraceCorpus(Corpus):
    """The untrimmed training texts, for training a BPE tokenizer (shared by every braking variant)."""

    name = "reasoning"

    def __init__(self, key: dict[str, Any], records: dict[str, list[ReasoningRecord]]) -> None:
        self._key, self._records = key, records

    def fingerprint(self) -> str:
        return cache_key(self._key, length=64)

    def documents(self, split: str) -> list[str]:
        return [PLAIN_PROMPT.format(question=r.question) + r.trace for r in self._records[split]]


class ReasoningDataModule(ResumableDataModule):
    """Train / val dataloaders of masked SFT examples, and the held-out test problems for generation."""

    def __init__(self, cfg: ReasoningDataConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_dir = Path(cfg.cache_dir).expanduser().absolute()
        self._tokenizer = tokenizer
        self._records: dict[str, list[ReasoningRecord]] | None = None
        self._datasets: dict[str, MaskedSFTDataset] = {}
        self.skipped: dict[str, Counter] = {s: Counter() for s in (*SPLITS, "calibration")}
        self.stats: dict[str, dict[str, float]] = {}

    @property
    def records(self) -> dict[str, list[ReasoningRecord]]:
        if self._records is None:
            if self.cfg.corpus == "reasoning_synthetic":
                self._records = synthetic_records(self.cfg)
            else:
                self._records = hub_records(self.cfg, self.skipped["train"])
        return self._records

    def _source_key(self) -> dict[str, Any]:
        fields = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg)}
        ignore = ("braking", "braking_threshold", "braking_mask_threshold", "braking_sentence", "stop_token",
                  "masked_sentences", "markers", "prompt_format", "seq_len", "batch_size", "eval_batch_size",
                  "num_workers", "cache_dir", "seed", "tokenizer")  # fmt: skip
        return {k: v for k, v in fields.items() if k not in ignore}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            corpus = _TraceCorpus(self._source_key(), self.records)
            self._tokenizer = get_tokenizer(self.cfg.tokenizer, corpus, self.cache_dir)
        stop = self.cfg.stop_token
        if stop and self._tokenizer.backend.token_to_id(stop) is None:
            self._tokenizer.backend.add_special_tokens([stop])
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def formatter(self) -> PromptFormatter:
        hf = None
        if self.cfg.tokenizer.kind == "pretrained":
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(self.cfg.tokenizer.path)
        return PromptFormatter(self.tokenizer, self.cfg.prompt_format, hf)

    def prepare_data(self) -> None:
        self.tokenizer  # noqa: B018  (trains or loads the tokenizer once)

    def setup(self, stage: str | None = None) -> None:
        for split in {"fit": ("train", "val"), "validate": ("val",)}.get(stage or "", ("train", "val")):
            self._dataset(split)

    def build_split(self, split: str) -> MaskedSFTDataset:
        formatter, braking = self.formatter, self.cfg.braking_config
        skipped, T = self.skipped[split], self.cfg.seq_len
        inputs, targets = [], []
        trimmed = loss_tokens = masked_tokens = 0
        for r in self.records[split]:
            try:
                result = build_braking_segments(r.trace, answer_checker(r.answer), braking)
            except TraceError as e:
                skipped[str(e).split(" (")[0]] += 1
                continue
            ids, loss = formatter.example_ids(r.question, result.segments)
            if len(ids) > T + 1:
                skipped[f"longer than data.seq_len={T}"] += 1
                continue
            x, y = shift_with_mask(ids, loss, T, self.tokenizer.eos_id)
            inputs.append(x)
            targets.append(y)
            trimmed += result.trimmed
            loss_tokens += sum(loss[1:])
            masked_tokens += sum(len(self.tokenizer.encode(s.text)) for s in result.segments if s.role == "masked")
        if skipped:
            log.warning("%s split: skipped %d traces: %s", split, sum(skipped.values()), dict(skipped))
        if not inputs:
            raise UserError(f"the {split} split has no usable reasoning traces (skipped: {dict(skipped)})")
        self.stats[split] = {
            "num_examples": len(inputs),
            "num_skipped": sum(skipped.values()),
            "num_trimmed": trimmed,
            "num_tokens": loss_tokens,
            "masked_tokens": masked_tokens,
        }
        log.info("%s split (braking=%s): %s", split, self.cfg.braking, self.stats[split])
        return MaskedSFTDataset(torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long))

    def _dataset(self, split: str) -> MaskedSFTDataset:
        if split not in self._datasets:
            self._datasets[split] = self.build_split(split)
        return self._datasets[split]

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        ds = self._dataset(split)
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=self.train_sampler(ds, batch_size) if shuffle else None,
            drop_last=shuffle,
            collate_fn=collate_trimmed,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if len(self._dataset("train")) < self.cfg.batch_size:
            raise UserError(
                f"the train split has {len(self._dataset('train'))} usable traces, fewer than data.batch_size="
                f"{self.cfg.batch_size}"
            )
        return self._loader("train", self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.cfg.eval_batch_size is not None
        return self._loader("val", self.cfg.eval_batch_size, shuffle=False)

    def calibration_dataloader(self) -> DataLoader | None:
        """Held-out examples for calibrating routed models' thresholds (padding included), or None when disabled."""
        if self.cfg.calibration_examples == 0:
            return None
        assert self.cfg.eval_batch_size is not None
        return self._loader("calibration", self.cfg.eval_batch_size, shuffle=False)

    @property
    def split_stats(self) -> dict[str, dict[str, float]]:
        """Per built split: examples, skipped traces, trimmed traces, trained-on and masked tokens."""
        return {**self.stats, "skipped": {s: dict(c) for s, c in self.skipped.items() if c}}

    def test_problems(self, split: str = "test") -> list[tuple[str, list[int], str]]:
        """(question, prompt ids, reference answer) for every record of `split`: what evaluation generates from."""
        formatter = self.formatter
        return [(r.question, formatter.prompt_ids(r.question), r.answer) for r in self.records[split]]
