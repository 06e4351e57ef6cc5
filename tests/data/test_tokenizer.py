import pytest

from sdt.data import Tokenizer, TokenizerConfig, train_bpe
from sdt.data import tokenizer as tokenizer_module
from sdt.data.corpus import Corpus
from sdt.data.tokenizer import get_tokenizer
from tests.data.data_helpers import make_text

SAMPLES = [
    "Hello, world! The quick brown fox.",
    "  leading and  double  spaces\tand tabs\n\n\nand newlines\r\n",
    "Accents: héllo naïve café façade über Straße ÅÆØ",
    "Emoji: 🙂🚀👩‍👩‍👧 and CJK 日本語 and —– dashes",
    "",
    "a<|endoftext|>b",
]


class ListCorpus(Corpus):
    name = "list"

    def __init__(self, docs: list[str]) -> None:
        self.docs = docs

    def fingerprint(self) -> str:
        return str(hash(tuple(self.docs)))

    def documents(self, split: str) -> list[str]:
        return self.docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([make_text(i) for i in range(20)], vocab_size=400, min_frequency=2)


def test_round_trip_and_eos(tok):
    assert tok.eos_id == 0 and tok.eos_token == "<|endoftext|>"
    assert 257 < tok.vocab_size <= 400
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    assert tok.decode([*tok.encode("one"), tok.eos_id], skip_special_tokens=True) == "one"


def test_json_round_trip(tok):
    clone = Tokenizer.from_json(tok.to_json())
    assert clone.vocab_size == tok.vocab_size and clone.eos_id == tok.eos_id
    assert clone.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)


def test_save_and_load_as_pretrained(tok, tmp_path):
    tok.save(tmp_path / "tok")
    loaded = get_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "tok")), ListCorpus([]), tmp_path)
    assert loaded.kind == "pretrained" and loaded.eos_id == tok.eos_id and loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert Tokenizer.from_json(loaded.to_json()).encode(SAMPLES[3]) == tok.encode(SAMPLES[3])


def test_bpe_cache_is_reused(tmp_path, monkeypatch):
    corpus = ListCorpus([make_text(i) for i in range(10)])
    cfg = TokenizerConfig(vocab_size=300)
    first = get_tokenizer(cfg, corpus, tmp_path)
    cached = list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = get_tokenizer(cfg, corpus, tmp_path)
    assert second.to_json() == first.to_json()
    # Other settings are another cache entry.
    monkeypatch.undo()
    get_tokenizer(TokenizerConfig(vocab_size=280), corpus, tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.json"))) == 2


def test_max_train_chars_caps_training_text(tmp_path, monkeypatch):
    seen = []
    real = tokenizer_module.train_bpe

    def spy(texts, vocab_size, min_frequency):
        texts = list(texts)
        seen.append(sum(map(len, texts)))
        return real(texts, vocab_size, min_frequency)

    monkeypatch.setattr(tokenizer_module, "train_bpe", spy)
    get_tokenizer(TokenizerConfig(vocab_size=300, max_train_chars=1000), ListCorpus([make_text(1)] * 5), tmp_path)
    assert seen == [1000]
