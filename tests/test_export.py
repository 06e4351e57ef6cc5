"""`python -m sdt.export`: checkpoints as Hugging Face model directories that our loader and transformers read."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdt.common.errors import UserError
from sdt.data import Tokenizer
from sdt.export import export, main, parse_args
from sdt.models import ModelConfig, build_model
from sdt.models.pretrained import Pretrained
from tests.conftest import ROOT, cli_env, run_cli, tiny_model_fields
from tests.pretrained_helpers import write_checkpoint

pytest.importorskip("transformers")

TASKS_DIR = ROOT / "sdt" / "harness_tasks"
TINY = tiny_model_fields(vocab_size=320, n_layers=4)  # the tokenizer's vocabulary; room for dense first/last layers


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


def test_a_routed_export_of_the_earlier_weight_layout_still_reads_back(tmp_path):
    """Routed exports written before the package's own weight names (backbone under Hugging Face names, routing
    tensors under `sdt.` + ours, no `sdt_weight_names`) read back through model.init_from as the model they are."""
    from safetensors.torch import save_file

    from sdt.models.pretrained import hf_config, hf_name_map, routing_state_names

    cfg = ModelConfig(**TINY, arch="stt", dense_first=1, dense_last=1, skip_map="linear")
    model = write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    state = model.state_dict()
    old = {hf: state[ours] for ours, hf in hf_name_map(model).items()}
    old |= {f"sdt.{name}": state[name] for name in routing_state_names(model)}
    out = tmp_path / "old_export"
    out.mkdir()
    save_file({k: v.contiguous().clone() for k, v in old.items()}, str(out / "model.safetensors"))
    config = hf_config(cfg) | {"model_type": "sdt", "architectures": ["SDTForCausalLM"]}
    (out / "config.json").write_text(json.dumps(config))
    pretrained = Pretrained(str(out))
    back = build_model(ModelConfig.from_dict(pretrained.own_model_dict())).eval()
    assert len(pretrained.load_into(back)) == len(routing_state_names(model))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


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
    # the conversion recipe's options (conf/model/recipe/convert.yaml)
    "sdt-first-executed-dense-ends": {
        "arch": "sdt", "always_execute_first": 1, "dense_first": 1, "dense_last": 1, "n_layers": 6, "student_norm": True,
        "skip_map": "linear",
    },
    "sdt-full-student-qwen2": {
        "arch": "sdt", "routed_attention": "full", "inference_routing": "student", "qkv_bias": True,
        "tie_embeddings": False, "change_surprise": "kl", "beta_mode": "cosine", "student_norm": True,
    },
    "stt": {"arch": "stt", "capacity": 0.5, "dense_first": 1, "dense_last": 1, "student_input": "x_prev"},
    "mod": {"arch": "mod", "capacity": 0.25},
    "sdt-skip-map": {"arch": "sdt", "skip_map": "linear"},
    "stt-skip-map-full-attention": {"arch": "stt", "skip_map": "linear", "routed_attention": "full"},
    "mod-skip-map": {"arch": "mod", "capacity": 0.25, "skip_map": "linear"},
}  # fmt: skip


# The default suite runs two; the rest, and every architecture in every causal mode, run with the slow suite
# (tests/test_export_code.py).
FAST_ROUTED_EXPORTS = ("sdt", "sdt-first-executed-dense-ends")


@pytest.mark.parametrize(
    "options",
    [pytest.param(v, marks=() if k in FAST_ROUTED_EXPORTS else pytest.mark.slow) for k, v in ROUTED_EXPORTS.items()],
    ids=list(ROUTED_EXPORTS),
)
def test_routed_export_loads_in_transformers_with_our_logits_generation_and_kv_savings(options, tmp_path):
    from transformers import AutoModelForCausalLM

    from sdt.models import ModelCache

    cfg = ModelConfig(**{**TINY, **options})
    model = write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "sdt" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_sdt.SDTForCausalLM"
    with pytest.raises(ValueError, match="trust_remote_code"):  # never silently a plain Llama running every block
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert hf.config.routing == cfg.inference_routing
    # the package's own LanguageModel and layers, loaded from the files shipped in the export
    assert type(hf.model).__name__ == "LanguageModel" and type(hf.model).__module__.endswith(".transformer")
    assert {type(layer).__name__ for layer in hf.model.layers} == {type(layer).__name__ for layer in model.layers}

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
    # generation_config.json never generates the vocabulary's padded tail, as sdt.generate does with valid_vocab
    valid_vocab = torch.load(tmp_path / "last.ckpt", weights_only=False)["sdt"]["tokenizer_vocab_size"]
    expected = model.generate(prompt, 10, temperature=0.0, pad_mask=mask.bool(), cache=cache, valid_vocab=valid_vocab)
    assert torch.equal(generated.sequences, expected)
    entries = generated.cache.num_entries()
    dense_entries = cfg.n_layers * 2 * (12 + 10 - 1)  # every block caches every token it has seen
    assert entries == cache.num_entries() and entries < dense_entries
    assert {type(c).__module__.rpartition(".")[2] for c in generated.cache.layers.values()} == {"kv_cache"}


@pytest.mark.slow  # a fresh interpreter that imports transformers and torch (~7 s)
def test_routed_export_loads_where_sdt_is_not_installed(tmp_path):
    """In an interpreter where `import sdt` fails, from a directory that is not the repository, transformers loads
    the export from its own files (copied to its module cache) and generates."""
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="sdt", always_execute_first=1))
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    script = (
        "import sys, torch; sys.modules['sdt'] = None\n"  # any `import sdt` now fails
        "try:\n    import sdt\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('sdt imported')\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)\n"
        "print(type(m.model).__module__)\n"
        "print(m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape[1])\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    proc = run_cli(["-c", script], tmp_path / "cache", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, length = proc.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.") and module.endswith(".transformer") and length == "7"
    assert any((tmp_path / "hf_modules").rglob("routed_layer.py"))  # the package's routed forward, as shipped


def write_eval_json(path: Path) -> Path:
    """An eval.json with the keys evaluate.py writes that a model card reads (figures chosen to be recognisable)."""
    result = {
        "arch": "sdt", "corpus": "shakespeare", "seq_len": 32, "routing_mode": "threshold", "global_step": 7,
        "perplexity": 12.3456, "bits_per_byte": 1.2345,
        "splits": {"val": {"perplexity": 11.1111, "bits_per_byte": 1.111}, "test": {"perplexity": 12.3456,
                   "bits_per_byte": 1.2345}},
        "perplexity_by_routing": {"threshold": {"label": "causal threshold", "val": 11.1111, "test": 12.3456},
                                  "topk": {"label": "Top-K oracle", "val": 10.5, "test": 11.75}},
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return path


@pytest.mark.parametrize("arch", ["dense", "sdt"])
def test_export_carries_a_model_card_and_a_generation_config(arch, tmp_path):
    from transformers import GenerationConfig

    from sdt.generate import DEFAULTS

    cfg = ModelConfig(**TINY, arch=arch, capacity=0.5)
    write_checkpoint(tmp_path / "last.ckpt", cfg)
    eval_json = write_eval_json(tmp_path / "eval.json")
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"), str(eval_json))

    generation = GenerationConfig.from_pretrained(out)  # transformers reads and validates it
    eos = json.loads((tmp_path / "export" / "config.json").read_text())["eos_token_id"]
    assert generation.eos_token_id == eos and generation.pad_token_id == eos
    assert generation.max_length == TINY["max_seq_len"]
    valid_vocab = torch.load(tmp_path / "last.ckpt", weights_only=False)["sdt"]["tokenizer_vocab_size"]
    assert valid_vocab < TINY["vocab_size"] and generation.suppress_tokens == list(range(valid_vocab, 320))
    assert generation.temperature == DEFAULTS["temperature"] and generation.top_k == DEFAULTS["top_k"]

    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")  # Hugging Face model-card metadata
    assert f"| architecture | `{arch}` |" in card and "| layers | 4 |" in card and "| d_model | 32 |" in card
    # write_checkpoint records step 7 and no data config: steps known, tokens not.
    assert "| optimizer steps | 7 |" in card and "| training tokens | n/a |" in card
    assert "| test | 12.35 | 1.234 |" in card and "| val | 11.11 | 1.111 |" in card  # the eval.json's figures
    trust = ", trust_remote_code=True" if arch != "dense" else ""
    assert f'AutoModelForCausalLM.from_pretrained("{out}"{trust})' in card
    assert f"lm_eval --model hf --model_args pretrained={out}{trust.replace(', ', ',')} " in card
    if arch == "dense":
        assert "plain Llama checkpoint" in card and "capacity" not in card
    else:
        assert "Subjective Depth Transformer" in card and "| capacity | 0.5 |" in card
        assert "Top-K oracle: val 10.50, test 11.75" in card


def test_model_card_counts_training_tokens_of_a_real_run(trained_run, tmp_path):
    out = export(str(trained_run / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    card = (Path(out) / "README.md").read_text()
    # The conftest run: 6 steps of 4 sequences of 32 tokens on one rank, on data=text_files.
    assert "| optimizer steps | 6 |" in card and f"| training tokens | {6 * 4 * 32} |" in card
    assert "| corpus | text_files |" in card and "| batch size per rank x ranks | 4 x 1 |" in card
    assert "Not evaluated with this export" in card


def test_a_bad_eval_json_is_refused_before_anything_is_written(tmp_path):
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, arch="dense"))
    (tmp_path / "other.json").write_text('{"loss": 1.0}')
    for bad, message in (("missing.json", "file not found"), ("other.json", "not an eval.json of evaluate.py")):
        with pytest.raises(UserError, match=f"eval_json=.*{bad}: {message}"):
            export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"), str(tmp_path / bad))
    assert not (tmp_path / "export").exists()
    assert parse_args(["ckpt_path=a.ckpt", "out=x", "eval_json=e.json"])["eval_json"] == "e.json"


@pytest.mark.slow  # lm-eval's start-up and task preparation: tens of seconds per run on two cores
@pytest.mark.parametrize("arch", ["dense", "sdt"])
def test_lm_eval_scores_an_export_with_its_own_hf_model(arch, tmp_path):
    """docs/pretrained.md's `lm_eval --model hf --model_args pretrained=<export>,trust_remote_code=True`, run as a
    user runs it: every multiple-choice log-likelihood lm-eval's HF model computes on the export equals the sdt model's on the
    checkpoint it came from (sdt.harness.SDTLM, the same causal routing)."""
    from lm_eval.api.instance import Instance

    from sdt.harness import SDTLM

    pytest.importorskip("lm_eval")
    cfg = ModelConfig(**TINY, arch=arch, capacity=0.5)
    write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    lm_eval = Path(sys.executable).parent / "lm_eval"
    launcher = [str(lm_eval)] if lm_eval.exists() else [sys.executable, "-m", "lm_eval"]
    model_args = f"pretrained={out}" + (",trust_remote_code=True" if arch != "dense" else "")
    cmd = [
        *launcher, "--model", "hf", "--model_args", model_args, "--device", "cpu", "--batch_size", "4",
        "--tasks", "shakespeare_next_line,tempest_perplexity", "--include_path", str(TASKS_DIR), "--limit", "3",
        "--output_path", str(tmp_path / "results"), "--log_samples",
    ]  # fmt: skip
    env = cli_env(tmp_path / "cache") | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert math.isfinite(results["tempest_perplexity"]["bits_per_byte,none"])

    (samples_file,) = (tmp_path / "results").rglob("samples_shakespeare_next_line_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    pairs = [(a["arg_0"], a["arg_1"]) for s in samples for a in s["arguments"].values()]
    theirs = [float(r[0][0]) for s in samples for r in s["resps"]]
    ours_lm = SDTLM(ckpt_path=str(tmp_path / "last.ckpt"), device="cpu", batch_size=4)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]
    ours = [ll for ll, _ in ours_lm.loglikelihood(requests)]
    assert len(pairs) == 12  # 3 items x 4 choices
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), atol=1e-3, rtol=0)
