"""`python -m sdt.export`: checkpoints as Hugging Face model directories that our loader and transformers read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sdt.errors import UserError
from sdt.export import export, main, parse_args
from sdt.models import ModelConfig, build_model
from sdt.models.pretrained import Pretrained
from tests.conftest import ROOT, cli_env
from tests.pretrained_helpers import write_checkpoint

pytest.importorskip("transformers")

TINY = {"vocab_size": 320, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}


@pytest.mark.parametrize(
    "options",
    [
        {"arch": "dense"},
        {"arch": "dense", "qkv_bias": True, "tie_embeddings": False},
        {"arch": "sdt", "capacity": 0.5},
        {"arch": "stt", "capacity": 0.5, "dense_first": 1, "dense_last": 1},
        {"arch": "mod", "capacity": 0.25},
    ],
    ids=["dense", "dense-qwen2", "sdt", "stt", "mod"],
)
def test_export_round_trips_every_model_type(options, tmp_path):
    cfg = ModelConfig(**TINY, **options)
    model = write_checkpoint(tmp_path / "last.ckpt", cfg)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))

    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    pretrained = Pretrained(out)
    back = build_model(ModelConfig.from_dict(pretrained.own_model_dict())).eval()
    pretrained.load_into(back)
    assert back.config.to_dict() == {**cfg.to_dict(), "init_from": out}
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, 300, (2, 32))
    routing = cfg.inference_routing if cfg.arch != "dense" else "topk"
    with torch.no_grad():
        torch.testing.assert_close(back(ids, routing=routing).logits, model(ids, routing=routing).logits)


def test_routing_tensors_of_an_export_are_skipped_for_another_architecture(tmp_path, caplog):
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="sdt"))
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    pretrained = Pretrained(out)
    dense = build_model(ModelConfig.from_dict(pretrained.model_dict({"arch": "dense"})))
    assert pretrained.load_into(dense) == []
    assert "only the backbone is loaded" in caplog.text


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_dense_export_is_a_plain_transformers_model(qkv_bias, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(**TINY, arch="dense", qkv_bias=qkv_bias, rope_theta=30000.0, rms_norm_eps=1e-6)
    model = write_checkpoint(tmp_path / "last.ckpt", cfg)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("To be, or not to be")) == "To be, or not to be"
    assert json.loads((tmp_path / "export" / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_export_cli_and_its_errors(tmp_path, capsys):
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="dense"))
    env = cli_env(tmp_path / "cache")
    cmd = [sys.executable, "-m", "sdt.export", f"ckpt_path={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'x'}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(cmd[3:4])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: out is required")
    with pytest.raises(UserError, match="unexpected argument 'outdir=x'"):
        parse_args(["ckpt_path=a.ckpt", "outdir=x"])
    with pytest.raises(UserError, match="checkpoint not found"):
        export(str(tmp_path / "nope.ckpt"), str(tmp_path / "y"))
