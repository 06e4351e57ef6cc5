"""Static layer pruning (sdt/models/pruning.py, `model.init_layers`): the kept layers load renumbered and compute what
the full model computes along the same layer path; the layers that change their input least go first."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sdt.common.errors import UserError
from sdt.models import ModelConfig, build_model
from sdt.models.pretrained import SDT_CONFIG_KEY, Pretrained, export_state_dict, hf_config
from sdt.models.pruning import layer_similarities, layers_to_keep
from tests.models.conftest import random_ids, tiny_model
from tests.pretrained_helpers import HF_VOCAB, save_hf_model


def load(directory, **options):
    pretrained = Pretrained(str(directory))
    model = build_model(ModelConfig.from_dict(pretrained.model_dict({"arch": "dense", **options})))
    pretrained.load_into(model)
    return model.eval()


def test_kept_layers_load_renumbered_and_match_the_full_model_on_that_layer_path(tmp_path):
    save_hf_model(tmp_path, "qwen2")
    full, pruned = load(tmp_path), load(tmp_path, init_layers=[0, 2, 3])
    assert pruned.config.n_layers == 3 and pruned.config.init_layers == [0, 2, 3]
    ids = torch.randint(0, HF_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(ids, layer_path=[0, 2, 3]).logits
        assert not torch.allclose(expected, full(ids).logits, atol=1e-3)  # dropping layer 1 changes the function
        torch.testing.assert_close(pruned(ids).logits, expected, atol=1e-5, rtol=0)


def test_init_layers_is_validated_naming_the_key(tmp_path):
    save_hf_model(tmp_path, "llama")
    with pytest.raises(UserError, match="model.init_layers.*beyond the 4"):
        load(tmp_path, init_layers=[0, 4])
    for bad in ([], [2, 1], [0, 0], [-1, 2], ["a"]):
        with pytest.raises(UserError, match="model.init_layers"):
            ModelConfig(init_from=str(tmp_path), init_layers=bad)
    with pytest.raises(UserError, match="model.init_layers.*model.init_from"):
        ModelConfig(init_layers=[0, 1])


def test_the_layer_that_leaves_its_input_unchanged_is_dropped_first():
    model = tiny_model("dense", n_layers=4).eval()
    with torch.no_grad():  # layer 2 adds nothing: its attention and MLP outputs are zero
        model.layers[2].block.self_attn.o_proj.weight.zero_()
        model.layers[2].block.mlp.down_proj.weight.zero_()
    similarities = layer_similarities(model, [random_ids(2, 16), random_ids(1, 16, seed=2)])
    assert len(similarities) == 4 and similarities[2] == pytest.approx(1.0)
    assert all(s < 0.999 for i, s in enumerate(similarities) if i != 2)
    assert layers_to_keep(similarities, 3) == [0, 1, 3]
    order = sorted(range(4), key=lambda i: similarities[i])
    assert layers_to_keep(similarities, 2) == sorted(order[:2])
    with pytest.raises(ValueError, match="n_keep"):
        layers_to_keep(similarities, 0)


def test_a_pruned_model_exports_as_its_own_layers(tmp_path):
    save_hf_model(tmp_path / "hf", "llama")
    pruned = load(tmp_path / "hf", init_layers=[1, 3])
    config = hf_config(pruned.config)
    assert config["num_hidden_layers"] == 2 and config[SDT_CONFIG_KEY]["init_layers"] is None
    # Loading the export back must not select layers a second time.
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    save_file(export_state_dict(pruned), str(out / "model.safetensors"))
    again = Pretrained(str(out))
    reloaded = build_model(ModelConfig.from_dict(again.own_model_dict()))
    again.load_into(reloaded)
    ids = random_ids(1, 12, vocab=HF_VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, pruned(ids).logits, atol=1e-6, rtol=0)
