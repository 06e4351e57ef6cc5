"""Transfer from pretrained Llama / Qwen2 checkpoints (sdt.models.pretrained, docs/algorithms.md section 14)."""

from __future__ import annotations

import json

import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import ModelConfig, build_model
from sdt.models.pretrained import Pretrained, backbone_block_names, resolve_source
from tests.pretrained_helpers import HF_VOCAB, save_hf_model, write_tiny_gguf

pytest.importorskip("transformers")


def load_ours(directory, arch: str = "dense", **options):
    pretrained = Pretrained(str(directory))
    model = build_model(ModelConfig.from_dict(pretrained.model_dict({"arch": arch, **options})))
    pretrained.load_into(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_load_reproduces_transformers_logits_and_greedy_generation(kind, tmp_path):
    hf = save_hf_model(tmp_path, kind)
    ours = load_ours(tmp_path)
    ids = torch.randint(0, HF_VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert expected.std() > 0.1  # random weights large enough that a wrong mapping would show
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    prompt = ids[:1, :8]
    hf_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    our_tokens = ours.generate(prompt, 20, temperature=0.0)
    assert torch.equal(our_tokens, hf_tokens)
    assert len(set(our_tokens[0, 8:].tolist())) > 1  # not a degenerate constant continuation


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_backbone_options_come_from_the_checkpoint_config(kind, tmp_path):
    save_hf_model(tmp_path, kind)
    user = {"arch": "sdt", "d_model": 256, "n_layers": 6, "rope_theta": 10000.0, "capacity": 0.25}
    cfg = ModelConfig.from_dict(Pretrained(str(tmp_path)).model_dict(user))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size) == (64, 4, 4, 2, 96)
    assert cfg.vocab_size == HF_VOCAB and cfg.max_seq_len == 128
    assert cfg.rope_theta == (50000.0 if kind == "qwen2" else 20000.0)
    assert cfg.rms_norm_eps == (1e-6 if kind == "qwen2" else 1e-5)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == (kind == "qwen2")
    assert cfg.arch == "sdt" and cfg.capacity == 0.25 and cfg.init_from == str(tmp_path)  # the user's routing


def test_bin_weights_load_like_safetensors(tmp_path):
    hf = save_hf_model(tmp_path, "llama", safe_serialization=False)
    assert not list(tmp_path.glob("*.safetensors")) and list(tmp_path.glob("*.bin"))
    ids = torch.randint(0, HF_VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_ours(tmp_path)(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_a_gguf_file_loads_like_transformers(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    hf = save_hf_model(tmp_path, "llama")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    pretrained = Pretrained(str(path))
    assert pretrained.source.gguf_file == "tiny.gguf" and pretrained.backbone["rope_theta"] == 20000.0
    assert (pretrained.backbone["n_kv_heads"], pretrained.backbone["tie_embeddings"]) == (2, False)
    ids = torch.randint(0, HF_VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # GGUF stores the norm eps in fp32 (1e-5 -> 9.9999997e-06): agreement to 1e-4, not to the last bit.
        torch.testing.assert_close(load_ours(path)(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_a_gguf_file_with_scaled_rope_frequencies_is_refused_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    import numpy as np

    hf = save_hf_model(tmp_path, "llama")
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    path = write_tiny_gguf(tmp_path / "l3.gguf", hf, {"rope_freqs.weight": np.ones(head_dim // 2, dtype=np.float32)})
    with pytest.raises(UserError, match=r"l3.gguf: the GGUF file scales RoPE frequencies \(a rope_freqs tensor, ") as e:
        Pretrained(str(path))
    assert "\n" not in str(e.value) and "Llama-3-style RoPE scaling" in str(e.value)


def test_sdt_pairs_take_consecutive_layers_and_stt_mod_keep_their_own(tmp_path):
    hf = save_hf_model(tmp_path, "qwen2")
    layers = hf.model.layers
    sdt = load_ours(tmp_path, "sdt")
    for j, pair in enumerate(sdt.layers):
        assert torch.equal(pair.decision.self_attn.q_proj.weight, layers[2 * j].self_attn.q_proj.weight)
        assert torch.equal(pair.dynamic.mlp.down_proj.weight, layers[2 * j + 1].mlp.down_proj.weight)
        assert torch.equal(pair.dynamic.self_attn.k_proj.bias, layers[2 * j + 1].self_attn.k_proj.bias)
    for arch in ("stt", "mod"):
        model = load_ours(tmp_path, arch, dense_first=1, dense_last=1)
        assert backbone_block_names(model) == [f"layers.{i}.block" for i in range(4)]
        for i, layer in enumerate(model.layers):
            assert torch.equal(layer.block.mlp.up_proj.weight, layers[i].mlp.up_proj.weight)
            assert torch.equal(layer.block.input_layernorm.weight, layers[i].input_layernorm.weight)


@pytest.mark.parametrize("sublayer", ["block", "attention", "mlp"])
@pytest.mark.parametrize("arch", ["sdt", "stt"])
def test_transferred_routed_model_reproduces_pretrained_logits_at_capacity_one(arch, sublayer, tmp_path):
    """docs/algorithms.md, section 14: with capacity 1.0 and ste gates, the new modules change nothing at step 0,
    whichever sub-layer is routed."""
    hf = save_hf_model(tmp_path, "llama")
    model = load_ours(tmp_path, arch, capacity=1.0, gate_mode="ste", routed_sublayer=sublayer)
    ids = torch.randint(0, HF_VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        out = model(ids, routing="topk")
    assert all(bool(d.all()) for d in out.decisions.values())  # every token ran every routed block
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)
    # The priors / transition networks predict nothing yet: their output projection starts at zero.
    priors = [m for name, m in model.named_modules() if name.endswith(("prior", "transition"))]
    assert priors and all(float(p.down_proj.weight.detach().abs().sum()) == 0.0 for p in priors)


def test_at_lower_capacity_the_transferred_sdt_model_skips_blocks(tmp_path):
    hf = save_hf_model(tmp_path, "llama")
    model = load_ours(tmp_path, "sdt", capacity=0.5)
    ids = torch.randint(0, HF_VOCAB, (1, 32))
    with torch.no_grad():
        out = model(ids, routing="topk")
        expected = hf(input_ids=ids).logits
    assert all(int(d.sum()) == 16 for d in out.decisions.values())
    assert not torch.allclose(out.logits, expected, atol=1e-3)


def test_mismatched_weights_are_listed_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    weights = load_file(str(path))
    del weights["model.layers.2.mlp.gate_proj.weight"]
    weights["model.layers.2.mlp.extra_proj.weight"] = torch.zeros(3)
    save_file(weights, str(path))
    with pytest.raises(UserError) as e:
        load_ours(tmp_path)
    msg = str(e.value)
    assert "missing [model.layers.2.mlp.gate_proj.weight]" in msg
    assert "unexpected [model.layers.2.mlp.extra_proj.weight]" in msg


def test_wrong_shapes_and_layer_counts_are_errors(tmp_path):
    save_hf_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(UserError, match=r"missing \[model.layers.4.*model.layers.5"):
        load_ours(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(UserError, match=r"shapes differ.*gate_proj.weight \(96, 64\) vs \(128, 64\)"):
        load_ours(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "only silu"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        ({"attention_bias": True}, "attention_bias=true"),
    ],
)
def test_unsupported_architectures_are_rejected(change, message, tmp_path):
    save_hf_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    if "rope_scaling" in change:
        config.pop("rope_parameters", None)  # transformers 5 writes RoPE settings here; older versions do not
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        Pretrained(str(tmp_path))


def test_sources_that_do_not_exist_or_are_not_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="must be a .gguf"):
        resolve_source(str(tmp_path / "weights.safetensors"))
    with pytest.raises(UserError, match="no such file or directory, and not a hub id"):
        resolve_source(str(tmp_path / "missing" / "dir"))


def test_a_hub_id_is_downloaded_then_read_as_a_directory(tmp_path, monkeypatch):
    import huggingface_hub

    hf = save_hf_model(tmp_path, "qwen2")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ours = load_ours("Qwen/Qwen2-tiny")
    assert calls[0][0] == "Qwen/Qwen2-tiny" and "*.safetensors" in calls[0][1] and len(calls) == 1
    ids = torch.randint(0, HF_VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="model.init_from=nobody/no-such-model: could not download it"):
        resolve_source("nobody/no-such-model")
