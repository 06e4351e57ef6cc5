"""Tokenizers: a byte-level BPE trained on the corpus, or a pretrained Hugging Face tokenizer.

Both are held as a `tokenizers.Tokenizer` (the Rust backend of HF fast tokenizers), so one class covers them and
`to_json` can embed either in a checkpoint, to be rebuilt later with `Tokenizer.from_json` without any file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sdt.common.errors import UserError
from sdt.data.cache import (
    atomic_write_text,
    cache_key,
    cache_lock,
    file_problem,
    file_record,
    read_record,
    write_record,
)
from sdt.data.config import EOS_TOKEN, TokenizerConfig
from sdt.data.corpus import Corpus

log = logging.getLogger(__name__)

_JSON_FORMAT = "sdt.Tokenizer"
_JSON_VERSION = 1


class Tokenizer:
    """Text <-> token ids, with an end-of-text token that separates documents."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN, kind: str = "bpe") -> None:
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"the tokenizer has no token {eos_token!r} to use as end-of-text")
        self.backend = backend
        self.eos_token = eos_token
        self.kind = kind
        self._eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the model must embed, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from a post-processor: the datamodule places EOS itself, after every document.
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust backend spreads them over threads."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # accept numpy arrays and tensors
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer, as one JSON string (e.g. to store in a checkpoint)."""
        return json.dumps(
            {
                "format": _JSON_FORMAT,
                "version": _JSON_VERSION,
                "kind": self.kind,
                "eos_token": self.eos_token,
                "tokenizer": self.backend.to_str(),
            }
        )

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        d = json.loads(s)
        if d.get("format") != _JSON_FORMAT:
            raise UserError(f"not a serialized sdt tokenizer (format={d.get('format')!r})")
        return cls(tokenizers.Tokenizer.from_str(d["tokenizer"]), d["eos_token"], d["kind"])

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable with `AutoTokenizer.from_pretrained(directory)`
        (and so with data.tokenizer.kind=pretrained, data.tokenizer.path=directory)."""
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=self.backend, eos_token=self.eos_token)
        hf.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, path: str, gguf_file: str | None = None) -> Tokenizer:
        """Load a Hugging Face fast tokenizer from a local directory or a hub id (or a GGUF file in `path`)."""
        from transformers import AutoTokenizer

        # trust_remote_code=False: the tokenizer is tokenizer.json alone; a routed export's config.json names modeling
        # code, and without it transformers would stop to ask whether to run that code (and wait for an answer).
        options: dict[str, Any] = {"trust_remote_code": False, **({"gguf_file": gguf_file} if gguf_file else {})}
        try:
            hf = AutoTokenizer.from_pretrained(path, **options)
        except (OSError, ValueError) as e:
            raise UserError(f"data.tokenizer.path={path}: could not load a tokenizer ({e})") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise UserError(f"data.tokenizer.path={path}: only fast (tokenizer.json based) tokenizers are supported")
        if hf.eos_token is None:
            raise UserError(f"data.tokenizer.path={path}: the tokenizer defines no eos_token to separate documents")
        return cls(backend, hf.eos_token, kind="pretrained")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind}, vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE. Every byte is in the base alphabet and no normalizer runs, so
    decode(encode(s)) == s for any string; `<|endoftext|>` is id 0."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, EOS_TOKEN, kind="bpe")


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    if max_chars is None:
        yield from texts
        return
    left = max_chars
    for t in texts:
        if left <= 0:
            return
        yield t[:left]
        left -= len(t)


def bpe_cache_path(cfg: TokenizerConfig, corpus: Corpus, cache_dir: str | os.PathLike) -> Path:
    """Where the BPE trained for this corpus and these settings is cached."""
    key = cache_key(
        {
            "corpus": corpus.fingerprint(),
            "vocab_size": cfg.vocab_size,
            "min_frequency": cfg.min_frequency,
            "max_train_chars": cfg.max_train_chars,
            "eos": EOS_TOKEN,
            "version": _JSON_VERSION,
        }
    )
    return Path(cache_dir) / "tokenizers" / key / "tokenizer.json"


def get_tokenizer(cfg: TokenizerConfig, corpus: Corpus, cache_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer `cfg` asks for: a BPE trained on the corpus' train split (cached), or a pretrained one."""
    if cfg.kind == "pretrained":
        assert cfg.path is not None  # TokenizerConfig enforces it
        return Tokenizer.from_pretrained(cfg.path)

    path = bpe_cache_path(cfg, corpus, cache_dir)
    tok, problem = load_cached_bpe(path)
    if tok is not None:
        log.info("loading cached tokenizer %s", path)
        return tok
    with cache_lock(path.parent):
        tok, problem = load_cached_bpe(path)  # another process may have (re)built it while we waited for the lock
        if tok is not None:
            return tok
        if problem is not None:
            log.warning("cached tokenizer %s is damaged (%s): training it again", path, problem)
        t0 = time.perf_counter()
        # Streamed: with max_train_chars set, only that much of a large corpus is read.
        texts = _capped(corpus.iter_documents("train"), cfg.max_train_chars)
        tok = train_bpe(texts, cfg.vocab_size, cfg.min_frequency)
        path.with_name(_META_NAME).unlink(missing_ok=True)  # the record goes last: the entry is complete with it
        atomic_write_text(path, tok.backend.to_str())
        write_record(path.with_name(_META_NAME), _bpe_record(path, tok))
        log.info("trained BPE (vocab %d) in %.1fs, cached at %s", tok.vocab_size, time.perf_counter() - t0, path)
        return tok


_META_NAME = "meta.json"  # next to tokenizer.json: its size, SHA-256 and vocabulary size


def _bpe_record(path: Path, tok: Tokenizer) -> dict[str, object]:
    return {**file_record(path), "vocab_size": tok.vocab_size}


def load_cached_bpe(path: Path) -> tuple[Tokenizer | None, str | None]:
    """(the cached BPE, None) when `path` holds an intact one; (None, what is wrong) when it is damaged; (None, None)
    when there is none.

    The entry is checked against its record (`meta.json`: size, SHA-256, vocabulary size) and must load with an
    end-of-text token. An entry written before records existed is adopted when it loads, and given its record.
    """
    if not path.is_file():
        return None, None
    record_path = path.with_name(_META_NAME)
    record = read_record(record_path)
    if record is None and record_path.exists():
        return None, f"{_META_NAME} is unreadable or corrupted"
    if record is not None:
        problem = file_problem(path, record)
        if problem is not None:
            return None, problem
    try:
        tok = Tokenizer(tokenizers.Tokenizer.from_file(str(path)), EOS_TOKEN, kind="bpe")
    except Exception as e:  # noqa: BLE001 - the Rust parser fails with plain Exceptions
        return None, f"{path.name} does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if record is None:
        write_record(record_path, _bpe_record(path, tok))
    elif record.get("vocab_size") != tok.vocab_size:
        return None, f"{path.name} has {tok.vocab_size} tokens, its record says {record.get('vocab_size')}"
    return tok, None
