"""`trainer=fsdp`: FSDP2 through Lightning's ModelParallelStrategy, on CPU processes with gloo. Two ranks train and
write a distributed checkpoint (one shard file per rank); it resumes on one rank under FSDP2 and in a plain single
process, with exactly the weights and optimizer state that were saved. Also the GPU presets' settings that need no
GPU to check: the TF32 switch applies on CUDA only, fused AdamW only where every parameter is on CUDA."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from sdt.models import ModelConfig, build_model
from sdt.training.callbacks import Float32MatmulPrecision
from sdt.training.checkpoint import is_sharded_checkpoint, load_checkpoint, model_state_dict
from sdt.training.distributed import FSDP2Strategy
from sdt.training.optim import OptimConfig, build_optimizer
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, run_cli, tiny_data, tiny_model_config


def fsdp_args(out: Path, corpus_files: list[str], *extra: str) -> list[str]:
    return [
        "train.py",
        "model=sdt",
        *TINY_MODEL,
        *TINY_TRAINER,
        *tiny_data(corpus_files),
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false",
        "data.calibration_blocks=4",
        f"paths.output_dir={out}",
        *extra,
    ]


def parameters(ckpt: dict) -> dict[str, torch.Tensor]:
    """The trained weights (calibration buffers are refitted at each validation, so they are left out)."""
    return {k: v for k, v in model_state_dict(ckpt).items() if not k.endswith((".threshold", ".quantiles"))}


def optimizer_tensors(ckpt: dict) -> dict[tuple[int, str], torch.Tensor]:
    state = ckpt["optimizer_states"][0]["state"]
    return {(int(i), name): v for i, s in state.items() for name, v in s.items() if torch.is_tensor(v) and v.dim()}


@pytest.mark.slow  # three runs of train.py, the first with two processes: a few minutes on two cores
def test_two_rank_sharded_checkpoint_resumes_on_one_rank_and_in_one_process(tmp_path, corpus_files, cache_dir):
    two = tmp_path / "two_ranks"
    proc = run_cli(
        fsdp_args(two, corpus_files, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"),
        cache_dir,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((two / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2
    saved = two / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(str(saved))
    assert len(list(saved.glob("*.distcp"))) == 2  # one shard file per rank, no rank gathered the model

    # Read in this process, no process group: whole tensors, the model's own shapes, AdamW state for every weight.
    ckpt = load_checkpoint(str(saved))
    model = build_model(ModelConfig.from_dict(ckpt["hyper_parameters"]["model"]))
    weights = model_state_dict(ckpt)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in model.state_dict().items()}
    n_trainable = len({id(p) for p in model.parameters()})
    assert len(ckpt["optimizer_states"][0]["state"]) == n_trainable

    # Resumed for one more step on one FSDP2 rank (DCP redistributes the shards) and in a plain process (the
    # directory read into one checkpoint, AdamW state re-keyed by parameter index): both must start from the saved
    # weights and moments, so they take the same step. A weight or a moment loaded into the wrong place, or not at
    # all, makes them differ.
    resumed = {}
    for name, extra in {
        "one_rank": ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1"],
        "one_process": ["trainer=cpu"],
    }.items():
        out = tmp_path / name
        proc = run_cli(
            fsdp_args(out, corpus_files, *extra, "trainer.max_steps=3", f"ckpt_path={saved}"), cache_dir, timeout=900
        )
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert json.loads((out / "train_result.json").read_text())["global_step"] == 3
        resumed[name] = load_checkpoint(str(out / "checkpoints" / "last.ckpt"))
    assert is_sharded_checkpoint(str(tmp_path / "one_rank" / "checkpoints" / "last.ckpt"))
    one_rank, one_process = parameters(resumed["one_rank"]), parameters(resumed["one_process"])
    assert one_rank.keys() == one_process.keys() == parameters(ckpt).keys()
    for key, value in one_process.items():
        torch.testing.assert_close(one_rank[key], value, msg=key)
    moved = [k for k, v in parameters(ckpt).items() if not torch.equal(v, one_process[k])]
    assert len(moved) > len(one_process) // 2  # they trained on from the checkpoint
    for key, value in optimizer_tensors(resumed["one_process"]).items():
        torch.testing.assert_close(optimizer_tensors(resumed["one_rank"])[key], value, msg=str(key))


def test_the_fsdp_preset_is_fsdp2_with_distributed_checkpoints(tmp_path, cache_dir):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", ["trainer=fsdp"], tmp_path, cache_dir)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy._save_distributed_checkpoint
    for preset in ("gpu", "ddp", "fsdp"):
        trainer = compose_cfg("train", [f"trainer={preset}"], tmp_path, cache_dir).trainer
        assert trainer.precision == "bf16-mixed" and trainer.float32_matmul_precision == "high", preset


@pytest.mark.parametrize("device, applied", [("cuda", True), ("cpu", False)])
def test_tf32_is_switched_on_for_cuda_runs_only(device, applied, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))
    Float32MatmulPrecision("high").setup(trainer, None, "fit")
    assert calls == (["high"] if applied else [])


def test_adamw_is_fused_only_when_every_parameter_is_on_cuda():
    model = build_model(tiny_model_config("sdt"))
    optimizer = build_optimizer(model, OptimConfig())
    assert not optimizer.defaults["fused"]  # CPU: torch's default kernels
    if torch.cuda.is_available():
        assert build_optimizer(model.cuda(), OptimConfig()).defaults["fused"]


def test_a_distributed_checkpoint_reads_into_one_process_as_the_optimizer_keys_it(tmp_path):
    """The reader `evaluate.py`, export and single-process resumes use: DCP's name-keyed optimizer state comes back
    keyed by parameter index, as `torch.optim.AdamW.state_dict()` keys it, with every tensor in its place."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = build_model(tiny_model_config("sdt"))
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, 64, (2, 16))
    out = model(ids, ids)
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    path = tmp_path / "last.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP saves in this one process
        dcp.save(
            {"state_dict": model.state_dict(), "optimizer_0": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=str(path),
        )
    torch.save({"global_step": 1, "hyper_parameters": {}, "sdt": {}}, path / "meta.pt")
    assert is_sharded_checkpoint(str(path))

    ckpt = load_checkpoint(str(path))
    assert ckpt["global_step"] == 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    expected = optimizer.state_dict()
    got = ckpt["optimizer_states"][0]
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    assert got["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got["state"][i][key], state[key]), (i, key)
    fresh = build_optimizer(build_model(model.config), OptimConfig())
    fresh.load_state_dict(got)  # what Lightning does with it in a single-process resume
