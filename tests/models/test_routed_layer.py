"""The routed forward written once (sdt.models.routed_layer): Top-K runs once per layer, and the new architecture
that docs/architecture.md writes in a code block trains, calibrates and decodes with a cache like its full forward."""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import pytest
import torch

from sdt.models import DenseLayer, LanguageModel, ModelCache, ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds
from sdt.routing import selection

ROOT = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 61, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64}


def documented_example(tmp_path: Path) -> tuple[str, types.ModuleType]:
    """The python block under "### A new routed architecture" in docs/architecture.md, imported as a module."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("### A new routed architecture", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    path = tmp_path / "norm_routed_layer.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("norm_routed_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return code, module


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
def test_topk_runs_once_per_routed_layer_and_forward(arch, monkeypatch):
    """Training selects with the Top-K mask its causal routers learn: one Top-K per routed layer, not two."""
    calls = []
    real = selection.topk_indices
    monkeypatch.setattr(selection, "topk_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, n_layers=4, **TINY))
    ids = torch.randint(0, 61, (2, 16))
    out = model(ids, torch.roll(ids, -1, 1))
    n_routed = len(model.routed_layers())
    assert len(calls) == n_routed
    assert "router" in out.aux_losses  # the students did train against that mask
    calls.clear()
    model(ids, routing="student", diagnostics=False)  # a causal mode with nothing to score: no Top-K at all
    assert calls == []


def test_the_documented_new_architecture_trains_calibrates_and_decodes_like_its_full_forward(tmp_path):
    code, example = documented_example(tmp_path)
    assert len(code.splitlines()) < 80  # the claim of the docs: a new routed architecture in under 80 lines
    cfg = ModelConfig(arch="dense", n_layers=4, capacity=0.5, always_execute_first=1, skip_map="linear", **TINY)
    torch.manual_seed(0)
    layers = [DenseLayer(cfg), example.NormRoutedLayer(cfg), DenseLayer(cfg), example.NormRoutedLayer(cfg)]
    model = LanguageModel(cfg, layers)
    assert model.is_routed and len(model.routed_layers()) == 2
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (4, 24), generator=g)
    targets = torch.roll(ids, -1, 1)

    # One training step under Top-K: every token of a routed layer's Top-K ran its block, and the loss falls.
    out = model(ids, targets)
    for i, _ in model.routed_layers():
        assert out.decisions[i].sum(1).tolist() == [12] * 4 and out.decisions[i][:, 0].all()
        assert f"layers.{i}.executed_fraction" in out.stats
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out.loss.backward()
    routed = model.layers[1]
    assert routed.block.mlp.down_proj.weight.grad.abs().sum() > 0 and routed.skip_map is not None
    opt.step()
    with torch.no_grad():
        assert model(ids, targets).loss < out.loss

    # Calibrated to the capacity, the causal modes execute about that share; cached decoding = the full forward.
    model.eval()
    calibrate_thresholds(model, [torch.randint(0, 61, (8, 24), generator=g)])
    for _, layer in model.routed_layers():
        assert layer.thresholds()["norm"] > 0
    with torch.no_grad():
        for routing in ("threshold", "budget"):
            full = model(ids, routing=routing)
            share = torch.stack([d.float().mean() for d in full.decisions.values()]).mean()
            assert 0.2 < share < 0.8
            cache = ModelCache()
            steps = [model(ids[:, :5], cache=cache, routing=routing).logits]
            for t in range(5, 24):
                step = model(ids[:, t : t + 1], positions=torch.full((4, 1), t), cache=cache, routing=routing)
                steps.append(step.logits)
            torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, atol=1e-5, rtol=1e-4)
        generated = model.generate(ids[:, :6], 8, temperature=0.0, routing="threshold")
        assert generated.shape == (4, 14)
        with pytest.raises(ValueError, match="not available for this layer"):
            model(ids, routing="student")  # the layer offers no student


# What each architecture's routing modes threshold (the mapping the three layers wrote inline before the skeleton).
MODE_SCORES = {
    "sdt": {"topk": "gate", "threshold": "gate", "student": "student", "budget": "gate"},
    "stt": {"topk": "gate", "threshold": "gate", "student": "student", "budget": "student"},
    "mod": {"topk": "router", "threshold": "router", "student": "student", "budget": "student"},
}


@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
def test_every_mode_executes_what_its_score_chooses(arch):
    """Top-K of the ranked score; a causal mode: its score against its owner's threshold (budget: the running
    budget over that score), the leading position always in, padding never."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layers=4, always_execute_first=1, **TINY)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 61, (3, 20), generator=g)
    pad = torch.ones(3, 20, dtype=torch.bool)
    pad[1, :6] = False
    positions = (pad.long().cumsum(1) - 1).clamp(min=0)
    calibrate_thresholds(model, [torch.randint(0, 61, (4, 20), generator=g)])
    with torch.no_grad():
        for mode, name in MODE_SCORES[arch].items():
            out = model(ids, pad_mask=pad, routing=mode)
            for i, layer in model.routed_layers():
                score, owner = out.scores[i][name], layer.score_owners()[name]
                if mode == "topk":
                    _, want = selection.topk_membership(score, cfg.capacity, positions, 1)
                elif mode == "budget":
                    want, _ = selection.budget_decisions(
                        score, capacity=cfg.capacity, threshold=owner.threshold, grid=owner.quantiles,
                        pad_mask_BT=pad, forced_BT=positions < 1,
                    )  # fmt: skip
                else:
                    want = (score >= owner.threshold) | (positions < 1)
                want = want & pad  # padding never executes, whatever Top-K chose
                assert 0 < want.sum() < pad.sum(), (mode, i)  # some tokens execute, not all
                assert torch.equal(out.decisions[i], want), (arch, mode, i)
