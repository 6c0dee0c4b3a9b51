"""DFA (Nøkland's, gated by f'), seed 000's ungated DFA and DFA-within-block, against the
explicit formulas written out by hand."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fa_study.diagnostics import bp_twin

from fa_study.feedback import (
    LocalLinear, capture_output_error, feedback_step, has_feedback_step, needs_output_error,
)
from fa_study.feedback.dfa import BlockErrorTap, tap_blocks, write_projection_grads
from fa_study.rules import build_rule, convert

D64 = torch.float64
ACTS = {"relu": (nn.ReLU, lambda a: (a > 0).to(a.dtype)),
        "tanh": (nn.Tanh, lambda a: 1 - torch.tanh(a) ** 2)}


def _ce_error(out, y):
    """dL/d out of the mean cross-entropy, by hand: (softmax - onehot) / N."""
    n = out.shape[0]
    return (torch.softmax(out, -1) - F.one_hot(y, out.shape[-1]).to(out.dtype)) / n


def _plain_mlp(act, bias, d_in=6, h1=9, h2=7, k=4):
    return nn.Sequential(nn.Linear(d_in, h1, bias=bias, dtype=D64), ACTS[act][0](),
                         nn.Linear(h1, h2, bias=bias, dtype=D64), ACTS[act][0](),
                         nn.Linear(h2, k, bias=bias, dtype=D64))


def _mlp(act, bias, k=4, seed=None, **options):
    """A 3-layer MLP converted to layer_dfa (``options``: gated=...), B_dfa drawn for ``k``."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    model, _ = convert(_plain_mlp(act, bias), "layer_dfa", num_classes=k, generator=g, **options)
    return model


def _direct(in_f, out_f, rule="layer_dfa", dtype=torch.float32, **options):
    """A local layer built directly (never converted: no direct feedback drawn)."""
    return LocalLinear(in_f, out_f, rule=build_rule(rule, **options), dtype=dtype)


def _converted(in_f, out_f, k, **options):
    """One nn.Linear converted on its own to layer_dfa with B_dfa drawn for ``k`` outputs."""
    layer, _ = convert(nn.Linear(in_f, out_f, dtype=D64), "layer_dfa", num_classes=k, **options)
    return layer


def _data(n=5, d_in=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=D64), torch.randint(0, k, (n,), generator=g)


# --------------------------------------------------------------------------------------------
# dfa: Nøkland's rule, input gradient e @ B_dfa, gated by f' through autograd
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_dfa_equals_the_published_gated_update(act, bias):
    torch.manual_seed(0)
    model = _mlp(act, bias, seed=1)
    assert needs_output_error(model) and not has_feedback_step(model)
    assert all(model[i].has_random_feedback for i in (0, 2, 4))  # gated: the output layer's too
    assert [model[i].B_dfa.shape for i in (0, 2, 4)] == [(4, 6), (4, 9), (4, 7)]
    x, y = _data()
    x.requires_grad_(True)
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()
    assert feedback_step(model) == {}  # nothing left to do after the backward

    # the published rule, written out
    fprime = ACTS[act][1]
    W1, W2, W3 = (model[i].weight.detach() for i in (0, 2, 4))
    b1, b2, b3 = ((model[i].bias.detach() if bias else 0.0) for i in (0, 2, 4))
    B1, B2, B3 = (model[i].B_dfa for i in (0, 2, 4))  # (K, in) of each layer
    xd = x.detach()
    a1 = xd @ W1.t() + b1
    h1 = ACTS[act][0]()(a1)
    a2 = h1 @ W2.t() + b2
    h2 = ACTS[act][0]()(a2)
    e = _ce_error(h2 @ W3.t() + b3, y)
    d2 = (e @ B3) * fprime(a2)        # hidden layer 2: (e B_2^T) * f'(a_2), B_2 held by layer 3
    d1 = (e @ B2) * fprime(a1)        # hidden layer 1: (e B_1^T) * f'(a_1), B_1 held by layer 2
    expected = {4: (e.t() @ h2, e.sum(0)), 2: (d2.t() @ h1, d2.sum(0)), 0: (d1.t() @ xd, d1.sum(0))}
    for i, (gw, gb) in expected.items():
        torch.testing.assert_close(model[i].weight.grad, gw, rtol=1e-12, atol=1e-14)
        if bias:
            torch.testing.assert_close(model[i].bias.grad, gb, rtol=1e-12, atol=1e-14)
    # the first layer's B carries the error to the data
    torch.testing.assert_close(x.grad, e @ B1, rtol=1e-12, atol=1e-14)


class TokenNet(nn.Module):
    """(batch, T, d) -> two dfa layers per token -> mean over tokens -> dfa head."""

    def __init__(self, act, bias, d=5, h=8, k=3):
        super().__init__()
        self.l1 = nn.Linear(d, h, bias=bias, dtype=D64)
        self.l2 = nn.Linear(h, h, bias=bias, dtype=D64)
        self.head = nn.Linear(h, k, bias=bias, dtype=D64)
        self.act = ACTS[act][0]()

    def forward(self, x):
        return self.head(self.act(self.l2(self.act(self.l1(x)))).mean(1))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_dfa_with_token_inputs_broadcasts_the_error_over_tokens(act, bias):
    torch.manual_seed(1)
    model, _ = convert(TokenNet(act, bias), "layer_dfa", num_classes=3,
                       generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 5, generator=g, dtype=D64)
    y = torch.randint(0, 3, (4,), generator=g)
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()

    fprime, T = ACTS[act][1], x.shape[1]
    W1, W2, W3 = model.l1.weight.detach(), model.l2.weight.detach(), model.head.weight.detach()

    def z(m):
        return m.bias.detach() if bias else 0.0

    a1 = x @ W1.t() + z(model.l1)
    h1 = model.act(a1)
    a2 = h1 @ W2.t() + z(model.l2)
    h2 = model.act(a2)
    pooled = h2.mean(1)
    e = _ce_error(pooled @ W3.t() + z(model.head), y)                          # (N, K)
    d2 = (e @ model.head.B_dfa)[:, None, :] / T * fprime(a2)  # the mean's backward: 1/T per token
    d1 = (e @ model.l2.B_dfa)[:, None, :] * fprime(a1)          # e @ B on every token
    torch.testing.assert_close(model.head.weight.grad, e.t() @ pooled, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.l2.weight.grad, torch.einsum("nto,nti->oi", d2, h1),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.l1.weight.grad, torch.einsum("nto,nti->oi", d1, x),
                               rtol=1e-12, atol=1e-14)
    if bias:
        torch.testing.assert_close(model.l1.bias.grad, d1.sum((0, 1)), rtol=1e-12, atol=1e-14)


def test_dfa_token_error_per_position_pairs_row_by_row():
    # an LM-style error (batch, T, K) pairs with the input (batch, T, in) position by position
    torch.manual_seed(0)
    layer = _converted(4, 3, 3)
    x = torch.randn(2, 5, 4, dtype=D64, requires_grad=True)
    out = layer(x)
    capture_output_error(layer, out)
    r = torch.randn(2, 5, 3, dtype=D64)
    (out * r).sum().backward()
    torch.testing.assert_close(x.grad, r @ layer.B_dfa, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(layer.weight.grad, r.reshape(-1, 3).t() @ x.detach().reshape(-1, 4))


def test_dfa_misuse_is_a_clear_error():
    torch.manual_seed(0)
    # layers built directly: no B_dfa until convert() draws it
    direct = nn.Sequential(_direct(6, 9, dtype=D64), nn.ReLU(), _direct(9, 4, dtype=D64))
    x, y = _data()
    out = direct(x)
    capture_output_error(direct, out)
    with pytest.raises(RuntimeError, match=r"no feedback matrix: convert the model with "
                                           r"fa_study.rules.convert\(model, 'layer_dfa', num_classes=...\)"):
        F.cross_entropy(out, y).backward()
    model = _mlp("relu", True)
    # no capture: the backward refuses rather than use no error, or a stale one
    out = model(x)
    with pytest.raises(RuntimeError, match=r"capture_output_error\(model, output\)"):
        F.cross_entropy(out, y).backward()
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()  # fine
    out = model(x)  # the previous batch's error is stale for this forward
    with pytest.raises(RuntimeError, match="capture_output_error"):
        F.cross_entropy(out, y).backward()
    # the error of the wrong size or shape
    model = _mlp("relu", True, k=3)  # B_dfa drawn for 3 classes, the output has 4
    out = model(x)
    capture_output_error(model, out)
    with pytest.raises(ValueError, match="the output error has last dimension 4 but B_dfa was drawn for 3"):
        F.cross_entropy(out, y).backward()
    layer = _converted(4, 3, 3)
    z = layer(torch.randn(2, 7, 4, dtype=D64, requires_grad=True)).transpose(0, 1)  # "output" (7, 2, 3)
    capture_output_error(layer, z)
    with pytest.raises(ValueError, match="does not match the layer input"):
        z.sum().backward()


@pytest.mark.parametrize("num_classes", [0, -1, 2.5])
def test_bad_num_classes_is_a_value_error(num_classes):
    with pytest.raises(ValueError, match=f"num_classes.*{num_classes}"):
        convert(_plain_mlp("relu", True), "layer_dfa", num_classes=num_classes)


def test_capture_output_error_records_dl_dout_and_is_harmless_elsewhere():
    torch.manual_seed(0)
    model = _mlp("tanh", True)
    holder = model[0]._output_error
    assert all(model[i]._output_error is holder for i in (2, 4))  # one holder, shared
    x, y = _data()
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()
    torch.testing.assert_close(holder.error, _ce_error(out.detach(), y), rtol=1e-12, atol=1e-14)
    # models without such layers: nothing to do
    plain = nn.Sequential(_direct(3, 2, "layer_fa"))
    assert capture_output_error(plain, plain(torch.randn(2, 3))) is None
    assert not needs_output_error(plain)
    with torch.no_grad():
        out = model(x)
    with pytest.raises(ValueError, match="with gradients"):
        capture_output_error(model, out)


def test_dfa_copy_has_its_own_empty_holder():
    torch.manual_seed(0)
    model = _mlp("relu", True)
    x, y = _data()
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()
    twin = copy.deepcopy(model)
    h = twin[0]._output_error
    assert h is not model[0]._output_error and h.error is None
    assert twin[2]._output_error is h and twin[4]._output_error is h
    assert torch.equal(twin[2].B_dfa, model[2].B_dfa)


# --------------------------------------------------------------------------------------------
# dfa_ungated: seed 000's post-backward overwrite
# --------------------------------------------------------------------------------------------

class Blocky(nn.Module):
    """embed -> two residual blocks (each returns its branch) -> head; ``width`` the blocks' d."""

    def __init__(self, d_in=6, d=8, n_out=3):
        super().__init__()
        self.width = d
        self.embed = nn.Linear(d_in, d, dtype=D64)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d, dtype=D64), nn.Tanh(), nn.Linear(d, d, dtype=D64))
            for _ in range(2))
        self.head = nn.Linear(d, n_out, dtype=D64)

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


def _run(model, x, y, capture=False):
    out = model(x)
    out.retain_grad()
    if capture:
        capture_output_error(model, out)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return out


@pytest.mark.parametrize("source", ["captured", "explicit"])
def test_dfa_ungated_update_equals_explicit_outer_product(source):
    torch.manual_seed(0)
    model, _ = convert(Blocky(), "layer_dfa", gated=False, num_classes=3,
                       generator=torch.Generator().manual_seed(1))
    assert needs_output_error(model) and has_feedback_step(model)
    random = {n: m.has_random_feedback for n, m in model.named_modules() if isinstance(m, LocalLinear)}
    assert random == {"embed": True, "blocks.0.0": True, "blocks.0.2": True,
                      "blocks.1.0": True, "blocks.1.2": True, "head": False}
    assert model.embed.B_dfa.shape == (8, 3)
    torch.testing.assert_close(model.head.B_dfa, torch.eye(3, dtype=D64))
    inputs = _record_inputs(model)
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    out = _run(model, x, y, capture=source == "captured")
    e = _ce_error(out.detach(), y)
    torch.testing.assert_close(out.grad, e)
    counts = feedback_step(model) if source == "captured" else feedback_step(model, e=e)
    assert counts == {"layer_dfa": 6}
    for name, m in model.named_modules():
        if isinstance(m, LocalLinear):
            delta = e @ m.B_dfa.t()
            torch.testing.assert_close(m.weight.grad, delta.t() @ inputs[name], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m.bias.grad, delta.sum(0), rtol=1e-12, atol=1e-12)
    # the output layer receives e itself: its update is its BP gradient
    torch.testing.assert_close(model.head.weight.grad, e.t() @ inputs["head"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_gated_and_ungated_differ_on_a_hidden_layer_by_f_prime_only(act):
    # Give the ungated hidden layer the very projection the gated rule uses for it
    # (B_dfa = B^T of the layer above): the updates then differ exactly by the f' gating.
    torch.manual_seed(0)
    plain = _plain_mlp(act, True)
    gated, _ = convert(copy.deepcopy(plain), "layer_dfa", num_classes=4,
                       generator=torch.Generator().manual_seed(5))
    ungated, _ = convert(copy.deepcopy(plain), "layer_dfa", gated=False, num_classes=4)
    ungated[0].B_dfa = gated[2].B_dfa.t().clone()  # (h1, K)
    x, y = _data()
    for model in (gated, ungated):
        out = model(x)
        capture_output_error(model, out)
        F.cross_entropy(out, y).backward()
        feedback_step(model)
    a1 = x @ gated[0].weight.detach().t() + gated[0].bias.detach()
    with torch.no_grad():
        e = _ce_error(gated(x), y)
    delta = e @ gated[2].B_dfa
    torch.testing.assert_close(ungated[0].weight.grad, delta.t() @ x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gated[0].weight.grad, (delta * ACTS[act][1](a1)).t() @ x,
                               rtol=1e-12, atol=1e-14)
    gap = (gated[0].weight.grad - ungated[0].weight.grad).norm() / ungated[0].weight.grad.norm()
    assert gap > 0.05
    # the output layers agree: both get the BP gradient there
    torch.testing.assert_close(gated[4].weight.grad, ungated[4].weight.grad, rtol=1e-12, atol=1e-14)


def test_dfa_ungated_without_a_layer_of_the_class_count_has_no_identity_layer():
    torch.manual_seed(0)
    model, _ = convert(Blocky(n_out=3), "layer_dfa", gated=False, num_classes=5)
    assert all(m.has_random_feedback for m in model.modules() if isinstance(m, LocalLinear))
    assert model.head.B_dfa.shape == (3, 5)
    # gated: every layer's B_dfa maps the error to its input, the output layer's included
    gated, _ = convert(Blocky(n_out=3), "layer_dfa", num_classes=3)
    assert gated.head.has_random_feedback and gated.head.B_dfa.shape == (3, 8)


def test_dfa_ungated_with_token_inputs_and_per_sample_error():
    # x (batch, T, in) with e (batch, V): every token of a sample gets the sample's error.
    torch.manual_seed(0)
    layer = _converted(4, 5, 3, gated=False)
    x = torch.randn(2, 7, 4, dtype=D64)
    layer(x).sum().backward()
    e = torch.randn(2, 3, dtype=D64)
    assert layer.feedback_step(e=e)
    delta = e @ layer.B_dfa.t()  # (2, 5)
    expected = torch.einsum("bo,bti->oi", delta, x)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, 7 * delta.sum(0), rtol=1e-12, atol=1e-12)


def test_dfa_ungated_rejects_mismatched_error_shapes():
    layer = _converted(4, 5, 3, gated=False)
    layer(torch.randn(2, 7, 4, dtype=D64)).sum().backward()
    with pytest.raises(ValueError, match="does not match"):
        layer.feedback_step(e=torch.randn(3, 3, dtype=D64))
    layer(torch.randn(2, 4, dtype=D64)).sum().backward()
    with pytest.raises(ValueError, match=r"last dimension 4 but the layer's feedback matrix \(5, 3\) "
                                         "was drawn for 3"):
        layer.feedback_step(e=torch.randn(2, 4, dtype=D64))


@pytest.mark.parametrize("rule, options", [("layer_dfa", {"gated": False}), ("layer_dfa_block", {})])
def test_a_direct_layer_never_converted_names_convert(rule, options):
    # built directly, the layer has no direct feedback drawn (and no block): its post-backward
    # step must say so, not crash on a None matrix or silently keep BP's gradient
    direct = nn.Sequential(_direct(6, 3, rule, dtype=D64, **options))
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    out = _run(direct, x, y)
    with pytest.raises(RuntimeError, match=rf"fa_study.rules.convert\(model, '{rule}'"):
        feedback_step(direct, e=out.grad)


def test_dfa_ungated_misuse_raises_runtime_error_naming_the_call():
    torch.manual_seed(0)
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    model, _ = convert(Blocky(), "layer_dfa", gated=False, num_classes=3)
    out = _run(model, x, y)
    with pytest.raises(RuntimeError, match="capture_output_error.*or pass e="):
        feedback_step(model)
    feedback_step(model, e=out.grad)
    with pytest.raises(RuntimeError, match="no cached input"):  # the cache is used once
        feedback_step(model, e=out.grad)
    # a capture from an earlier batch is stale for a new forward
    _run(model, x, y, capture=True)
    feedback_step(model)
    _run(model, x, y)
    with pytest.raises(RuntimeError, match="capture_output_error"):
        feedback_step(model)


# --------------------------------------------------------------------------------------------
# dfa_block
# --------------------------------------------------------------------------------------------

def test_dfa_block_uses_error_at_block_output():
    torch.manual_seed(0)
    model, report = convert(Blocky(), "layer_dfa_block", generator=torch.Generator().manual_seed(2))
    assert set(report.method) == {"layer_dfa_block"}
    bp = bp_twin(model).model
    assert not any(isinstance(m, LocalLinear) for m in bp.modules())  # the twin is plain nn.Linear
    assignment = {n: (m._block_tap and m._block_tap.index) for n, m in model.named_modules()
                  if isinstance(m, LocalLinear)}
    assert assignment == {"embed": None, "blocks.0.0": 0, "blocks.0.2": 0, "blocks.1.0": 1,
                          "blocks.1.2": 1, "head": None}
    assert model.embed.B_dfa_block is None and model.blocks[0][2].B_dfa_block.shape == (8, 8)
    assert not needs_output_error(model) and has_feedback_step(model)
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
    assert feedback_step(model) == {"layer_dfa_block": 4}
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
    x, y = torch.randn(5, 6, dtype=D64), torch.tensor([0, 1, 2, 1, 0])
    model, _ = convert(Blocky(), "layer_dfa_block")
    _run(model, x, y)
    feedback_step(model)
    with pytest.raises(RuntimeError, match="no gradient reached the output of block 0.*loss.backward"):
        feedback_step(model)  # the block errors are used once
    tap_blocks(model.blocks)  # again: replaces, does not stack hooks
    assert sum(len(b._forward_hooks) for b in model.blocks) == 2
    assert all(isinstance(h, BlockErrorTap) for b in model.blocks for h in b._forward_hooks.values())
    inputs = _record_inputs(model)
    _run(model, x, y)
    err = torch.randn(5, 8, dtype=D64)
    m = model.blocks[1][2]
    write_projection_grads(m, err, m.B_dfa_block, mean=True)
    delta = err @ m.B_dfa_block.t()
    torch.testing.assert_close(m.weight.grad, delta.t() @ inputs["blocks.1.2"] / 5)
    m = model.blocks[0][0]
    with pytest.raises(ValueError, match=r"last dimension 3 but the layer's feedback matrix \(8, 8\)"):
        write_projection_grads(m, torch.randn(5, 3, dtype=D64), m.B_dfa_block, mean=True)
    with pytest.raises(ValueError, match="'layer_dfa_block' cannot train Sequential.*blocks with a width"):
        convert(nn.Sequential(nn.Linear(2, 2)), "layer_dfa_block")


def test_dfa_ungated_auto_output_layer_is_the_last_layer_of_the_target_size():
    """Ungated layer_dfa gives B_dfa = I to the layer that produces the output: the LAST layer
    whose out_features equal num_classes, not an earlier hidden layer of the same width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, dtype=D64), nn.ReLU(), nn.Linear(4, 4, dtype=D64), nn.ReLU(),
                          nn.Linear(4, 4, dtype=D64))
    model, _ = convert(model, "layer_dfa", gated=False, num_classes=4,
                       generator=torch.Generator().manual_seed(1))
    assert [model[i].has_random_feedback for i in (0, 2, 4)] == [True, True, False]
    torch.testing.assert_close(model[4].B_dfa, torch.eye(4, dtype=D64))


def test_dfa_block_per_sample_error_on_tokens_is_the_error_repeated_over_positions():
    """A (batch, d_block) block error for (batch, T, in) inputs: the gradients are the means over
    all batch * T rows, exactly as if the error had been repeated along the tokens:
    grad_W = sum_{n,t} delta_n x_{n,t}^T / (N T), grad_b = sum_{n,t} delta_n / (N T)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.width = 8
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 5, dtype=D64))])
    model, _ = convert(model, "layer_dfa_block", generator=torch.Generator().manual_seed(2))
    layer = model.blocks[0][0]
    x = torch.randn(4, 3, 6, dtype=D64)
    err = torch.randn(4, 8, dtype=D64)

    def grads(block_error):
        layer(x).sum().backward()  # caches the input
        write_projection_grads(layer, block_error, layer.B_dfa_block, mean=True)
        return layer.weight.grad.clone(), layer.bias.grad.clone()

    gw, gb = grads(err)
    gw_rep, gb_rep = grads(err[:, None, :].expand(4, 3, 8))
    torch.testing.assert_close(gw, gw_rep, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gb, gb_rep, rtol=1e-12, atol=1e-14)
    delta = err @ layer.B_dfa_block.t()  # (N, out)
    torch.testing.assert_close(gw, torch.einsum("no,nti->oi", delta, x) / 12, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gb, 3 * delta.sum(0) / 12, rtol=1e-12, atol=1e-14)
