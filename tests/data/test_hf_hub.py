import datasets
import pytest

from sdt.common.errors import UserError
from sdt.data import DataConfig, HFHubCorpus, build_corpus
from tests.data.data_helpers import make_text, write_jsonl, write_parquet

DOCS = [make_text(i, n_lines=2) for i in range(100)]


@pytest.mark.parametrize("streaming", [True, False])
def test_local_data_dir_with_missing_val_split(tmp_path, streaming):
    data = tmp_path / "ds"
    data.mkdir()
    write_jsonl(data / "train.jsonl", DOCS[:90])
    write_jsonl(data / "test.jsonl", DOCS[90:])
    corpus = HFHubCorpus(
        str(data), test_split="test", streaming=streaming, max_eval_docs=4, cache_dir=str(tmp_path / "hf")
    )
    # "validation" does not exist: the first 4 (= min(max_eval_docs, 5% of 90)) train documents are held out.
    assert corpus.documents("val") == DOCS[:4]
    assert corpus.documents("train") == DOCS[4:90]
    assert corpus.documents("test") == DOCS[90:94]  # capped at max_eval_docs


def test_both_held_out_and_train_limit(tmp_path):
    data = tmp_path / "pq"
    data.mkdir()
    write_parquet(data / "train-00000.parquet", DOCS)
    corpus = HFHubCorpus(
        str(data), val_split=None, max_train_docs=50, max_eval_docs=3, val_fraction=0.1, test_fraction=0.1
    )
    assert corpus.documents("val") == DOCS[:3]
    assert corpus.documents("test") == DOCS[3:6]
    assert corpus.documents("train") == DOCS[6:56]
    assert len({corpus.fingerprint(), HFHubCorpus(str(data), val_split=None, max_train_docs=49).fingerprint()}) == 2


@pytest.mark.parametrize("streaming", [True, False])
def test_save_to_disk(tmp_path, streaming):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:80], "n": list(range(80))}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[80:], "n": list(range(20))}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    corpus = HFHubCorpus(str(tmp_path / "dict"), streaming=streaming, val_fraction=0.0, test_fraction=0.1)
    assert corpus.documents("val") == DOCS[80:]
    assert corpus.documents("test") == DOCS[:8]
    assert corpus.documents("train") == DOCS[8:80]

    dd["train"].save_to_disk(str(tmp_path / "single"))  # a plain Dataset is the train split
    cfg = DataConfig(corpus="hf_hub", name=str(tmp_path / "single"), streaming=streaming, max_eval_docs=2)
    corpus = build_corpus(cfg)
    assert corpus.documents("val") == DOCS[:2] and corpus.documents("test") == DOCS[2:4]


def test_missing_column_and_split(tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    write_jsonl(data / "train.jsonl", DOCS[:10], column="story")
    with pytest.raises(UserError, match="no column 'text'.*story"):
        HFHubCorpus(str(data)).documents("train")
    with pytest.raises(UserError, match="no split 'training'"):
        HFHubCorpus(str(data), train_split="training", text_column="story").documents("train")


def test_a_glob_of_local_shards_is_one_train_split_read_in_file_order(tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", DOCS[50:])
    write_jsonl(tmp_path / "part-0.jsonl", DOCS[:50])
    (tmp_path / "notes.md").write_text("not matched by the glob")
    corpus = HFHubCorpus(str(tmp_path / "part-*.jsonl"), val_split=None, max_eval_docs=2)
    assert corpus.max_train_docs is None  # hub corpora are used whole unless capped
    assert corpus.documents("val") == DOCS[:2] and corpus.documents("test") == DOCS[2:4]
    assert corpus.documents("train") == DOCS[4:]
    assert list(corpus.iter_documents("train", skip=90)) == DOCS[94:]  # where a resumed preparation starts
    assert DataConfig(corpus="hf_hub", name="x").max_train_docs is None

    write_parquet(tmp_path / "part-2.parquet", DOCS[:3])
    with pytest.raises(UserError, match=r"data.name: the glob .* must match files of one type"):
        HFHubCorpus(str(tmp_path / "part-*"))
    with pytest.raises(UserError, match="matches no file"):
        HFHubCorpus(str(tmp_path / "nothing-*.jsonl"))
