"""DFA and DFA-within-block updates against the explicit outer products."""
import copy

import pytest
import torch
from torch import nn

from fa_study.feedback import (
    LocalLinear, apply_dfa_block_update, apply_dfa_update, feedback_step,
    initialize_dfa_block_targets, initialize_dfa_targets, needs_output_error,
)

D64 = torch.float64


class Blocky(nn.Module):
    """embed -> two residual blocks (each returns its branch) -> head."""

    def __init__(self, method, d_in=6, d=8, n_out=3):
        super().__init__()
        self.embed = LocalLinear(d_in, d, method=method, dtype=D64)
        self.blocks = nn.ModuleList(
            nn.Sequential(LocalLinear(d, d, method=method, dtype=D64), nn.Tanh(),
                          LocalLinear(d, d, method=method, dtype=D64)) for _ in range(2))
        self.head = LocalLinear(d, n_out, method=method, dtype=D64)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _record_inputs(model):
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, LocalLinear):
            m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0].detach()))
    return seen


def _run(model, x, y):
    out = model(x)
    out.retain_grad()
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return out


def test_dfa_update_equals_explicit_outer_product():
    torch.manual_seed(0)
    model = Blocky("dfa")
    assert needs_output_error(model)
    kinds = initialize_dfa_targets(model, 3, generator=torch.Generator().manual_seed(1))
    assert kinds == {"embed": "random", "blocks.0.0": "random", "blocks.0.2": "random",
                     "blocks.1.0": "random", "blocks.1.2": "random", "head": "identity"}
    inputs = _record_inputs(model)
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    out = _run(model, x, y)
    e = out.grad
    assert feedback_step(model, e=e) == {"dfa": 6}
    for name, m in model.named_modules():
        if isinstance(m, LocalLinear):
            delta = e @ m.B_dfa.t()
            torch.testing.assert_close(m.weight.grad, delta.t() @ inputs[name], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m.bias.grad, delta.sum(0), rtol=1e-12, atol=1e-12)
    # the output layer receives e itself: its update is its BP gradient
    torch.testing.assert_close(model.head.weight.grad, e.t() @ inputs["head"], rtol=1e-12, atol=1e-12)


def test_dfa_output_layer_choice():
    torch.manual_seed(0)
    model = Blocky("dfa")
    assert set(initialize_dfa_targets(model, 3, output_layer=None).values()) == {"random"}
    assert initialize_dfa_targets(model, 3, output_layer="head")["head"] == "identity"
    with pytest.raises(ValueError, match="'nope'.*allowed.*'head'"):
        initialize_dfa_targets(model, 3, output_layer="nope")
    with pytest.raises(ValueError, match="target_dim"):
        initialize_dfa_targets(model, 3, output_layer="embed")


def test_dfa_with_token_inputs_and_per_sample_error():
    # x (batch, T, in) with e (batch, V): every token of a sample gets the sample's error.
    torch.manual_seed(0)
    layer = LocalLinear(4, 5, method="dfa", dtype=D64)
    initialize_dfa_targets(layer, 3)
    x = torch.randn(2, 7, 4, dtype=D64)
    layer(x).sum().backward()
    e = torch.randn(2, 3, dtype=D64)
    apply_dfa_update(layer, e)
    delta = e @ layer.B_dfa.t()  # (2, 5)
    expected = torch.einsum("bo,bti->oi", delta, x)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, 7 * delta.sum(0), rtol=1e-12, atol=1e-12)


def test_dfa_rejects_mismatched_error_shapes():
    layer = LocalLinear(4, 5, method="dfa")
    initialize_dfa_targets(layer, 3)
    layer(torch.randn(2, 7, 4)).sum().backward()
    with pytest.raises(ValueError, match="does not match"):
        apply_dfa_update(layer, torch.randn(3, 3))
    layer(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="target_dim=3"):
        apply_dfa_update(layer, torch.randn(2, 4))


def test_dfa_misuse_raises_runtime_error_naming_the_call():
    torch.manual_seed(0)
    model = Blocky("dfa")
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    out = _run(model, x, y)
    with pytest.raises(RuntimeError, match=r"initialize_dfa_targets\(model, target_dim\)"):
        apply_dfa_update(model, out.grad)
    initialize_dfa_targets(model, 3)
    with pytest.raises(RuntimeError, match="pass e="):
        feedback_step(model)
    feedback_step(model, e=out.grad)
    with pytest.raises(RuntimeError, match="no cached input"):  # the cache is used once
        feedback_step(model, e=out.grad)


def test_dfa_block_uses_error_at_block_output():
    torch.manual_seed(0)
    model = Blocky("dfa_block")
    bp = copy.deepcopy(model)
    for m in bp.modules():
        if isinstance(m, LocalLinear):
            m.method = "bp"
    assignment = initialize_dfa_block_targets(model, 8, generator=torch.Generator().manual_seed(2))
    assert assignment == {"embed": None, "blocks.0.0": 0, "blocks.0.2": 0, "blocks.1.0": 1,
                          "blocks.1.2": 1, "head": None}
    inputs = _record_inputs(model)
    # Reference block errors: retain the gradient at each block's output on the BP twin.
    outs = []

    def keep(mod, inp, out):
        out.retain_grad()
        outs.append(out)

    for block in bp.blocks:
        block.register_forward_hook(keep)
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    _run(bp, x, y)
    _run(model, x, y)
    assert feedback_step(model) == {"dfa_block": 4}
    for i, block in enumerate(model.blocks):
        err = outs[i].grad
        for j in (0, 2):
            m = block[j]
            delta = err @ m.B_dfa_block.t()
            name = f"blocks.{i}.{j}"
            torch.testing.assert_close(m.weight.grad, delta.t() @ inputs[name] / 5, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m.bias.grad, delta.mean(0), rtol=1e-12, atol=1e-12)
    # layers outside every block keep the BP gradient of their ordinary backward
    torch.testing.assert_close(model.head.weight.grad, bp.head.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.embed.weight.grad, bp.embed.weight.grad, rtol=1e-12, atol=1e-12)


def test_dfa_block_explicit_update_and_misuse():
    torch.manual_seed(0)
    model = Blocky("dfa_block")
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    _run(model, x, y)
    with pytest.raises(RuntimeError, match=r"initialize_dfa_block_targets\(model, d_block\)"):
        feedback_step(model)
    with pytest.raises(RuntimeError, match="initialize_dfa_block_targets"):
        apply_dfa_block_update(model.blocks[0], torch.randn(5, 8, dtype=D64))
    initialize_dfa_block_targets(model, 8)
    initialize_dfa_block_targets(model, 8)  # again: replaces, does not stack hooks
    assert sum(len(b._forward_hooks) for b in model.blocks) == 2
    inputs = _record_inputs(model)
    _run(model, x, y)
    err = torch.randn(5, 8, dtype=D64)
    assert apply_dfa_block_update(model.blocks[1], err) == 2
    m = model.blocks[1][2]
    delta = err @ m.B_dfa_block.t()
    torch.testing.assert_close(m.weight.grad, delta.t() @ inputs["blocks.1.2"] / 5)
    with pytest.raises(ValueError, match="d_block=8"):
        apply_dfa_block_update(model.blocks[0], torch.randn(5, 3, dtype=D64))
    with pytest.raises(ValueError, match="no .blocks"):
        initialize_dfa_block_targets(nn.Sequential(LocalLinear(2, 2, method="dfa_block")), 2)
