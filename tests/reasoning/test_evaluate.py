"""`evaluate.py task=reasoning`: scoring of generations, and a tiny train + evaluate run end to end."""

from __future__ import annotations

import json

import pytest

from sdt.cli.dispatch import evaluate
from sdt.common.errors import UserError
from sdt.data.reasoning.metrics import DEFAULT_MARKERS
from sdt.data.tokenizer import train_bpe
from sdt.reasoning.evaluate import count_thinking_tokens, score_generation
from sdt.reasoning.plot import main as plot_main
from sdt.training.train import train
from tests.conftest import TINY_TRAINER, compose_cfg, tiny_model_overrides
from tests.data.reasoning.test_braking import TRACE


def test_count_thinking_tokens_stops_at_the_closing_tag():
    tok = train_bpe([TRACE] * 5, vocab_size=300)
    ids = tok.encode(TRACE)
    n = count_thinking_tokens(tok, ids, TRACE)
    assert "</think>" in tok.decode(ids[:n]) and "</think>" not in tok.decode(ids[: n - 1])
    unclosed = "<think>\nWait, wait, wait"
    assert count_thinking_tokens(tok, tok.encode(unclosed), unclosed) == len(tok.encode(unclosed))


def test_score_generation():
    row = score_generation(TRACE[len("<think>") :], "5", list(DEFAULT_MARKERS))
    assert row["closed_think"] and not row["correct"]  # no opening tag: not a trace
    row = score_generation(TRACE, "5", list(DEFAULT_MARKERS))
    assert row["correct"] and row["answer"] == "5"
    assert row["num_steps"] == 8 and row["efficiency"] == pytest.approx(3 / 8) and row["overthink"] > 0.5
    wrong = score_generation(TRACE.replace("5", "6"), "5", list(DEFAULT_MARKERS))
    assert not wrong["correct"] and "overthink" not in wrong  # no step states the right answer
    unclosed = score_generation("<think>\nSo the answer is 5.", "5", list(DEFAULT_MARKERS))
    assert not unclosed["closed_think"] and not unclosed["correct"]


TINY_REASONING = [
    "model=dense",
    *tiny_model_overrides(max_seq_len=512),  # a reasoning trace runs to 320 tokens
    "data=reasoning_synthetic",
    "data.num_train=64",
    "data.num_val=16",
    "data.num_test=8",
    "data.batch_size=8",
    "data.seq_len=320",
    "data.tokenizer.vocab_size=400",
]


def test_train_then_evaluate_reasoning(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = compose_cfg("train", [*TINY_REASONING, *TINY_TRAINER, "data.braking=dynamic"], run, tmp_path / "c")
    out = train(cfg)
    assert out["global_step"] == 6 and out["metrics"]["val/loss"] > 0
    # Another run's results, to be plotted beside this one.
    other = {"variant": "none", "label": "plain SFT", "accuracy": 0.5, "mean_thinking_tokens": 30.0,
             "self_stop_share": 1.0, "overthink_score": 0.4}  # fmt: skip
    (tmp_path / "other.json").write_text(json.dumps(other))
    overrides = [
        "task=reasoning",
        f"ckpt_path={out['last_checkpoint']}",
        "reasoning.num_problems=4",
        "reasoning.batch_size=2",
        "reasoning.max_new_tokens=24",
        f"reasoning.compare=[{tmp_path / 'other.json'}]",
    ]
    result = evaluate(compose_cfg("eval", overrides, run / "eval", tmp_path / "c"))
    assert result["variant"] == "dynamic" and result["num_problems"] == 4
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["self_stop_share"] <= 1
    assert 0 < result["mean_thinking_tokens"] <= 24  # the limit caps an untrained model's rambling
    assert result["reference_mean_thinking_tokens"] > 24
    saved = json.loads((run / "eval" / "reasoning.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and len(saved["generations"]) == 4
    assert (run / "eval" / "accuracy_vs_tokens.png").stat().st_size > 0

    capsys.readouterr()
    plot_main([str(tmp_path / "other.json"), str(run / "eval" / "reasoning.json"), "--out", str(tmp_path / "p.png")])
    table = capsys.readouterr().out
    assert (tmp_path / "p.png").stat().st_size > 0
    cut = 1 - result["mean_thinking_tokens"] / 30.0
    assert f"| {cut:.1%} |" in table and f"{(result['accuracy'] - 0.5) * 100:+.1f} pts" in table


def test_reasoning_task_needs_a_reasoning_checkpoint(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="reasoning corpus"):
        evaluate(compose_cfg("eval", ["task=reasoning", f"ckpt_path={ckpt}"], tmp_path, tmp_path))
    with pytest.raises(UserError, match="task must be"):
        evaluate(compose_cfg("eval", ["task=poetry", f"ckpt_path={ckpt}"], tmp_path, tmp_path))


def test_fine_tuning_from_a_checkpoint_records_the_new_data_config(tmp_path):
    """Stage 2 (resume on self-braking data): the new checkpoints carry the config they were trained with."""
    from sdt.training.checkpoint import load_checkpoint

    first = train(compose_cfg("train", [*TINY_REASONING, *TINY_TRAINER], tmp_path / "a", tmp_path / "c"))
    overrides = [*TINY_REASONING, *TINY_TRAINER, "data.braking=exact", "trainer.max_steps=8"]
    overrides.append(f"ckpt_path={first['last_checkpoint']}")
    second = train(compose_cfg("train", overrides, tmp_path / "b", tmp_path / "c"))
    assert second["global_step"] == 8
    ckpt = load_checkpoint(second["last_checkpoint"])
    assert ckpt["sdt"]["config"]["data"]["braking"] == "exact"
    assert ckpt["sdt"]["tokenizer"] == load_checkpoint(first["last_checkpoint"])["sdt"]["tokenizer"]
