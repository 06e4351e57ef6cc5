"""`python -m sdt.export`: checkpoints as Hugging Face model directories that our loader and transformers read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sdt.blocks.kv_cache
import sdt.blocks.layers
from sdt.data import Tokenizer
from sdt.errors import UserError
from sdt.export import export, main, parse_args
from sdt.models import ModelConfig, build_model
from sdt.models.pretrained import Pretrained
from sdt.transformers_code import SHIPPED_FILES
from tests.conftest import run_cli
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
    assert ours.keys() == theirs.keys()
    for k in ours:  # uncalibrated quantile grids are NaN: equal where NaN is NaN
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=0, equal_nan=True, msg=k)
    ids = torch.randint(0, 300, (2, 32))
    routing = cfg.inference_routing if cfg.arch != "dense" else "topk"
    with torch.no_grad():
        torch.testing.assert_close(back(ids, routing=routing).logits, model(ids, routing=routing).logits)


def test_the_tokenizer_of_a_routed_export_loads_without_asking_about_its_modeling_code(tmp_path, capsys):
    """config.json of a routed export names modeling code; loading only the tokenizer (model.init_from=<export>,
    data.tokenizer.path=<export>) must neither run it nor stop to ask whether to (transformers prompts on stdout)."""
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="sdt"))
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    capsys.readouterr()
    tokenizer = Tokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("ROMEO: hi")) == "ROMEO: hi"
    assert "custom code" not in capsys.readouterr().out


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


@pytest.mark.slow  # the export CLI in subprocesses: the default suite stays within its time budget
def test_export_cli_and_its_errors(tmp_path, capsys):
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="dense"))
    cmd = ["-m", "sdt.export", f"ckpt_path={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'x'}"]
    proc = run_cli(cmd, tmp_path / "cache", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(cmd[2:3])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: out is required")
    with pytest.raises(UserError, match="unexpected argument 'outdir=x'"):
        parse_args(["ckpt_path=a.ckpt", "outdir=x"])
    with pytest.raises(UserError, match="checkpoint not found"):
        export(str(tmp_path / "nope.ckpt"), str(tmp_path / "y"))
    # an out= that cannot be created (a file where a directory must go): one line, exit 2, no traceback
    (tmp_path / "a_file").write_text("")
    cmd = ["-m", "sdt.export", f"ckpt_path={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'a_file' / 'x'}"]
    proc = run_cli(cmd, tmp_path / "cache", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: out={tmp_path / 'a_file' / 'x'}: cannot write the export: Not a directory"
    ]


ROUTED_EXPORTS = {
    "sdt": {"arch": "sdt", "capacity": 0.5},
    "sdt-full-student-qwen2": {
        "arch": "sdt", "routed_attention": "full", "inference_routing": "student", "qkv_bias": True,
        "tie_embeddings": False, "change_surprise": "kl", "beta_mode": "cosine", "student_norm": True,
    },
    "stt": {"arch": "stt", "capacity": 0.5, "dense_first": 1, "dense_last": 1, "student_input": "x_prev"},
    "mod": {"arch": "mod", "capacity": 0.25},
    "sdt-skip-map": {"arch": "sdt", "skip_map": "linear"},
    "stt-skip-map-rank": {"arch": "stt", "skip_map": "linear", "skip_map_rank": 8, "routed_attention": "full"},
    "mod-skip-map": {"arch": "mod", "capacity": 0.25, "skip_map": "linear"},
}  # fmt: skip


@pytest.mark.parametrize("options", list(ROUTED_EXPORTS.values()), ids=list(ROUTED_EXPORTS))
def test_routed_export_loads_in_transformers_with_our_logits_generation_and_kv_savings(options, tmp_path):
    from transformers import AutoModelForCausalLM

    from sdt.models import ModelCache

    cfg = ModelConfig(**TINY, **options)
    model = write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "sdt" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_sdt.SDTForCausalLM"
    with pytest.raises(ValueError, match="trust_remote_code"):  # never silently a plain Llama running every block
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert hf.config.routing == cfg.inference_routing
    assert type(hf.model.layers[0]).__module__.rpartition(".")[2] == "layers"  # the shipped package file's Block

    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ours = model(ids, routing=cfg.inference_routing)
        theirs = hf(input_ids=ids)
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-5, rtol=0)
    for i, executed in ours.decisions.items():
        assert torch.equal(theirs.decisions[i], executed)
    assert 0 < sum(int(d.sum()) for d in ours.decisions.values()) < sum(d.numel() for d in ours.decisions.values())

    # Greedy generation from a left-padded batch: the same tokens, and a cache holding only executed tokens.
    prompt, mask = ids[:, :12], torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    generated = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
        return_dict_in_generate=True,
    )  # fmt: skip
    cache = ModelCache()
    expected = model.generate(prompt, 10, temperature=0.0, pad_mask=mask.bool(), cache=cache)
    assert torch.equal(generated.sequences, expected)
    entries = generated.cache.num_entries()
    dense_entries = cfg.n_layers * 2 * (12 + 10 - 1)  # every block caches every token it has seen
    assert entries == cache.num_entries() and entries < dense_entries
    assert {type(c).__module__.rpartition(".")[2] for c in generated.cache.layers.values()} == {"kv_cache"}


def test_a_routed_export_ships_the_package_blocks_byte_for_byte(tmp_path):
    """The export runs the package's own backbone files, not a copy that could drift from them."""
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="mod"))
    export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    for module in (sdt.blocks.layers, sdt.blocks.kv_cache):
        package_file = Path(module.__file__)
        assert (tmp_path / "export" / package_file.name).read_bytes() == package_file.read_bytes(), package_file.name
    assert {p.name for p in (tmp_path / "export").glob("*.py")} == {Path(p).name for p in SHIPPED_FILES}


def test_routed_export_loads_where_sdt_is_not_installed(tmp_path):
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="sdt"))
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    for shipped in SHIPPED_FILES:
        code = (tmp_path / "export" / Path(shipped).name).read_text()
        assert "import sdt" not in code and "from sdt" not in code, shipped
    script = (
        "import sys, torch; sys.modules['sdt'] = None\n"  # any `import sdt` now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)\n"
        "print(m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape[1])\n"
    )
    proc = run_cli(
        ["-c", script], tmp_path / "cache", cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "7"
