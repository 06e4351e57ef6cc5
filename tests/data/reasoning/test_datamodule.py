"""Reasoning SFT data: the loss mask, batches, hub files with OpenR1-Math columns, chat templates, bad traces."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sdt.common.errors import UserError
from sdt.data.datamodules import build_datamodule
from sdt.data.reasoning.answers import answer_checker
from sdt.data.reasoning.braking import BrakingConfig, build_braking_segments
from sdt.data.reasoning.datamodule import (
    IGNORE_INDEX,
    PLAIN_PROMPT,
    PromptFormatter,
    ReasoningDataConfig,
    ReasoningDataModule,
    collate_trimmed,
    shift_with_mask,
)
from sdt.data.tokenizer import Tokenizer, train_bpe
from sdt.models import build_model
from tests.conftest import tiny_model_config
from tests.data.reasoning.test_braking import CHECK, TRACE


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [PLAIN_PROMPT.format(question="What is 2 + 3?") + TRACE] * 20
    return train_bpe(texts, vocab_size=300)


def test_loss_mask_zeroes_exactly_the_prompt_and_the_masked_slice(tokenizer):
    result = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="exact"))
    kept, masked, braking, answer = (s.text for s in result.segments)
    prompt = PLAIN_PROMPT.format(question="What is 2 + 3?")
    ids, loss = PromptFormatter(tokenizer, "plain").example_ids("What is 2 + 3?", result.segments)

    # Manual: the pieces encoded one by one, then the end-of-text token.
    pieces = [tokenizer.encode(t) for t in (prompt, kept, masked, braking, answer)] + [[tokenizer.eos_id]]
    assert ids == [t for p in pieces for t in p]
    n_prompt, n_kept, n_masked = len(pieces[0]), len(pieces[1]), len(pieces[2])
    masked_positions = set(range(n_prompt + n_kept, n_prompt + n_kept + n_masked))
    seq_len = len(ids) + 5
    inputs, targets = shift_with_mask(ids, loss, seq_len, tokenizer.eos_id)
    expected = [
        ids[t + 1] if (t + 1 >= n_prompt and t + 1 not in masked_positions) else IGNORE_INDEX
        for t in range(len(ids) - 1)
    ] + [IGNORE_INDEX] * 6
    assert inputs == ids[:-1] + [tokenizer.eos_id] * 6
    assert targets == expected
    # What carries loss reads back as the completion without the masked slice.
    trained = tokenizer.decode([t for t in targets if t != IGNORE_INDEX])
    assert trained == kept + braking + answer + tokenizer.eos_token
    assert masked.strip() == "Hmm, once more." and masked.strip() not in trained


def test_model_loss_ignores_masked_tokens(tokenizer):
    """The loss of the model (what LitLM optimises) equals a manual mean over exactly the unmasked targets."""
    result = build_braking_segments(TRACE, CHECK, BrakingConfig(variant="exact"))
    ids, loss = PromptFormatter(tokenizer, "plain").example_ids("What is 2 + 3?", result.segments)
    inputs, targets = shift_with_mask(ids, loss, len(ids) + 3, tokenizer.eos_id)
    torch.manual_seed(0)
    # The tokenizer's vocabulary, and positions for the whole formatted trace.
    model = build_model(tiny_model_config(vocab_size=320, max_seq_len=256))
    x, y = torch.tensor([inputs]), torch.tensor([targets])
    out = model(x, y)
    pad = len(inputs) - (len(ids) - 1)
    per_token = F.cross_entropy(out.logits[0].float(), torch.tensor(ids[1:] + [0] * pad), reduction="none")
    keep = torch.tensor(loss[1:] + [False] * pad)
    torch.testing.assert_close(out.loss, per_token[keep].mean())
    # The masked slice really is excluded: counting it (as plain SFT on the same text would) gives another loss.
    n_prompt = len(PromptFormatter(tokenizer, "plain").prompt_ids("What is 2 + 3?"))
    with_masked = torch.zeros_like(keep)
    with_masked[n_prompt - 1 : len(ids) - 1] = True
    assert int(with_masked.sum()) > int(keep.sum())
    assert not torch.isclose(out.loss, per_token[with_masked].mean())


def test_collate_trimming_keeps_the_loss(tokenizer):
    rows = []
    for n in (4, 9):
        ids = list(range(1, n + 1))
        x, y = shift_with_mask(ids, [False, *([True] * (n - 1))], 16, 0)
        rows.append({"input_ids": torch.tensor(x), "targets": torch.tensor(y)})
    batch = collate_trimmed(rows)
    assert batch["input_ids"].shape == (2, 8)  # the longest row's last target is at position 7
    assert (batch["targets"] != IGNORE_INDEX).sum() == 3 + 8


def synthetic_cfg(tmp_path, **kw) -> ReasoningDataConfig:
    base = {"num_train": 64, "num_val": 16, "num_test": 8, "seq_len": 384, "batch_size": 8, "cache_dir": str(tmp_path)}
    base["tokenizer"] = {"vocab_size": 512}
    return ReasoningDataConfig(**{**base, **kw})


@pytest.mark.parametrize("braking", ["none", "exact", "dynamic"])
def test_synthetic_datamodule_batches(tmp_path, braking):
    dm = ReasoningDataModule(synthetic_cfg(tmp_path, braking=braking))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "targets"}
    B, T = batch["input_ids"].shape
    assert B == 8 and T <= 384 and batch["targets"].shape == (B, T)
    prompt_len = [len(p) for _, p, _ in dm.test_problems("train")]
    for row in batch["targets"]:
        first = int((row != IGNORE_INDEX).nonzero()[0])
        assert first >= min(prompt_len) - 1  # nothing of the prompt is trained on
    calibration = next(iter(dm.calibration_dataloader()))["input_ids"]
    assert calibration.shape[0] == 8 and len(dm.records["calibration"]) == 64
    train_questions = {r.question for r in dm.records["train"]}
    assert not train_questions & {r.question for r in dm.records["test"]}
    stats = dm.split_stats["train"]
    assert stats["num_examples"] == 64 and stats["num_skipped"] == 0
    assert (stats["num_trimmed"] > 0) == (braking != "none")
    assert (stats["masked_tokens"] > 0) == (braking != "none")


def test_resumed_training_order_continues_where_the_checkpoint_left_off(tmp_path):
    """The data position saved in a checkpoint (ResumableDataModule.state_dict) restarts the loader mid-epoch."""
    full = ReasoningDataModule(synthetic_cfg(tmp_path))
    full.setup("fit")
    batches = [b["input_ids"] for b in full.train_dataloader()]
    resumed = ReasoningDataModule(synthetic_cfg(tmp_path))
    resumed.setup("fit")
    resumed.load_state_dict({"train_epoch": 0, "train_batches_done": 3, "batch_size": 8, "world_size": 1})
    rest = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(rest) == len(batches) - 3 > 0
    for a, b in zip(rest, batches[3:], strict=True):
        assert torch.equal(a, b)


def test_calibration_can_be_disabled(tmp_path):
    assert ReasoningDataModule(synthetic_cfg(tmp_path, calibration_examples=0)).calibration_dataloader() is None


def test_variants_share_the_tokenizer_and_braking_shortens(tmp_path):
    none = ReasoningDataModule(synthetic_cfg(tmp_path, braking="none"))
    exact = ReasoningDataModule(synthetic_cfg(tmp_path, braking="exact"))
    assert none.tokenizer.to_json() == exact.tokenizer.to_json()
    none.setup("fit")
    exact.setup("fit")
    assert exact.split_stats["train"]["num_tokens"] < none.split_stats["train"]["num_tokens"]


def test_stop_token_is_one_special_token(tmp_path):
    dm = ReasoningDataModule(synthetic_cfg(tmp_path, braking="exact", stop_token="<|stop_thinking|>"))
    stop_id = dm.tokenizer.backend.token_to_id("<|stop_thinking|>")
    assert stop_id is not None and dm.tokenizer.encode("a <|stop_thinking|>")[-1] == stop_id
    dm.setup("fit")
    assert (dm._dataset("train").targets == stop_id).any()


def test_sequences_too_long_are_skipped_with_a_count(tmp_path):
    dm = ReasoningDataModule(synthetic_cfg(tmp_path, seq_len=200))
    dm.setup("fit")
    skipped = dm.split_stats["skipped"]["train"]
    assert skipped == {"longer than data.seq_len=200": 64 - dm.split_stats["train"]["num_examples"]}
    assert 0 < sum(skipped.values()) < 64


OPENR1_ROWS = [
    # A usable row: the second generation is the correct one.
    {"problem": "What is 2 + 3?", "answer": "5", "generations": ["<think>\nIt is 6.\n</think>\n\n\\boxed{6}", TRACE],
     "correctness_math_verify": [False, True]},
    {"problem": "No tags", "answer": "5", "generations": ["The answer is 5."], "correctness_math_verify": [True]},
    {"problem": "No answer", "answer": "5", "generations": ["<think>\nSo the answer is 5.\n</think>"],
     "correctness_math_verify": [True]},
    {"problem": "None correct", "answer": "5", "generations": ["<think>x</think> 4"],
     "correctness_math_verify": [False]},
]  # fmt: skip


def write_openr1(tmp_path, fmt: str, copies: int = 6):
    rows = [dict(r, problem=f"{r['problem']} #{i}") for i in range(copies) for r in OPENR1_ROWS]
    if fmt == "jsonl":
        path = tmp_path / "openr1.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "openr1.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_hub_loader_reads_openr1_columns_and_counts_bad_traces(tmp_path, fmt):
    path = write_openr1(tmp_path, fmt)
    cfg = ReasoningDataConfig(corpus="reasoning_hub", name=str(path), max_eval_docs=3, seq_len=256, batch_size=2,
                              braking="exact", cache_dir=str(tmp_path), tokenizer={"vocab_size": 300},
                              calibration_examples=2)  # fmt: skip
    dm = ReasoningDataModule(cfg)
    records = dm.records
    # 6 rows have no correct generation: skipped before splitting; of the 18 left (good, no tags, no answer,
    # repeated), 3 + 3 + 2 are held out for val, test and calibration.
    assert dm.skipped["train"]["no_trace"] == 6
    assert [len(records[s]) for s in ("val", "test", "calibration", "train")] == [3, 3, 2, 10]
    dm.setup("fit")
    skipped = dm.split_stats["skipped"]["train"]
    assert skipped["trace has no <think> tag"] == 3 and skipped["trace has nothing after </think>"] == 4
    assert dm.split_stats["train"]["num_examples"] == 3 and dm.split_stats["train"]["num_trimmed"] == 3
    assert records["test"][0].trace in (TRACE, OPENR1_ROWS[1]["generations"][0], OPENR1_ROWS[2]["generations"][0])


def test_hub_loader_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "generations": ["x"], "answer": "1"}) + "\n")
    cfg = ReasoningDataConfig(corpus="reasoning_hub", name=str(path), cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="question_column"):
        ReasoningDataModule(cfg).records  # noqa: B018
    with pytest.raises(UserError, match="data.name is required"):
        ReasoningDataConfig(corpus="reasoning_hub")
    with pytest.raises(UserError, match="data.braking"):
        build_datamodule({"corpus": "reasoning_synthetic", "braking": "always"})
    with pytest.raises(UserError, match="data.bracking"):
        build_datamodule({"corpus": "reasoning_synthetic", "bracking": "exact"})


def test_chat_template_prompts(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    hf.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    formatter = PromptFormatter(tokenizer, "auto", hf)
    assert formatter.format == "chat"
    assert tokenizer.decode(formatter.prompt_ids("Hi?")) == "<|user|>Hi?<|endoftext|><|assistant|>"
    result = build_braking_segments(TRACE, answer_checker("5"), BrakingConfig(variant="none"))
    ids, loss = formatter.example_ids("Hi?", result.segments)
    text = tokenizer.decode(ids)
    assert text == "<|user|>Hi?<|endoftext|><|assistant|>" + TRACE + "<|endoftext|>"
    n_prompt = len(formatter.prompt_ids("Hi?"))
    assert not any(loss[:n_prompt]) and all(loss[n_prompt:])
    with pytest.raises(UserError, match="chat template"):
        PromptFormatter(tokenizer, "chat", None)
