"""`python -m sdt.generate`: streams a continuation, charges the request, and refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch

from sdt.generate import main
from sdt.models import ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds
from sdt.training.checkpoint import load_checkpoint
from tests.conftest import TINY_DIMS, run_cli


@pytest.fixture(scope="module")
def routed_ckpt(trained_run, tmp_path_factory):
    """The tiny trained run's checkpoint rewritten as a calibrated SDT model of the same dimensions (training one
    would add nothing here: generation only needs a routed model with quantile grids)."""
    ckpt = load_checkpoint(str(trained_run / "checkpoints" / "last.ckpt"))
    cfg = dict(ckpt["hyper_parameters"]["model"], arch="sdt", init_std=0.2, beta_init=5.0)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    calibrate_thresholds(model, [torch.randint(0, cfg["vocab_size"], (4, 32), generator=g) for _ in range(4)])
    ckpt["hyper_parameters"]["model"] = model.config.to_dict()
    ckpt["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("routed") / "sdt.ckpt"
    torch.save(ckpt, path)
    return path


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streams_the_continuation_and_prints_the_request_compute(routed_ckpt, capsys):
    code, out, _ = run([f"ckpt_path={routed_ckpt}", "prompt=ROMEO:", "max_new_tokens=12", "temperature=0"], capsys)
    assert code == 0
    text, compute = out.rstrip("\n").rsplit("\n", 1)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert compute.startswith("[compute]") and "GFLOPs" in compute and "KV cache" in compute


def test_a_lower_capacity_request_reports_less_compute(routed_ckpt, capsys):
    fractions = []
    for capacity in ("0.2", "0.8"):
        args = [f"ckpt_path={routed_ckpt}", "prompt=ROMEO:", "max_new_tokens=40", f"capacity={capacity}"]
        code, out, _ = run([*args, "routing=budget", "temperature=0"], capsys)
        assert code == 0
        fractions.append(float(out.split("executed ")[1].split(" ")[0]))
    assert fractions[0] < 0.35 and fractions[1] > 0.65


@pytest.mark.parametrize(
    "args, message",
    [
        (["prompt=hi"], "ckpt_path is required"),
        (["ckpt_path=/nonexistent/x.ckpt", "prompt=hi"], "checkpoint not found"),
        (["ckpt_path=x.ckpt", "prompt=hi", "capacity=1.5"], "capacity must be a number in (0, 1]"),
        (["ckpt_path=x.ckpt", "prompt=hi", "capacity=lots"], "capacity must be a number, got 'lots'"),
        (["ckpt_path=x.ckpt", "prompt=hi", "capacity=0"], "capacity must be a number in (0, 1]"),
        (["ckpt_path=x.ckpt", "prompt=hi", "temprature=0"], "unknown option(s) ['temprature']"),
        (["ckpt_path=x.ckpt", "hello"], "arguments are key=value"),
        (["ckpt_path=x.ckpt"], "prompt is required"),
        (["ckpt_path=x.ckpt", "prompt=hi", "routing=topk"], "routing must be one of threshold, student, budget"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_a_prompt_too_long_for_the_model_is_refused(routed_ckpt, capsys):
    code, _, err = run([f"ckpt_path={routed_ckpt}", "prompt=" + "To be or not to be. " * 60], capsys)
    assert code == 2 and f"too long for model.max_seq_len={TINY_DIMS['max_seq_len']}" in err and err.count("\n") == 1


@pytest.mark.slow  # a subprocess of python -m sdt.generate (~13 s)
def test_module_entry_point(routed_ckpt, cache_dir):
    proc = run_cli(["-m", "sdt.generate", f"ckpt_path={routed_ckpt}", "prompt=KING:", "max_new_tokens=4"], cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("KING:") and "[compute]" in proc.stdout


def test_a_checkpoint_from_before_the_dial_loads_but_refuses_a_capacity(routed_ckpt, tmp_path, capsys):
    ckpt = load_checkpoint(str(routed_ckpt))
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(".quantiles")}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    code, out, _ = run([f"ckpt_path={old}", "prompt=ROMEO:", "max_new_tokens=4"], capsys)
    assert code == 0 and "[compute]" in out
    code, _, err = run([f"ckpt_path={old}", "prompt=ROMEO:", "max_new_tokens=4", "capacity=0.3"], capsys)
    assert code == 2 and "recalibrate" in err
