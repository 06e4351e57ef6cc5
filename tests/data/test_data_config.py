import pytest
from omegaconf import OmegaConf

from sdt.common.errors import UserError
from sdt.data import DataConfig, TokenizerConfig


def test_defaults_and_nested_tokenizer():
    cfg = DataConfig.from_dict({"corpus": "shakespeare", "batch_size": 8, "tokenizer": {"vocab_size": 300}})
    assert cfg.eval_batch_size == 8  # defaults to batch_size
    assert isinstance(cfg.tokenizer, TokenizerConfig) and cfg.tokenizer.vocab_size == 300


def test_accepts_omegaconf():
    d = OmegaConf.create({"corpus": "text_files", "paths": ["a.txt"], "tokenizer": {"kind": "bpe"}})
    cfg = DataConfig.from_dict(d)
    assert cfg.paths == ["a.txt"] and type(cfg.paths) is list


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"corpus": "shakespeare", "seqlen": 4}, r"data\.seqlen.*valid options:.*seq_len"),
        ({"corpus": "wikipedia"}, r"data\.corpus must be one of shakespeare, text_files, hf_hub"),
        ({"seq_len": 1}, r"data\.seq_len must be >= 2, got 1"),
        ({"seq_len": "long"}, r"data\.seq_len must be an integer"),
        ({"batch_size": 0}, r"data\.batch_size must be >= 1, got 0"),
        ({"val_fraction": 0.5}, r"data\.val_fraction must be a number in \[0, 0\.5\)"),
        ({"corpus": "text_files"}, r"data\.paths must list at least one"),
        ({"corpus": "hf_hub"}, r"data\.name is required"),
        ({"tokenizer": {"vocab": 10}}, r"data\.tokenizer\.vocab.*valid options:.*vocab_size"),
        ({"tokenizer": {"vocab_size": 100}}, r"data\.tokenizer\.vocab_size must be >= 257"),
        ({"tokenizer": {"kind": "pretrained"}}, r"data\.tokenizer\.path is required"),
        ({"tokenizer": {"kind": "wordpiece"}}, r"data\.tokenizer\.kind must be one of bpe, pretrained"),
    ],
)
def test_invalid_configs_name_the_key(d, match):
    with pytest.raises(UserError, match=match):
        DataConfig.from_dict(d)
