"""The lm-evaluation-harness model: the three request types against a hand computation, and the shipped tasks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sdt.common.errors import UserError
from sdt.models import ModelConfig
from tests.conftest import ROOT, run_cli, tiny_model_fields
from tests.pretrained_helpers import write_checkpoint

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from sdt.harness import SDTLM, cut_at_stops

TINY = tiny_model_fields(vocab_size=320, n_layers=4)  # the tokenizer's vocabulary; two SDT pairs
TASKS_DIR = ROOT / "sdt" / "harness_tasks"
MODELS = {
    "dense": {"arch": "dense"},
    "sdt": {"arch": "sdt", "capacity": 0.5},
    "stt": {"arch": "stt", "capacity": 0.5},
    "mod": {"arch": "mod", "capacity": 0.5},
}


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module", params=list(MODELS))
def lm(request, tmp_path_factory) -> SDTLM:
    path = tmp_path_factory.mktemp("harness") / "last.ckpt"
    write_checkpoint(path, ModelConfig(**TINY, **MODELS[request.param]), calibrate=True)
    return SDTLM(ckpt_path=str(path), batch_size=2, device="cpu", max_length=16)


def unpadded_logprobs(lm: SDTLM, ids: list[int]) -> torch.Tensor:
    """One sequence alone, no padding: (T, V) log-probabilities, position t predicting token t + 1."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]), routing=lm.routing, diagnostics=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_loglikelihood_matches_each_request_scored_alone(lm):
    pairs = [
        ("To be, or not", " to be"),
        ("ROMEO:", "\nBut soft, what light"),
        ("To be, or not to be, that is the question: whether", " 'tis nobler in the mind"),
        ("", "To be"),  # an empty context conditions on end-of-text
    ]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, got, strict=True):
        if context:
            whole = lm.tokenizer.encode(context + continuation)
            n_cont = len(whole) - len(lm.tokenizer.encode(context))
        else:
            whole = [lm.tokenizer.eos_id, *lm.tokenizer.encode(continuation)]
            n_cont = len(whole) - 1
        ids = whole[-(lm.max_length + 1) :]  # cut from the left to the window, as lm-eval's own models do
        n_cont = min(n_cont, len(ids) - 1)  # a continuation longer than the window: its last max_length tokens
        logp = unpadded_logprobs(lm, ids[:-1])
        rows = range(len(ids) - 1 - n_cont, len(ids) - 1)  # the positions that predict the continuation
        targets = ids[-n_cont:]
        expected = sum(float(logp[t, tok]) for t, tok in zip(rows, targets, strict=True))
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == all(int(logp[t].argmax()) == tok for t, tok in zip(rows, targets, strict=True))
    assert len({round(s, 3) for s, _ in got}) == len(pairs)


def test_loglikelihood_rolling_scores_every_token_once_in_windows(lm):
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. ROMEO:"
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    full = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    assert len(full) - 1 > 2 * lm.max_length  # at least three windows
    expected = 0.0
    # Window k predicts tokens k*L+1 .. (k+1)*L of `full`, each once; the last, shorter one keeps a full window of
    # context (lm-eval's rolling windows maximise the context).
    L = lm.max_length
    for start in range(0, len(full) - 1, L):
        end = min(start + L, len(full) - 1)  # the last token this window predicts
        window = full[max(0, end - L) : end + 1]
        logp = unpadded_logprobs(lm, window[:-1])
        n = end - start
        expected += sum(float(logp[t, window[t + 1]]) for t in range(len(window) - 1 - n, len(window) - 1))
    assert got == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_each_prompt_decoded_alone_and_cut_at_the_stop(lm):
    prompts = ["To be, or", "ROMEO:\nBut soft, what light through", "To"]
    kwargs = {"until": ["o"], "max_gen_toks": 6}
    got = lm.generate_until([request("generate_until", p, dict(kwargs)) for p in prompts], disable_tqdm=True)
    truncated = 0
    for prompt, text in zip(prompts, got, strict=True):
        ids = lm.tokenizer.encode(prompt)
        truncated += len(ids) > lm.max_length - 6
        ids = ids[-(lm.max_length - 6) :]  # prompts are cut from the left so that prompt + max_gen_toks fit
        out = lm.model.generate(
            torch.tensor([ids]), 6, temperature=0.0, eos_id=lm.tokenizer.eos_id, routing=lm.routing,
            valid_vocab=lm.valid_vocab,
        )[0, len(ids) :].tolist()  # fmt: skip
        if lm.tokenizer.eos_id in out:
            out = out[: out.index(lm.tokenizer.eos_id)]
        assert text == cut_at_stops(lm.tokenizer.decode(out), ["o"])
        assert "o" not in text
    assert truncated == 1


def test_bad_model_arguments(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint(path, ModelConfig(**TINY, arch="sdt"))
    with pytest.raises(UserError, match="needs ckpt_path"):
        SDTLM()
    with pytest.raises(UserError, match="routing='topk': lm-eval scores routed models in a causal routing mode"):
        SDTLM(ckpt_path=str(path), routing="topk", device="cpu")
    with pytest.raises(UserError, match=r"unknown sdt model argument\(s\) \['pretrained'\]"):
        SDTLM(ckpt_path=str(path), pretrained="gpt2", device="cpu")
    with pytest.raises(UserError, match="max_length=100 must be in"):
        SDTLM(ckpt_path=str(path), device="cpu", max_length=100)


def test_capacity_argument_is_the_run_time_dial(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint(path, ModelConfig(**TINY, arch="sdt", capacity=0.5), calibrate=True)
    reference = SDTLM(ckpt_path=str(path), device="cpu", max_length=16)
    reference.model.set_inference_capacity(0.25)
    dialled = SDTLM(ckpt_path=str(path), device="cpu", max_length=16, capacity="0.25")
    assert dialled.model.capacity_in_force == 0.25
    for (_, ref_layer), (_, layer) in zip(reference.model.routed_layers(), dialled.model.routed_layers(), strict=True):
        for name, threshold in layer.thresholds().items():
            torch.testing.assert_close(threshold, ref_layer.thresholds()[name], rtol=0, atol=0)
    full = SDTLM(ckpt_path=str(path), device="cpu", max_length=16, capacity=1.0)
    ids = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fewer = dialled.model(ids, routing=dialled.routing).decisions
        more = full.model(ids, routing=full.routing).decisions
    assert sum(d.sum() for d in fewer.values()) < sum(d.sum() for d in more.values())
    with pytest.raises(UserError, match="capacity must be a number in"):
        SDTLM(ckpt_path=str(path), device="cpu", capacity="half")
    with pytest.raises(UserError, match="capacity must be a number in"):
        SDTLM(ckpt_path=str(path), device="cpu", capacity=1.5)
    dense = tmp_path / "dense.ckpt"
    write_checkpoint(dense, ModelConfig(**TINY, arch="dense"))
    with pytest.raises(UserError, match="capacity= applies to routed models"):
        SDTLM(ckpt_path=str(dense), device="cpu", capacity=0.5)


def test_registered_under_its_name_and_as_an_entry_point():
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    assert get_model("sdt") is SDTLM
    (ep,) = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "sdt"] or [None]
    if ep is not None:  # present once the package is installed with this pyproject.toml
        assert ep.load() is SDTLM


@pytest.mark.slow  # lm-eval's start-up and dataset preparation take a minute or more on two cores
def test_lm_eval_cli_scores_a_checkpoint_on_the_shipped_tasks(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint(path, ModelConfig(**TINY, arch="sdt"))
    out = tmp_path / "results"
    # The console script README documents, where the package is installed (CI); else the module it runs.
    script = Path(sys.executable).parent / "sdt-lm-eval"
    launcher = [str(script)] if script.exists() else ["-m", "sdt.harness"]
    cmd = [
        *launcher, "--model", "sdt",
        "--model_args", f"ckpt_path={path}", "--batch_size", "8",
        "--tasks", "shakespeare_next_line,tempest_perplexity", "--include_path", str(TASKS_DIR),
        "--limit", "3", "--output_path", str(out),
    ]  # fmt: skip
    # No --device: lm-eval's command line then passes cuda:0, which must fall back to the CPU where there is no GPU.
    proc = run_cli(cmd, tmp_path / "cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    acc = results["shakespeare_next_line"]["acc,none"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
    bpb = results["tempest_perplexity"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and bpb > 0
