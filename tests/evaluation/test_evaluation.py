"""evaluate.py on a trained checkpoint: eval.json contents, consistency with training, other corpora."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdt.cli.dispatch import evaluate
from sdt.data.datamodules import build_datamodule
from sdt.evaluation.loading import load_model
from sdt.models import ModelConfig
from sdt.models.compute import compute_report
from sdt.training.checkpoint import load_checkpoint
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data, tiny_model_overrides


@pytest.fixture(scope="module")
def eval_result(trained_run, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("eval", [f"ckpt_path={ckpt}", "samples.max_new_tokens=12"], out, cache_dir)
    result = evaluate(cfg)
    return out, result


def test_eval_json_has_the_contract_keys(eval_result):
    out, result = eval_result
    data = json.loads((out / "eval.json").read_text())
    for key in ("perplexity", "bits_per_byte", "tokens_per_second"):
        assert key in data and data[key] > 0
    # The parameters of the checkpoint's model, counted here; the tied embedding matrix is (vocab, d_model).
    model = load_model(load_checkpoint(data["checkpoint"]), torch.device("cpu"))
    assert data["num_parameters"] == sum(p.numel() for p in model.parameters())
    vocab, d = model.config.vocab_size, model.config.d_model
    assert data["num_parameters_without_embeddings"] == data["num_parameters"] - vocab * d
    assert data == json.loads(json.dumps(result))
    assert set(data["splits"]) == {"val", "test"}
    assert len(data["samples"]) == 3 and all(isinstance(s["completion"], str) for s in data["samples"])


def test_eval_perplexity_and_bits_per_byte_are_consistent(eval_result, corpus_files, cache_dir, tmp_path):
    _, result = eval_result
    test = result["splits"]["test"]
    assert result["perplexity"] == pytest.approx(math.exp(test["nll"]))
    assert 1 < result["perplexity"] < 320  # a trained model beats a uniform guess over the vocabulary
    # Bits per byte from the loss (nats per token), the test split's token count and its byte count (its documents
    # in UTF-8, one separator byte each), counted here from the same data the run was trained on.
    cfg = compose_cfg("train", [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)], tmp_path, cache_dir)
    _, datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    datamodule.setup()
    stats = datamodule.split_stats["test"]
    assert stats["num_tokens"] == len(datamodule.token_stream("test"))
    assert stats["num_tokens"] < stats["num_bytes"] < 20 * stats["num_tokens"]  # BPE tokens span a few bytes
    expected = test["nll"] / math.log(2) * stats["num_tokens"] / stats["num_bytes"]
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-9)
    assert test["bits_per_byte"] == result["bits_per_byte"]


def test_eval_val_loss_matches_the_training_validation(trained_run, cache_dir, tmp_path):
    # Same checkpoint, same 2 validation batches as training used: the same loss. Catches a shift or mask mismatch.
    with open(trained_run / "csv" / "metrics.csv") as f:
        train_val = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]][-1]
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(
        "eval", [f"ckpt_path={ckpt}", "max_batches=2", "splits=[val]", "samples.prompts=[]"], tmp_path, cache_dir
    )
    result = evaluate(cfg)
    assert result["splits"]["val"]["nll"] == pytest.approx(train_val, rel=1e-5)


def test_evaluate_on_another_corpus(trained_run, eval_result, cache_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    overrides = [
        f"ckpt_path={ckpt}",
        "data=text_files",
        f"data.paths=[{other}]",
        "data.seq_len=32",
        "samples.prompts=[]",
    ]
    result = evaluate(compose_cfg("eval", overrides, tmp_path / "ev", cache_dir))
    assert result["corpus"] == "text_files"
    assert result["splits"]["test"]["tokens"] > 0 and math.isfinite(result["perplexity"])
    # Scored on the other file, not on the corpus stored with the checkpoint (text_files too, so `corpus` alone
    # cannot tell): the same model on the same split gives another token count and loss.
    own = eval_result[1]["splits"]["test"]
    assert result["splits"]["test"]["tokens"] != own["tokens"] and result["splits"]["test"]["nll"] != own["nll"]


@pytest.fixture(scope="module", params=["sdt", "stt", "mod"])
def routed_eval(request, tmp_path_factory, corpus_files, cache_dir):
    """A tiny routed model trained for a few steps, then evaluated with plots and real generation."""
    from sdt.training.train import train

    arch = request.param
    run = tmp_path_factory.mktemp(f"run_{arch}")
    overrides = [
        f"model={arch}",
        *tiny_model_overrides(n_layers=4),
        "model.capacity=0.25",
        *TINY_TRAINER,
        *tiny_data(corpus_files),
    ]
    train(compose_cfg("train", overrides, run, cache_dir))
    out = tmp_path_factory.mktemp(f"eval_{arch}")
    cfg = compose_cfg(
        "eval",
        [
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "samples.prompts=[ROMEO,KING]",
            "samples.max_new_tokens=8",
            "generation.max_new_tokens=40",
            "inference_capacity=[0.125,0.5,1.0]",
        ],
        out,
        cache_dir,
    )
    return arch, out, evaluate(cfg)


def test_routed_eval_reports_every_mode_and_quotes_the_causal_one(routed_eval):
    arch, _, result = routed_eval
    modes = result["perplexity_by_routing"]
    assert set(modes) == {"topk", "threshold", "student", "budget"}
    assert set(result["executed_fraction_by_routing"]) == set(modes)
    # Budget: within the band of 1.25 tokens of 32 (sequences this short are under the 64 of the 2-point bound).
    assert result["executed_fraction_by_routing"]["budget"] == pytest.approx(0.25, abs=1.25 / 32 + 1e-9)
    assert result["executed_fraction_by_routing"]["topk"] == pytest.approx(0.25, abs=1 / 32)
    assert "oracle" in modes["topk"]["label"]
    assert result["routing_mode"] == ("threshold" if arch == "sdt" else "student")
    assert result["perplexity"] == pytest.approx(modes[result["routing_mode"]]["test"])


def test_routed_eval_writes_routing_compute_generation_and_plots(routed_eval):
    arch, out, _ = routed_eval
    data = json.loads((out / "eval.json").read_text())
    n_routed = {"sdt": 2, "stt": 2, "mod": 2}[arch]  # 4 layers: 2 SDT pairs, or 2 routed STT/MoD layers
    assert len(data["routing"]) == n_routed
    for entry in data["routing"]:
        assert 0.0 <= entry["executed_fraction"] <= 1.0
        assert entry["executed_fraction_topk"] == pytest.approx(0.25, abs=1 / 32)  # k = floor(0.25 * 32) = 8 of 32
        assert {"student_accuracy", "student_precision", "student_recall"} <= set(entry)
    # The compute of the checkpoint's own architecture at the evaluated length; routing at capacity 0.25 saves some.
    model_cfg = ModelConfig.from_dict(load_checkpoint(data["checkpoint"])["hyper_parameters"]["model"])
    assert model_cfg.arch == arch and model_cfg.capacity == 0.25
    assert data["compute"] == json.loads(json.dumps(compute_report(model_cfg, data["seq_len"])))
    assert data["compute"]["flops_ratio_vs_dense"] < 1.0
    gen = data["generation"]
    assert gen["kv_bytes"] > 0 and gen["tokens_per_second_ratio_vs_dense"] > 0
    assert gen["kv_bytes_ratio_vs_dense"] <= 1.0  # routed layers cache only the tokens they executed
    for name in ("heatmap", "executed_fraction", "gate_contributions") if arch != "mod" else ("heatmap",):
        assert Path(data["plots"][name]).read_bytes()[:4] == b"\x89PNG"


def test_routed_eval_sweeps_capacities_and_charges_each_request(routed_eval):
    _, out, _ = routed_eval
    data = json.loads((out / "eval.json").read_text())
    sweep = data["capacity_sweep"]
    assert [e["capacity"] for e in sweep] == [0.125, 0.5, 1.0]
    for e in sweep:
        assert {
            "capacity",
            "perplexity",
            "executed_fraction",
            "flops_ratio_vs_dense",
            "kv_bytes_ratio_vs_dense",
        } <= set(e)
        assert e["perplexity"] > 1 and e["routing"] == data["routing_mode"]
    # More capacity executes more and costs more; capacity 1 is every token at exactly dense cost plus the routers.
    assert sweep[0]["executed_fraction"] < sweep[1]["executed_fraction"] < sweep[2]["executed_fraction"] == 1.0
    assert sweep[0]["flops_ratio_vs_dense"] < sweep[1]["flops_ratio_vs_dense"] < sweep[2]["flops_ratio_vs_dense"]
    assert sweep[2]["kv_bytes_ratio_vs_dense"] == 1.0
    assert Path(data["plots"]["capacity_sweep"]).name == "capacity_sweep.png"
    assert Path(data["plots"]["capacity_sweep"]).read_bytes()[:4] == b"\x89PNG"
    requests = data["request_compute"]["requests"]
    assert len(requests) == 2 and all(0 < r["flops_ratio_vs_dense"] < 1.2 for r in requests)
    dist = data["request_compute"]["distribution"]
    assert dist["kv_bytes"]["min"] <= dist["kv_bytes"]["median"] <= dist["kv_bytes"]["max"]


def test_zero_new_tokens_skips_the_samples_and_their_compute_report(trained_run, cache_dir, tmp_path):
    # samples.max_new_tokens=0 is a valid value (validated >= 0), like generation.max_new_tokens=0: it skips the
    # samples instead of reporting the compute of requests that generated nothing.
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt_path={ckpt}", "max_batches=1", "splits=[val]", "samples.max_new_tokens=0"]
    result = evaluate(compose_cfg("eval", overrides, tmp_path, cache_dir))
    assert "samples" not in result and "request_compute" not in result
    assert math.isfinite(result["perplexity"])
