"""Activation checkpointing (`model.activation_checkpointing=true`): the same loss and gradients as without it for
every architecture, routed layers included (the recomputation takes the same routing decisions), and far fewer
activations kept for the backward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from sdt.models import build_model
from sdt.training.activation_checkpointing import apply_activation_checkpointing, is_checkpointed
from sdt.training.lit_module import LitLM
from tests.models.conftest import random_ids, tiny_config

CASES = {
    "dense": {"arch": "dense"},
    "mod": {"arch": "mod"},  # skip maps on (the default)
    "sdt": {"arch": "sdt"},
    "stt": {"arch": "stt", "skip_map": "linear", "student_input": "x_prev"},
    # Conversion-recipe options that change which tokens run: forced leading positions, dense ends, a soft gate.
    "sdt_recipe": {"arch": "sdt", "always_execute_first": 2, "gate_mode": "soft", "skip_map": "linear"},
    "mod_recipe": {"arch": "mod", "always_execute_first": 1, "dense_first": 1, "mod_gate": "ste"},
    # Sub-layer routing: the routed attention or MLP and the other sub-layer on every token, recomputed alike.
    "sdt_attention": {"arch": "sdt", "routed_sublayer": "attention", "skip_map": "linear"},
    "mod_mlp": {"arch": "mod", "routed_sublayer": "mlp"},
    "stt_attention": {"arch": "stt", "routed_sublayer": "attention"},
}


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(ids, ids)
    loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_layers_give_the_same_loss_and_gradients(case):
    overrides = dict(CASES[case])
    arch = overrides.pop("arch")
    torch.manual_seed(0)
    cfg = tiny_config(arch, dropout=0.1, **overrides)  # dropout: the recomputation must replay the same masks
    plain = build_model(cfg).train()
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    assert is_checkpointed(checkpointed) and not is_checkpointed(plain)
    ids = random_ids(2, 48)
    torch.manual_seed(1)
    loss, grads = loss_and_grads(plain, ids)
    torch.manual_seed(1)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, ids)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(plain.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-6, msg=name)


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (what activation checkpointing saves on)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, ids)
    (out.loss if out.aux_loss is None else out.loss + out.aux_loss).backward()
    return total


@pytest.mark.parametrize("arch", ["dense", "sdt"])
def test_checkpointing_keeps_a_fraction_of_the_activations(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, n_layers=8))
    ids = random_ids(2, 128)
    kept = saved_activation_bytes(model, ids)
    kept_ckpt = saved_activation_bytes(apply_activation_checkpointing(model), ids)
    # Only the embedding, final norm, head and loss keep theirs; each layer keeps nothing but its input.
    assert kept_ckpt < 0.2 * kept, (kept_ckpt, kept)


def test_the_config_key_checkpoints_the_trained_model_and_leaves_its_state_dict_alone():
    model = {**tiny_config("sdt").__dict__}
    optim = {"lr": 1e-3}
    on = LitLM(model={**model, "activation_checkpointing": True}, optim=optim)
    off = LitLM(model=model, optim=optim)
    assert is_checkpointed(on.model) and not is_checkpointed(off.model)
    assert on.state_dict().keys() == off.state_dict().keys()
    # Evaluation and decoding (no gradients) run the layers directly: nothing to recompute.
    with torch.no_grad():
        ids = random_ids(1, 8)
        on.model.load_state_dict(off.model.state_dict())
        assert torch.equal(on.model(ids).logits, off.model(ids).logits)


@pytest.mark.slow  # compiling a routed model: about a minute on CPU
def test_checkpointed_layers_compile_to_the_same_gradients():
    """`model.compile=true` with `model.activation_checkpointing=true`: the compiled model recomputes its layers too."""
    torch.manual_seed(0)
    plain = build_model(tiny_config("sdt", skip_map="linear")).train()
    compiled = apply_activation_checkpointing(copy.deepcopy(plain))
    compiled.compile()
    ids = random_ids(2, 32)
    _, grads = loss_and_grads(plain, ids)
    _, grads_compiled = loss_and_grads(compiled, ids)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)
