import re

import pytest

from sdt.data.shakespeare import SHAKESPEARE_TEST_PLAYS, SHAKESPEARE_VAL_PLAYS, ShakespeareCorpus, play_to_text


@pytest.fixture(scope="module")
def corpus() -> ShakespeareCorpus:
    return ShakespeareCorpus()


def test_split_by_play(corpus):
    train, val, test = (corpus.play_names(s) for s in ("train", "val", "test"))
    assert len(train) == 34 and len(val) == 2 and len(test) == 2
    assert val == list(SHAKESPEARE_VAL_PLAYS) and test == list(SHAKESPEARE_TEST_PLAYS)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert set(train) | set(val) | set(test) == set(corpus.files)
    assert len(corpus.documents("train")) == 34


def test_extraction_is_plain_dialogue(corpus):
    macbeth = corpus.documents("val")[0]
    assert macbeth.startswith("First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n")
    assert "\nMACBETH:\n" in macbeth and "\nALL:\nFair is foul, and foul is fair:\n" in macbeth
    # Speech continues past a mid-speech stage direction ("_Exit Sergeant, attended_").
    assert "They smack of honour both. Go get him surgeons.\nWho comes here?\n" in macbeth
    for split in ("train", "val", "test"):
        text = "".join(corpus.documents(split))
        assert text.strip()
        assert "**" not in text and "_" not in text and "\\" not in text
        assert not re.search(r"^#", text, re.MULTILINE)
        assert not re.search(r"^(Exeunt|Exit|Enter [A-Z]+)\b", text, re.MULTILINE)  # dialogue may say "Enter, sir"
        assert "  \n" not in text and "\n\n\n" not in text


def test_markup_edge_cases():
    md = (
        "# Play\n\n## ACT I\n\n### SCENE I. A place.\n\n_Enter A, B, and a very long\nlist of others_\n\n"
        "**A**  \n_\\[Aside]_  \nFirst line,  \nsecond\\-line **loud**.\n\n_Exeunt_\n\n"
        "**ALL**  \n[Within]_  \nWe sing.\n\n"
        "BISHOP\n\n**OF WINCHESTER**  \nPeace!\n"
    )
    assert play_to_text(md) == "A:\nFirst line,\nsecond-line loud.\n\nALL:\nWe sing.\n\nBISHOP OF WINCHESTER:\nPeace!\n"


def test_deterministic_and_no_val_line_in_train(corpus):
    again = ShakespeareCorpus()
    for split in ("train", "val", "test"):
        assert again.documents(split) == corpus.documents(split)
    assert again.fingerprint() == corpus.fingerprint()
    train_lines = {line for doc in corpus.documents("train") for line in doc.splitlines()}
    for split in ("val", "test"):
        long_lines = [line for doc in corpus.documents(split) for line in doc.splitlines() if len(line) >= 40]
        assert len(long_lines) > 1000
        assert not [line for line in long_lines if line in train_lines]
