"""Routed execution and gates: gather/scatter per sequence equals a masked reference, forward and backward."""

import pytest
import torch

from sdt.blocks.layers import Block, RotaryEmbedding
from sdt.routing import apply_gate, gather_tokens, indices_to_mask, run_routed_block, scatter_tokens, topk_indices
from tests.conftest import TINY_DIMS, tiny_model_config

B, T, D = 3, 10, TINY_DIMS["d_model"]


@pytest.fixture
def block_and_rope():
    torch.manual_seed(0)
    cfg = tiny_model_config()
    return Block(cfg), RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)


def inputs(k: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    gate = torch.rand(B, T, generator=g)
    idx = topk_indices(torch.rand(B, T, generator=g), k)
    positions = torch.arange(T).expand(B, T)
    return x, gate, idx, positions


def test_gather_and_scatter():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    idx = torch.tensor([[1, 4], [0, 2]])
    sel = gather_tokens(x, idx)
    assert torch.equal(sel[0], x[0, [1, 4]]) and torch.equal(sel[1], x[1, [0, 2]])
    y = scatter_tokens(x, idx, -sel)
    assert torch.equal(x, torch.arange(30, dtype=torch.float32).view(2, 5, 3))  # out of place
    assert torch.equal(y[0, [1, 4]], -x[0, [1, 4]]) and torch.equal(y[1, [0, 2]], -x[1, [0, 2]])
    assert torch.equal(y[0, [0, 2, 3]], x[0, [0, 2, 3]]) and torch.equal(y[1, [1, 3, 4]], x[1, [1, 3, 4]])


def test_ste_gate_forward_is_exactly_the_update_whatever_g():
    torch.manual_seed(0)
    f = torch.randn(2, 500, 8)
    for _ in range(5):
        g = torch.rand(2, 500)
        assert torch.equal(apply_gate(f, g, "ste"), f)  # bitwise: (1 + g) - g is not always 1 in floating point


def test_gate_gradients_and_soft_scaling():
    torch.manual_seed(0)
    f = torch.randn(2, 4, 8, requires_grad=True)
    g = torch.rand(2, 4, requires_grad=True)
    w = torch.randn(2, 4, 8)
    (apply_gate(f, g, "ste") * w).sum().backward()
    torch.testing.assert_close(g.grad, (w * f.detach()).sum(-1))  # straight-through: d out / d g = f
    torch.testing.assert_close(f.grad, w)  # and the update itself is passed through unscaled
    f.grad, g.grad = None, None
    out = apply_gate(f, g, "soft")
    torch.testing.assert_close(out, g.detach()[..., None] * f.detach())
    (out * w).sum().backward()
    torch.testing.assert_close(g.grad, (w * f.detach()).sum(-1))
    torch.testing.assert_close(f.grad, w * g.detach()[..., None])
    with pytest.raises(ValueError, match="gate mode"):
        apply_gate(f, g, "hard")


def masked_reference(block, rope, x, positions, gate, mask, mode):
    """The block on every token, with keys restricted to the selected tokens; selected rows get x + gate(f)."""
    y = block(x, positions, rope, pad_mask=mask)
    f = y - x
    if mode == "ste":
        upd = f + f * (gate - gate.detach())[..., None]
    else:
        upd = gate[..., None] * f
    return torch.where(mask[..., None], x + upd, x)


@pytest.mark.parametrize("mode", ["ste", "soft"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_routed_block_equals_masked_reference_forward_and_backward(block_and_rope, mode, k):
    block, rope = block_and_rope
    x, gate, idx, positions = inputs(k)
    mask = indices_to_mask(idx, T)
    w = torch.randn(B, T, D)

    def run(fn):
        block.zero_grad()
        xx, gg = x.clone().requires_grad_(), gate.clone().requires_grad_()
        out = fn(xx, gg)
        (out * w).sum().backward()
        return out.detach(), xx.grad, gg.grad, {n: p.grad.clone() for n, p in block.named_parameters()}

    out, gx, gg, gp = run(lambda xx, gg: run_routed_block(block, xx, positions, rope, idx, gg, mode))
    ref, rgx, rgg, rgp = run(lambda xx, gg: masked_reference(block, rope, xx, positions, gg, mask, mode))
    tol = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(out, ref, **tol)
    assert torch.equal(out[~mask], x[~mask])  # skipped tokens keep their input exactly
    torch.testing.assert_close(gx, rgx, **tol)
    torch.testing.assert_close(gg, rgg, **tol)
    assert (gg[~mask] == 0).all() and (gg[mask] != 0).all()  # the router learns through selected tokens only
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], **tol, msg=name)


def test_routed_block_keeps_original_rope_positions(block_and_rope):
    block, rope = block_and_rope
    x, _, _, positions = inputs()
    idx = torch.tensor([[0, 3, 4, 9], [1, 2, 6, 8], [0, 5, 7, 9]])  # gaps: relative distances change if renumbered
    out = run_routed_block(block, x, positions, rope, idx, None, "ste")
    x_sel = gather_tokens(x, idx)
    right = block(x_sel, idx, rope)  # the tokens' original positions
    wrong = block(x_sel, torch.arange(4).expand(B, 4), rope)  # positions 0..k-1 within the subset
    torch.testing.assert_close(gather_tokens(out, idx), right)
    assert (gather_tokens(out, idx) - wrong).abs().max() > 1e-3
    # Offset positions (e.g. a continuation after a prompt) are honoured too.
    out_offset = run_routed_block(block, x, positions + 7, rope, idx, None, "ste")
    torch.testing.assert_close(gather_tokens(out_offset, idx), block(x_sel, idx + 7, rope))


def test_rows_do_not_attend_across_sequences(block_and_rope):
    block, rope = block_and_rope
    x, gate, idx, positions = inputs()
    changed = x.clone()
    changed[1] = torch.randn(T, D)
    a = run_routed_block(block, x, positions, rope, idx, gate, "ste")
    b = run_routed_block(block, changed, positions, rope, idx, gate, "ste")
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], atol=1e-6, rtol=1e-6)
    assert (a[1] - b[1]).abs().max() > 1e-2


def test_invalid_slots_neither_attend_nor_change(block_and_rope):
    block, rope = block_and_rope
    x, gate, _, positions = inputs()
    idx = torch.tensor([[1, 4, 6, 8]] * B)
    valid = torch.tensor([[True, False, True, True]] * B)
    out = run_routed_block(block, x, positions, rope, idx, gate, "ste", valid_BK=valid)
    only_valid = run_routed_block(block, x, positions, rope, idx[:, [0, 2, 3]], gate, "ste")
    torch.testing.assert_close(out, only_valid, atol=1e-5, rtol=1e-4)
    assert torch.equal(out[:, 4], x[:, 4])


def test_full_context_selected_rows_equal_the_dense_block(block_and_rope):
    block, rope = block_and_rope
    x, _, idx, positions = inputs()
    mask = indices_to_mask(idx, T)
    full = run_routed_block(block, x, positions, rope, idx, None, "ste", full_context=True)
    dense = block(x, positions, rope)  # each query attends to every earlier token
    torch.testing.assert_close(full[mask], dense[mask], atol=1e-5, rtol=1e-4)
    assert torch.equal(full[~mask], x[~mask])
    selected = run_routed_block(block, x, positions, rope, idx, None, "ste")
    assert (full - selected).abs().max() > 1e-3
