"""The compute benchmark (benchmarks/compute.py): the tiny size end to end, and a compilable Top-K training path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sdt.blocks.layers import RotaryEmbedding
from sdt.models import ForwardContext
from sdt.models.mod import MoDLayer
from sdt.models.sdt import SDTPair
from sdt.models.stt import STTLayer
from tests.conftest import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {
    "model",
    "capacity",
    "routing_mode",
    "executed_fraction",
    "train_flop_ratio",
    "forward_flop_ratio",
    "train_step_ratio",
    "forward_ratio",
    "prefill_ratio",
    "decode_ratio",
    "decode_flop_ratio",
    "kv_reserved_bytes",
    "kv_bytes_ratio",
    "peak_memory_ratio",
    "train_step_s",
    "forward_s",
    "prefill_s",
    "decode_s_per_token",
    "decode_tokens_per_s",
    "kv_bytes",
    "peak_memory_bytes",
}


def load_benchmark():
    """benchmarks/ is scripts, not a package: load compute.py by path (it puts its sibling modules on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmarks_compute", ROOT / "benchmarks" / "compute.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    bench = load_benchmark()
    out = tmp_path_factory.mktemp("bench")
    argv = ["--size", "tiny", "--repeats", "1", "--warmup", "1", "--decode-tokens", "8", "--prompt-tokens", "16"]
    argv += ["--clock", "cpu"]
    argv += [
        "--layer-bench",
        "--compare-transformers",
        "--out",
        str(out / "results.json"),
        "--markdown",
        str(out / "performance.md"),
    ]
    bench.main(argv)
    return json.loads((out / "results.json").read_text()), out


def test_tiny_run_writes_every_model_and_capacity(tiny_run):
    result, out = tiny_run
    assert {"torch", "cpu_count", "torch_threads", "size", "dtype", "device", "command"} <= set(result["meta"])
    assert result["meta"]["clock"] == "cpu"
    records = result["records"]
    assert sorted((r["model"], r["capacity"]) for r in records) == sorted(
        (m, c) for m in ("dense", "mod", "sdt", "stt") for c in (0.125, 0.25, 0.5, 1.0)
    )
    for r in records:
        assert CONTRACT_KEYS <= set(r), CONTRACT_KEYS - set(r)
        assert r["train_step_s"] > 0 and r["forward_s"] > 0 and r["kv_bytes"] > 0
        if r["model"] != "dense":
            assert r["routing_mode"] in ("threshold", "student")
            assert r["executed_fraction"]["forward"] and r["executed_fraction"]["decode"]
    layer = result["layer_bench"]
    assert layer["seq_len"] >= 512 and 0 < layer["flop_ratio"] < 1 and layer["forward_ratio"] > 0
    markdown = (out / "performance.md").read_text()
    assert "| model |" in markdown and "benchmarks/compute.py --size tiny" in markdown


def test_transformers_twin_computes_the_same_logits(tiny_run):
    """Target (d) compares timings of one computation: the Qwen2 twin must get our weights under the right names."""
    hf = tiny_run[0]["transformers"]
    assert hf["max_abs_logit_diff"] < 1e-4
    assert hf["same_tokens"]  # greedy decoding of the same weights: the same continuation from both generates
    assert hf["sdt_decode_tokens_per_s"] > 0 and hf["transformers_decode_tokens_per_s"] > 0
    assert hf["sdt_forward_s"] > 0 and hf["transformers_forward_s"] > 0
    assert hf["forward_ratio"] == pytest.approx(hf["sdt_forward_s"] / hf["transformers_forward_s"])
    assert "Against `transformers`" in (tiny_run[1] / "performance.md").read_text()


def test_target_checks_cover_every_target_and_follow_the_ratios(tiny_run):
    result = tiny_run[0]
    rows = result["targets"]
    assert {r["target"] for r in rows} == {"a", "b", "c", "d", "g"}  # e and f are set at the small and large sizes
    for r in rows:
        # g is a floor (our tokens/s at least transformers'), every other target a ceiling
        assert r["ok"] == (r["value"] >= r["bound"] if r["target"] == "g" else r["value"] <= r["bound"])
    d = next(r for r in rows if r["target"] == "d")
    assert d["value"] == pytest.approx(result["transformers"]["forward_ratio"])
    g = next(r for r in rows if r["target"] == "g")
    assert g["value"] == pytest.approx(result["transformers"]["decode_tokens_per_s_ratio"])
    b = [r for r in rows if r["target"] == "b"]
    assert len(b) == 2 * sum(r["model"] != "dense" for r in result["records"])  # train step and forward per record
    assert "| (a) |" in (tiny_run[1] / "performance.md").read_text()


def test_decode_targets_are_checked_at_their_sizes():
    """(e) decode time ratio <= 1 for every routed record at the small size; (f) decode time / decode FLOP ratio
    <= 1.25 at the large size; neither at other sizes."""
    bench = load_benchmark()

    def record(model: str, decode_ratio: float, decode_flop_ratio: float) -> dict:
        return {"model": model, "capacity": 0.25, "train_step_ratio": None, "train_flop_ratio": 0.7,
                "forward_ratio": 0.8, "forward_flop_ratio": 0.7, "kv_bytes_ratio": 0.6, "executed_kv_ratio": 0.6,
                "analytic_kv_ratio": 0.6, "decode_ratio": decode_ratio, "decode_flop_ratio": decode_flop_ratio}  # fmt: skip

    records = [record("dense", 1.0, 1.0), record("sdt", 0.9, 0.7), record("stt", 1.1, 0.7)]
    by_size = {}
    for size in ("tiny", "small", "large"):
        rows = bench.target_checks({"meta": {"size": size}, "records": records})
        by_size[size] = {(r["target"], r["what"].split(":")[0]): (r["value"], r["ok"]) for r in rows}
    assert not any(t in ("e", "f") for t, _ in by_size["tiny"])
    assert by_size["small"][("e", "sdt @ 0.25")] == (0.9, True)
    assert by_size["small"][("e", "stt @ 0.25")] == (1.1, False)
    assert by_size["large"][("f", "sdt @ 0.25")] == (pytest.approx(0.9 / 0.7), False)
    assert by_size["large"][("f", "stt @ 0.25")][1] is False
    assert ("b", "sdt @ 0.25") in by_size["small"]  # the forward check; the skipped train step gives no row
    assert sum(t == "b" for t, _ in by_size["small"]) == 2


def test_dense_ratios_are_one_and_routing_saves_kv(tiny_run):
    result, _ = tiny_run
    for r in result["records"]:
        if r["model"] == "dense":
            for key in ("train_step_ratio", "forward_ratio", "prefill_ratio", "decode_ratio", "kv_bytes_ratio"):
                assert r[key] == pytest.approx(1.0), key
            assert r["train_flop_ratio"] == pytest.approx(1.0) and r["forward_flop_ratio"] == pytest.approx(1.0)
            assert r["peak_memory_ratio"] is None  # CPU: reported as unavailable, not as a made-up number
        elif r["capacity"] == 0.125:
            assert r["kv_bytes_ratio"] < 1, r


def test_kv_cache_holds_exactly_the_executed_tokens(tiny_run):
    """Bytes held by the cache after decoding = bytes of the tokens each routed layer executed (counted from the
    layers' decisions, not from the cache) plus every token in every other block: nothing else is stored."""
    for r in tiny_run[0]["records"]:
        assert r["kv_bytes"] == pytest.approx(r["expected_kv_bytes"], rel=1e-12), r["model"]
        assert r["kv_bytes_ratio"] == pytest.approx(r["executed_kv_ratio"], rel=1e-12), r["model"]
        if r["model"] != "dense" and r["capacity"] < 1:
            assert r["executed_kv_ratio"] < 1


# The default model's path (SDT with its default skip map) in the default suite; the rest in the slow suite.
COMPILE_CASES = [
    pytest.param(cls, skip_map, marks=[] if (cls, skip_map) == (SDTPair, "linear") else [pytest.mark.slow])
    for cls in (SDTPair, STTLayer, MoDLayer)
    for skip_map in ("none", "linear")
]


@pytest.mark.parametrize(("layer_cls", "skip_map"), COMPILE_CASES)
def test_topk_training_path_compiles_without_graph_breaks(layer_cls, skip_map):
    """fullgraph=True fails on any graph break, e.g. a host sync (.item(), int(tensor)) in the training path."""
    torch.manual_seed(0)
    arch = {SDTPair: "sdt", STTLayer: "stt", MoDLayer: "mod"}[layer_cls]
    cfg = tiny_model_config(arch, capacity=0.25, skip_map=skip_map)
    layer = layer_cls(cfg)
    if layer.skip_map is not None:  # a nonzero map, so its estimate shows in the outputs compared below
        with torch.no_grad():
            for p in layer.skip_map.parameters():
                p.normal_(std=0.1)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    positions = torch.arange(16).expand(2, 16)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = layer(x, ForwardContext(positions=positions, rope=rope, routing="topk"))
        return out.hidden, out.decisions, sum(out.aux_losses.values())

    x = torch.randn(2, 16, 32, requires_grad=True)
    eager = step(x)
    (eager[0].sum() + eager[2]).backward()
    eager_grad, x.grad = x.grad, None
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    (compiled[0].sum() + compiled[2]).backward()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x.grad, eager_grad)
    assert compiled[1].sum(dim=1).tolist() == [4, 4]  # exactly k = floor(0.25 * 16) tokens per row


@pytest.mark.parametrize(("arch", "capacity"), [("dense", 1.0), ("sdt", 1.0), ("stt", 0.5)])
def test_pretrained_perplexity_compares_transformers_and_our_load(arch, capacity, tmp_path, monkeypatch, cache_dir):
    pytest.importorskip("transformers")
    from tests.pretrained_helpers import save_hf_model

    save_hf_model(tmp_path, "qwen2")
    monkeypatch.setenv("SDT_CACHE_DIR", str(cache_dir))
    spec = importlib.util.spec_from_file_location("pretrained_perplexity", ROOT / "benchmarks/pretrained_perplexity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ppl.json"
    bench.main(["--init-from", str(tmp_path), "--seq-len", "32", "--batch-size", "2", "--max-batches", "2",
                "--arch", arch, "--capacity", str(capacity), "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["tokens"] == 128 and result["batches"] == 2 and result["arch"] == arch
    if capacity == 1.0:  # our load, dense or transferred at full capacity, is the pretrained model
        assert result["max_abs_logit_diff"] < 1e-4
        assert result["perplexity_sdt"] == pytest.approx(result["perplexity_transformers"], rel=1e-5)
    else:  # half the routed layers' tokens skip their block: no longer the pretrained model
        assert result["max_abs_logit_diff"] > 1e-3
