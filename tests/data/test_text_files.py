from pathlib import Path

import pytest

from sdt.common.errors import UserError
from sdt.data import TextFilesCorpus
from sdt.data.corpus import SPLITS
from sdt.data.text_files import MIN_DOCS_FOR_HASH_SPLIT, line_split
from tests.data.data_helpers import make_text, write_jsonl, write_parquet


def splits_of(corpus):
    return {s: corpus.documents(s) for s in SPLITS}


def test_txt_files_split_by_lines(txt_corpus):
    corpus = TextFilesCorpus(txt_corpus, val_fraction=0.1, test_fraction=0.05)
    splits = splits_of(corpus)
    assert all(splits[s] for s in SPLITS)
    # Each file is cut into consecutive pieces at line boundaries; together they rebuild it exactly.
    for i, path in enumerate(txt_corpus):
        original = Path(path).read_text(encoding="utf-8")
        assert splits["train"][i] + splits["val"][i] + splits["test"][i] == original
        assert splits["train"][i].endswith("\n") and splits["val"][i].endswith("\n")
        assert 0.8 < len(splits["train"][i]) / len(original) < 0.9
    assert splits_of(TextFilesCorpus(txt_corpus, val_fraction=0.1, test_fraction=0.05)) == splits


def test_jsonl_and_parquet_hash_split(tmp_path):
    docs = [make_text(i, n_lines=3) for i in range(120)]
    write_jsonl(tmp_path / "a.jsonl", docs[:60], column="body")
    write_parquet(tmp_path / "b.parquet", docs[60:], column="body")
    corpus = TextFilesCorpus([str(tmp_path / "*.jsonl"), str(tmp_path / "b.parquet")], "body", 0.2, 0.2, seed=1)
    splits = splits_of(corpus)
    assert all(splits[s] for s in SPLITS)
    assert sorted(d for s in SPLITS for d in splits[s]) == sorted(docs)  # whole documents, each in one split
    assert splits_of(TextFilesCorpus([str(tmp_path)], "body", 0.2, 0.2, seed=1)) == splits  # a directory works too
    assert splits_of(TextFilesCorpus([str(tmp_path)], "body", 0.2, 0.2, seed=2)) != splits


def test_few_documents_fall_back_to_line_split(tmp_path):
    docs = [make_text(i) for i in range(MIN_DOCS_FOR_HASH_SPLIT - 1)]
    write_jsonl(tmp_path / "few.jsonl", docs)
    splits = splits_of(TextFilesCorpus([str(tmp_path / "few.jsonl")]))
    assert all(len(splits[s]) == len(docs) for s in SPLITS)


def test_line_split_keeps_every_share_non_empty():
    assert line_split("abc", (0.9, 0.05, 0.05)) == ("a", "b", "c")  # one line: cut by characters
    train, val, test = line_split("l1\nl2\nl3\nl4\nl5\nl6\nl7\nl8\n", (0.5, 0.25, 0.25))
    assert (train, val, test) == ("l1\nl2\nl3\nl4\n", "l5\nl6\n", "l7\nl8\n")
    assert line_split("l1\nl2\n", (0.9, 0.0, 0.1)) == ("l1\n", "", "l2\n")


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "match"),
    [
        ("missing.txt", None, {}, "does not exist"),
        ("table.csv", "a,b\n", {}, "unsupported extension"),
        ("latin1.txt", b"caf\xe9\n", {}, "not valid UTF-8"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', {}, "not valid UTF-8"),
        ("nocol.jsonl", '{"body": "hello"}\n', {}, "has no column 'text'"),
        ("nocol.parquet", "parquet", {}, "has no column 'text'"),
        ("blank.txt", "  \n\n\t\n", {}, "holds no text"),
        ("broken.jsonl", '{"text": "unterminated\n', {}, "could not read"),
    ],
)
def test_errors_name_the_file(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    if content == "parquet":
        write_parquet(path, ["hello"], column="body")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match) as e:
        TextFilesCorpus([str(path)], **kwargs).documents("train")
    assert name in str(e.value)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        TextFilesCorpus([str(tmp_path / "*.txt")])
