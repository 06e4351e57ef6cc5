"""The code routed exports ship (sdt/transformers_code/): the package's own modules, rewritten only in their `sdt`
import lines; every model the package can train, exported, loads in transformers with the package's logits and
greedy tokens; and what an export would not reproduce is refused before a directory is written."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sdt.export
from sdt.common.errors import UserError
from sdt.export import check_reproducible, export
from sdt.models import LanguageModel, ModelCache, ModelConfig, build_layers, build_model
from sdt.transformers_code import ShippingError, shipped_modules
from sdt.transformers_code.shipping import _imports
from tests.conftest import CONF_DIR, compose_cfg, run_cli, tiny_model_fields
from tests.pretrained_helpers import write_checkpoint

pytest.importorskip("transformers")

# The tests' tiny model with the tokenizer's vocabulary; each test sets its own depth.
TINY = {k: v for k, v in tiny_model_fields(vocab_size=320).items() if k != "n_layers"}
PACKAGE_IMPORT = re.compile(r"^\s*from sdt(\.\w+)* import ")


# --- what ships


def test_shipped_files_are_the_package_files_apart_from_their_sdt_import_lines():
    modules = shipped_modules()
    by_flat = {m.flat_name: m for m in modules}
    assert len(by_flat) == len(modules)  # copied flat: no two share a name
    # the wrapper and the package's model assembly, routed forward, hooks, routing and blocks all ship
    for needed in ("modeling_sdt", "models", "transformer", "routed_layer", "sdt", "stt", "mod", "execution", "layers"):
        assert needed in by_flat, needed
    for m in modules:
        package_lines = Path(m.path).read_text().splitlines()
        shipped_lines = m.source.splitlines()
        assert len(shipped_lines) == len(package_lines), m.module
        for ours, theirs in zip(package_lines, shipped_lines, strict=True):
            if ours != theirs:  # only `from sdt.<...>.<name> import` -> `from .<name> import`, same indentation
                assert PACKAGE_IMPORT.match(ours), f"{m.module}: {ours!r} changed"
                module = ours.split()[1]  # sdt.<...>.<name>
                assert theirs == ours.replace(f"from {module} ", f"from .{module.rpartition('.')[2]} ", 1), theirs


def test_shipped_files_import_only_torch_transformers_the_standard_library_and_each_other():
    modules = shipped_modules()
    names = {m.flat_name for m in modules}
    bad = []
    for m in modules:
        allowed = (
            set(sys.stdlib_module_names) | {"torch"} | ({"transformers"} if m.flat_name == "modeling_sdt" else set())
        )
        for node in ast.walk(ast.parse(m.source)):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or node.module not in names:
                    bad.append(f"{m.flat_name}:{node.lineno} imports {'.' * node.level}{node.module}")
            elif isinstance(node, ast.Import | ast.ImportFrom):
                found = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{m.flat_name}:{node.lineno} imports {n}" for n in found if n.split(".")[0] not in allowed]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import omegaconf\n", "imports omegaconf, which an export does not ship"),
        ("def f():\n    from lightning import Trainer\n", "imports lightning"),
        ("import sdt.common.errors\n", "`import sdt.common.errors`"),
        ("from sdt.routing import topk\n", r"imports module\(s\) \['topk'\] by name"),
        ("from ..routing.topk import topk_indices\n", "relative import beyond a sibling"),
        ("from sdt.nowhere import x\n", "sdt.nowhere, not a module of the package"),
    ],
)
def test_a_module_that_cannot_load_flat_is_refused_naming_it(code, message, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    with pytest.raises(ShippingError, match=message):
        _imports("sdt.models.probe", str(probe), ast.parse(code), wrapper=False)


# --- every trainable model exports and loads


def assert_export_reproduces(cfg: ModelConfig, tmp_path: Path) -> None:
    """Export a calibrated tiny `cfg` through the checkpoint path; transformers' model computes the package's logits
    (within 1e-5) and greedy tokens from a left-padded batch."""
    from transformers import AutoModelForCausalLM

    model = write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    routed = cfg.arch != "dense"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=routed, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    routing = cfg.inference_routing if routed else "topk"
    with torch.no_grad():
        ours, theirs = model(ids, routing=routing), hf(input_ids=ids, labels=ids)
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-5, rtol=0)
    # transformers' label convention (shifted inside): the next-token loss of the package's logits
    expected_loss = torch.nn.functional.cross_entropy(ours.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(theirs.loss, expected_loss, atol=1e-5, rtol=0)
    if routed:  # the routed blocks skip some tokens and run others, as the package's do
        executed = torch.stack([d for d in ours.decisions.values()])
        assert 0 < int(executed.sum()) < executed.numel()
        assert all(torch.equal(theirs.decisions[i], d) for i, d in ours.decisions.items())
    prompt, mask = ids[:, :10], torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    generated = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    valid_vocab = torch.load(tmp_path / "last.ckpt", weights_only=False)["sdt"]["tokenizer_vocab_size"]
    expected = model.generate(
        prompt, 6, temperature=0.0, pad_mask=mask.bool(), cache=ModelCache(), routing=routing, valid_vocab=valid_vocab
    )
    assert torch.equal(generated, expected)


def architecture_cases() -> dict[str, dict]:
    """Each routed architecture in each causal mode it decodes with, with the options the package trains."""
    conversion = {"always_execute_first": 1, "dense_first": 1, "dense_last": 1, "student_norm": True}
    cases = {}
    for arch, modes in (("sdt", ("threshold", "student", "budget")), ("stt", ("student", "budget")),
                        ("mod", ("threshold", "student", "budget"))):  # fmt: skip
        for i, mode in enumerate(modes):
            cases[f"{arch}-{mode}"] = {
                "arch": arch, "inference_routing": mode, "n_layers": 6, **conversion, "skip_map": "linear",
                "routed_attention": ("selected", "full")[i % 2],
            }  # fmt: skip
        cases[f"{arch}-plain"] = {"arch": arch, "n_layers": 4}
    cases["sdt-soft-kl-cosine-ce"] = {
        "arch": "sdt", "n_layers": 4, "gate_mode": "soft", "change_surprise": "kl", "beta_mode": "cosine",
        "gate_rule": "ce", "learn_o_ce": False, "learn_m_cu": False,
    }  # fmt: skip
    cases["stt-x-prev"] = {"arch": "stt", "n_layers": 4, "student_input": "x_prev"}
    for gate in ("raw", "ste"):
        cases[f"mod-{gate}-gate"] = {"arch": "mod", "n_layers": 4, "mod_gate": gate, "always_execute_first": 2}
    # sub-layer routing: attention alone (no K/V for skipped tokens), the MLP alone (every token's K/V)
    for arch, sublayer in (("sdt", "attention"), ("stt", "attention"), ("mod", "mlp"), ("sdt", "mlp")):
        cases[f"{arch}-{sublayer}-sublayer"] = {
            "arch": arch, "n_layers": 6, "routed_sublayer": sublayer, **conversion, "skip_map": "linear",
        }  # fmt: skip
    return cases


ARCHITECTURES = architecture_cases()


@pytest.mark.slow
@pytest.mark.parametrize("options", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_every_routed_architecture_and_causal_mode_exports_and_loads(options, tmp_path):
    assert_export_reproduces(ModelConfig(**TINY, **options), tmp_path)


def experiments() -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))


def experiment_model(name: str, tmp_path: Path) -> ModelConfig:
    """The experiment's model config at tiny dimensions: its routing options, a tiny backbone, no pretrained start."""
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path, tmp_path)
    d = OmegaConf.to_container(cfg.model, resolve=True)
    d.update(TINY, head_dim=None, intermediate_size=64, init_from=None, init_layers=None, compile=False)
    d.update(n_layers=d.get("dense_first", 0) + d.get("dense_last", 0) + 4)  # two SDT pairs, or four layers
    d.update(skip_map_fit_blocks=0)  # fitted at conversion, from the pretrained model
    return ModelConfig.from_dict(d)


@pytest.mark.slow
@pytest.mark.parametrize("name", experiments())
def test_every_experiment_exports_and_loads(name, tmp_path):
    assert_export_reproduces(experiment_model(name, tmp_path), tmp_path)


def test_the_conversion_recipe_exports_and_loads(tmp_path):
    """The conversion recipe (conf/model/recipe/convert.yaml, experiment=smollm2_sdt) sets always_execute_first=1:
    its export once failed to load."""
    cfg = experiment_model("smollm2_sdt", tmp_path)
    assert cfg.always_execute_first == 1 and cfg.arch != "dense"
    assert_export_reproduces(cfg, tmp_path)
    # another causal mode at load time runs the package's forward in that mode; a non-causal one is refused
    from transformers import AutoModelForCausalLM

    model = build_model(cfg)
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "last.ckpt")["state_dict"].items()}
    )
    budget = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True, routing="budget")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(budget(input_ids=ids).logits, model(ids, routing="budget").logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="routing='topk': an export runs a causal mode"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True, routing="topk")


@pytest.mark.slow
def test_a_checkpoint_from_before_the_capacity_dial_exports_and_loads(tmp_path):
    """Checkpoints written before quantile grids existed load with uncalibrated (NaN) grids; their export carries
    those and computes the same logits in transformers."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(**TINY, n_layers=4, arch="mod", inference_routing="budget")
    model = write_checkpoint(tmp_path / "last.ckpt", cfg)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(".quantiles")}
    torch.save(ckpt, tmp_path / "old.ckpt")
    out = export(str(tmp_path / "old.ckpt"), str(tmp_path / "export"))
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids, routing="budget").logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_loaded_export_saved_again_loads_in_transformers_and_in_sdt(tmp_path):
    """save_pretrained (what push_to_hub writes) of a loaded routed export is an export again: transformers loads it
    with its shipped code, and model.init_from reads it back."""
    from transformers import AutoModelForCausalLM

    from sdt.models.pretrained import Pretrained

    cfg = ModelConfig(**TINY, n_layers=4, arch="sdt", always_execute_first=1, skip_map="linear")
    model = write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "export").glob("*.py")} <= {p.name for p in (tmp_path / "saved").glob("*.py")}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True).eval()
    pretrained = Pretrained(str(tmp_path / "saved"))
    back = build_model(ModelConfig.from_dict(pretrained.own_model_dict())).eval()
    pretrained.load_into(back)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids, routing="threshold").logits
        torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids, routing="threshold").logits, expected, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "mode"), [("sdt", "threshold"), ("stt", "budget"), ("mod", "budget")])
def test_beam_search_on_the_package_cache_equals_beam_search_without_a_cache(arch, mode, tmp_path):
    """transformers reorders the package's cache between beam steps (rows of every KV cache, the surprise history,
    the budget counts): the beams are those of recomputing every step without a cache."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(**TINY, n_layers=4, arch=arch, inference_routing=mode, always_execute_first=1)
    write_checkpoint(tmp_path / "last.ckpt", cfg, calibrate=True)
    hf = AutoModelForCausalLM.from_pretrained(export(str(tmp_path / "last.ckpt"), str(tmp_path / "export")),
                                              trust_remote_code=True).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # without the reordering, cached beams differ in most of these prompts
        ids, mask = torch.randint(0, 300, (2, 10), generator=g), torch.ones(2, 10, dtype=torch.long)
        mask[0, :3] = 0
        kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
        assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


# --- what an export would not reproduce


def test_a_model_whose_tensors_are_not_what_its_config_builds_is_refused():
    cfg = ModelConfig(**TINY, n_layers=4, arch="mod")
    other = LanguageModel(cfg, build_layers(ModelConfig(**TINY, n_layers=4, arch="sdt", inference_routing="student")))
    with pytest.raises(UserError, match=r"model's tensors are not those model.arch=mod builds .*layers\.0\."):
        check_reproducible(other)


def test_a_config_value_that_does_not_survive_config_json_is_refused():
    model = build_model(ModelConfig(**TINY, n_layers=4, arch="sdt"))
    model.config.beta_end = {1, 2}  # a set: config.json cannot carry it
    with pytest.raises(UserError, match=r"model.beta_end=\{1, 2\} does not survive config.json"):
        check_reproducible(model)


def test_code_that_cannot_ship_is_refused_as_one_error(monkeypatch):
    def broken() -> dict[str, str]:
        raise ShippingError("sdt/models/config.py:9 imports omegaconf, which an export does not ship")

    monkeypatch.setattr(sdt.export, "shipped_sources", broken)
    with pytest.raises(UserError, match="code cannot ship with the export: sdt/models/config.py:9 imports omegaconf"):
        check_reproducible(build_model(ModelConfig(**TINY, n_layers=4, arch="mod")))


@pytest.mark.slow  # the export entry point in a subprocess
def test_the_export_command_refuses_in_one_line_and_writes_nothing(tmp_path):
    write_checkpoint(tmp_path / "last.ckpt", ModelConfig(**TINY, n_layers=4, arch="sdt"))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # a checkpoint whose model the export cannot rebuild: the sdt pairs' tensors under an MoD config
    mod = build_model(ModelConfig(**TINY, n_layers=4, arch="mod"))
    ckpt["state_dict"] = {f"model.{k}": v for k, v in mod.state_dict().items()}
    torch.save(ckpt, tmp_path / "mismatch.ckpt")
    cmd = ["-m", "sdt.export", f"ckpt_path={tmp_path / 'mismatch.ckpt'}", f"out={tmp_path / 'x'}"]
    proc = run_cli(cmd, tmp_path / "cache", timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: checkpoint weights do not match the model")
    assert not (tmp_path / "x").exists()
    # a valid checkpoint exports, and its config.json names the package's weight layout
    cmd = ["-m", "sdt.export", f"ckpt_path={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'y'}"]
    proc = run_cli(cmd, tmp_path / "cache", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "y" / "config.json").read_text())["sdt_weight_names"] == "package"
