"""frsf / brsf (Liao et al. 2016): input gradient through |M| * sign(W), M fixed / per batch."""
import copy
import math

import pytest
import torch
from torch import nn

from fa_study.feedback import LocalLinear
from fa_study.rules import build_rule

D64 = torch.float64


def _layer(in_f, out_f, rule, dtype=None, generator=None, **options):
    return LocalLinear(in_f, out_f, rule=build_rule(rule, **options), dtype=dtype, generator=generator)


def _input_grad(layer, x, go):
    x = x.clone().requires_grad_(True)
    layer(x).backward(go)
    return x.grad


@pytest.mark.parametrize("rule", ["frsf", "brsf"])
def test_input_gradient_is_grad_out_times_abs_m_sign_w(rule):
    torch.manual_seed(0)
    ref = nn.Linear(6, 4, dtype=D64)
    layer = _layer(6, 4, rule, dtype=D64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    x, go = torch.randn(2, 3, 6, dtype=D64), torch.randn(2, 3, 4, dtype=D64)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    out.backward(go)
    W = layer.weight.detach()
    B = layer.B_abs * torch.sign(W)  # the magnitude this forward used, W's signs
    assert (layer.B_abs >= 0).all()
    torch.testing.assert_close(xg.grad, go @ B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.feedback_matrix(), B)
    assert torch.equal(torch.sign(layer.feedback_matrix()), torch.sign(W))
    assert not torch.allclose(B, W)
    # weight and bias gradients are BP's
    torch.testing.assert_close(layer.weight.grad, go.reshape(-1, 4).t() @ x.reshape(-1, 6))
    torch.testing.assert_close(layer.bias.grad, go.reshape(-1, 4).sum(0))
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


def test_frsf_magnitude_is_fixed_and_follows_the_signs_of_w():
    torch.manual_seed(0)
    layer = _layer(5, 3, "frsf", dtype=D64)
    M = layer.B_abs.clone()
    x, go = torch.randn(4, 5, dtype=D64), torch.randn(4, 3, dtype=D64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        gx = _input_grad(layer, x, go)
        torch.testing.assert_close(gx, go @ (M * torch.sign(layer.weight.detach())),
                                   rtol=1e-12, atol=1e-12)
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.B_abs, M)
    before = go @ (M * torch.sign(layer.weight.detach()))
    with torch.no_grad():
        layer.weight.neg_()  # every sign flips; the backward follows at once
    torch.testing.assert_close(_input_grad(layer, x, go), -before, rtol=1e-12, atol=1e-12)


def test_brsf_redraws_every_batch_reproducibly():
    torch.manual_seed(0)

    def make():
        return _layer(5, 3, "brsf", dtype=D64, init_std=0.1, generator=torch.Generator().manual_seed(7))

    a, b = make(), make()
    assert torch.equal(a.B_abs, b.B_abs)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    x, go = torch.randn(4, 5, dtype=D64), torch.randn(4, 3, dtype=D64)
    seen = []
    for _ in range(3):
        gx = _input_grad(a, x, go)
        torch.testing.assert_close(gx, go @ (a.B_abs * torch.sign(a.weight.detach())),
                                   rtol=1e-12, atol=1e-12)
        _input_grad(b, x, go)
        assert torch.equal(a.B_abs, b.B_abs)  # the same stream from the same seed
        assert torch.equal(torch.sign(a.feedback_matrix()), torch.sign(a.weight.detach()))
        seen.append(a.B_abs.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    # a copy continues the same stream
    c = copy.deepcopy(a)
    _input_grad(a, x, go)
    _input_grad(c, x, go)
    assert torch.equal(a.B_abs, c.B_abs)
    # another seed, another stream
    d = _layer(5, 3, "brsf", dtype=D64, init_std=0.1, generator=torch.Generator().manual_seed(8))
    _input_grad(d, x, go)
    assert not torch.equal(d.B_abs, a.B_abs)


def test_brsf_layer_called_twice_keeps_each_calls_draw():
    torch.manual_seed(0)
    layer = _layer(4, 4, "brsf", dtype=D64)
    x = torch.randn(3, 4, dtype=D64, requires_grad=True)
    h = layer(x)
    B1 = layer.B_abs * torch.sign(layer.weight.detach())
    out = layer(torch.tanh(h))
    B2 = layer.B_abs * torch.sign(layer.weight.detach())
    go = torch.randn(3, 4, dtype=D64)
    out.backward(go)
    expected = ((go @ B2) * (1 - torch.tanh(h.detach()) ** 2)) @ B1
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["frsf", "brsf"])
def test_magnitude_scale_matches_w_rms_by_default_and_init_std_when_given(rule):
    torch.manual_seed(0)
    layer = _layer(256, 128, rule)
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()  # brsf: a fresh draw at the same scale
    ratio = float(layer.feedback_matrix().norm() / layer.weight.detach().norm())
    assert 0.97 < ratio < 1.03  # E|M|^2 = std^2 = RMS(W)^2
    layer = _layer(256, 128, rule, init_std=0.05)
    layer(x).sum().backward()
    rms = float(layer.B_abs.norm() / math.sqrt(layer.B_abs.numel()))
    assert rms == pytest.approx(0.05, rel=0.03)


@pytest.mark.parametrize("rule", ["frsf", "brsf"])
def test_sign_concordant_magnitudes_are_gaussian_and_take_only_init_std(rule):
    # M is |N(0, std^2)|: no init mode (a sparse M would zero feedback entries W has)
    layer = _layer(64, 8, rule, init_std=0.1, generator=torch.Generator().manual_seed(0))
    assert (layer.B_abs != 0).all()
    with pytest.raises(ValueError, match=f"rule '{rule}' has no option 'init'; allowed options: 'init_std'"):
        build_rule(rule, init="sparse")
