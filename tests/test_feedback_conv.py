"""LocalConv2d against nn.Conv2d, the transposed convolution with B, and gradcheck."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fa_study.feedback import LocalConv2d

D64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")

CONFIGS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), dilation=2, padding=(2, 1)),
    dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=4, padding="same"),        # asymmetric 'same' padding
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=1, bias=False),
]


def _pair(method, cfg, dtype=D64, seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.Conv2d(4, 6, dtype=dtype, **cfg)
    loc = LocalConv2d(4, 6, method=method, dtype=dtype, **cfg, **kw)
    with torch.no_grad():
        loc.weight.copy_(ref.weight)
        if ref.bias is not None:
            loc.bias.copy_(ref.bias)
    return ref, loc


def _grads(layer, x, go=None):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(torch.ones_like(out) if go is None else go)
    return out, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("cfg", CONFIGS)
def test_bp_is_nn_conv2d(cfg):
    ref, loc = _pair("bp", cfg, dtype=torch.float32)
    assert isinstance(loc, nn.Conv2d)
    x = torch.randn(2, 4, 9, 8)
    for a, b in zip(_grads(ref, x), _grads(loc, x)):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("method", ["fa", "kolen_pollack", "weight_mirror"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_fa_with_b_equal_w_reproduces_bp(cfg, method):
    ref, loc = _pair(method, cfg)
    loc.set_feedback(loc.weight)
    x = torch.randn(2, 4, 9, 8, dtype=D64)
    go = torch.randn_like(ref(x))
    for a, b in zip(_grads(ref, x, go), _grads(loc, x, go)):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_unbatched_input_matches_nn_conv2d():
    ref, loc = _pair("fa", dict(kernel_size=3, padding=1))
    loc.set_feedback(loc.weight)
    x = torch.randn(4, 7, 7, dtype=D64)
    for a, b in zip(_grads(ref, x), _grads(loc, x)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_fa_input_gradient_is_transposed_conv_with_b(cfg):
    ref, loc = _pair("fa", cfg)
    B = loc.B.clone()
    x = torch.randn(2, 4, 9, 8, dtype=D64)
    out = ref(x)
    go = torch.randn_like(out)
    out_l, gx, gw, gb = _grads(loc, x, go)
    torch.testing.assert_close(out_l, out, rtol=0, atol=0)
    expected_gx = torch.nn.grad.conv2d_input(x.shape, B, go, ref.stride, ref.padding,
                                             ref.dilation, ref.groups)
    torch.testing.assert_close(gx, expected_gx, rtol=1e-12, atol=1e-12)
    _, _, gw_ref, gb_ref = _grads(ref, x, go)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-12, atol=1e-12)


def test_sign_sym_input_gradient_matches_formula():
    cfg = dict(kernel_size=3, padding=1)
    ref, loc = _pair("sign_sym", cfg)
    W = loc.weight.detach()
    B = torch.sign(W) * W.norm() / math.sqrt(W.numel())
    x = torch.randn(2, 4, 6, 6, dtype=D64)
    go = torch.randn_like(ref(x))
    _, gx, gw, _ = _grads(loc, x, go)
    torch.testing.assert_close(
        gx, torch.nn.grad.conv2d_input(x.shape, B, go, 1, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, _grads(ref, x, go)[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["bp", "fa", "sign_sym", "kolen_pollack", "weight_mirror"])
def test_gradcheck_weight_and_bias_gradients(method):
    _, loc = _pair(method, dict(kernel_size=3, stride=2, padding=1))
    x = torch.randn(2, 4, 5, 5, dtype=D64)
    w = loc.weight.detach().clone().requires_grad_(True)
    b = loc.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, b: functional_call(loc, {"weight": w, "bias": b}, (x,)), (w, b))


@pytest.mark.parametrize("method", ["bp", "fa"])
def test_gradcheck_input_gradient_with_b_equal_w(method):
    _, loc = _pair(method, dict(kernel_size=3, padding=1))
    if method == "fa":
        loc.set_feedback(loc.weight)
    x = torch.randn(1, 4, 4, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(loc, (x,))


def test_conv_rejects_direct_rules():
    with pytest.raises(ValueError, match="'dfa'.*allowed.*'bp'"):
        LocalConv2d(2, 3, 3, method="dfa")
