"""LocalConv2d against nn.Conv2d, the transposed convolution with B, and gradcheck."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fa_study.feedback import LocalConv2d, capture_output_error
from fa_study.rules import LAYER_RULES, build_rule, convert

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


CONV_RULES = [cls.name for cls in LAYER_RULES if build_rule(cls.name).has_conv_form]


def _pair(rule, cfg, dtype=D64, seed=0, **options):
    torch.manual_seed(seed)
    ref = nn.Conv2d(4, 6, dtype=dtype, **cfg)
    loc = LocalConv2d(4, 6, rule=build_rule(rule, **options), dtype=dtype, **cfg)
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


def _dfa_pair(cfg, classes, seed=1):
    """A plain conv and its copy converted to gated layer_dfa (B_dfa drawn by convert)."""
    ref, _ = _pair("layer_fa", cfg)
    loc, report = convert(copy.deepcopy(ref), "layer_dfa", num_classes=classes,
                          generator=torch.Generator().manual_seed(seed))
    assert isinstance(loc, LocalConv2d) and list(report.action) == ["converted"]
    return ref, loc


@pytest.mark.parametrize("cfg", CONFIGS)
def test_local_conv_is_an_nn_conv2d_with_the_same_forward(cfg):
    # BP convolutions stay plain nn.Conv2d; a local one's forward and weight gradient are theirs
    ref, loc = _pair("layer_fa", cfg, dtype=torch.float32)
    assert isinstance(loc, nn.Conv2d)
    x = torch.randn(2, 4, 9, 8)
    (out_r, _, gw_r, gb_r), (out_l, _, gw_l, gb_l) = _grads(ref, x), _grads(loc, x)
    assert torch.equal(out_r, out_l)
    torch.testing.assert_close(gw_l, gw_r)
    assert (gb_r is None and gb_l is None) or torch.allclose(gb_l, gb_r)


@pytest.mark.parametrize("rule", ["layer_fa", "layer_grape", "kolen_pollack", "weight_mirror"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_fa_with_b_equal_w_reproduces_bp(cfg, rule):
    ref, loc = _pair(rule, cfg)
    loc.set_feedback(loc.weight)
    x = torch.randn(2, 4, 9, 8, dtype=D64)
    go = torch.randn_like(ref(x))
    for a, b in zip(_grads(ref, x, go), _grads(loc, x, go)):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_unbatched_input_matches_nn_conv2d():
    ref, loc = _pair("layer_fa", dict(kernel_size=3, padding=1))
    loc.set_feedback(loc.weight)
    x = torch.randn(4, 7, 7, dtype=D64)
    for a, b in zip(_grads(ref, x), _grads(loc, x)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_fa_input_gradient_is_transposed_conv_with_b(cfg):
    ref, loc = _pair("layer_fa", cfg)
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


def test_conv_rules_are_every_rule_but_the_post_backward_direct_ones():
    assert CONV_RULES == ["layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack",
                          "weight_mirror", "layer_dfa"]


@pytest.mark.parametrize("rule", CONV_RULES)
def test_gradcheck_weight_and_bias_gradients(rule):
    _, loc = _pair(rule, dict(kernel_size=3, stride=2, padding=1))
    x = torch.randn(2, 4, 5, 5, dtype=D64)
    w = loc.weight.detach().clone().requires_grad_(True)
    b = loc.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, b: functional_call(loc, {"weight": w, "bias": b}, (x,)), (w, b))


@pytest.mark.parametrize("rule", ["layer_fa", "kolen_pollack"])
def test_gradcheck_input_gradient_with_b_equal_w(rule):
    _, loc = _pair(rule, dict(kernel_size=3, padding=1))
    loc.set_feedback(loc.weight)
    x = torch.randn(1, 4, 4, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(loc, (x,))


@pytest.mark.parametrize("rule, options", [("layer_dfa", {"gated": False}), ("layer_dfa_block", {})])
def test_conv_rejects_post_backward_direct_rules(rule, options):
    with pytest.raises(ValueError, match=f"rule '{rule}' has no Conv2d form.*has_conv_form"):
        LocalConv2d(2, 3, 3, rule=build_rule(rule, **options))
    with pytest.raises(ValueError, match=f"rule '{rule}' has no Conv2d form"):
        LocalConv2d.from_conv(nn.Conv2d(2, 3, 3), build_rule(rule, **options))


def test_conv_sizes_are_checked():
    with pytest.raises(ValueError, match="LocalConv2d in_channels must be an integer >= 1"):
        LocalConv2d(0, 3, 3, rule=build_rule("layer_fa"))
    with pytest.raises(ValueError, match="out_channels"):
        LocalConv2d(2, 0, 3, rule=build_rule("sign_sym"))


# --------------------------------------------------------------------------------------------
# frsf / brsf: |M| * sign(W)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["frsf", "brsf"])
@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_sign_concordant_input_gradient_is_transposed_conv_with_abs_m_sign_w(cfg, rule):
    ref, loc = _pair(rule, cfg)
    x = torch.randn(2, 4, 9, 8, dtype=D64)
    go = torch.randn_like(ref(x))
    out, gx, gw, gb = _grads(loc, x, go)
    B = loc.B_abs * torch.sign(loc.weight.detach())  # the draw this forward used
    assert (loc.B_abs >= 0).all() and torch.equal(torch.sign(B), torch.sign(loc.weight.detach()))
    expected = torch.nn.grad.conv2d_input(x.shape, B, go, ref.stride, ref.padding, ref.dilation,
                                          ref.groups)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, _grads(ref, x, go)[2], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# dfa: the output error, broadcast over the output positions, transposed-convolved with B
# --------------------------------------------------------------------------------------------

def _explicit_dfa_input_grad(loc, cfg, x, B, e):
    """autograd of <conv(pad(x), B), E> with E = e broadcast over the output positions: the
    transposed convolution of E with B onto x's shape, padding handled as nn.Conv2d does."""
    xv = x.detach().clone().requires_grad_(True)
    padding, mode = cfg.get("padding", 0), cfg.get("padding_mode", "zeros")
    stride, dilation = cfg.get("stride", 1), cfg.get("dilation", 1)
    if mode != "zeros":
        p = padding if isinstance(padding, tuple) else (padding, padding)
        xin, padding = F.pad(xv, (p[1], p[1], p[0], p[0]), mode=mode), 0
    else:
        xin = xv
    z = F.conv2d(xin, B, None, stride, padding, dilation)  # groups 1: e has no groups
    E = e[:, :, None, None].expand_as(z)
    (gx,) = torch.autograd.grad((z * E).sum(), xv)
    return gx


@pytest.mark.parametrize("cfg", CONFIGS)
def test_dfa_conv_input_gradient_is_the_projected_output_error(cfg):
    ref, loc = _dfa_pair(cfg, 3)
    assert loc.B_dfa.shape == (3, 4, *loc.kernel_size)
    x = torch.randn(2, 4, 9, 8, dtype=D64, requires_grad=True)
    head = nn.Linear(ref(x).flatten(1).shape[1], 3, dtype=D64)  # a plain head after the layer
    h = loc(x)
    out = head(h.flatten(1))
    capture_output_error(loc, out)
    r = torch.randn(2, 3, dtype=D64)
    (out * r).sum().backward()  # so e = dL/d out = r
    torch.testing.assert_close(x.grad, _explicit_dfa_input_grad(loc, cfg, x, loc.B_dfa, r),
                               rtol=1e-11, atol=1e-11)
    # weight and bias gradients are BP's from the grad_out the layer received
    go = (r @ head.weight.detach()).reshape(h.shape)
    _, _, gw_ref, gb_ref = _grads(ref, x.detach(), go)
    torch.testing.assert_close(loc.weight.grad, gw_ref, rtol=1e-11, atol=1e-11)
    if gb_ref is not None:
        torch.testing.assert_close(loc.bias.grad, gb_ref, rtol=1e-11, atol=1e-11)


def test_dfa_conv_unbatched_input():
    _, loc = _dfa_pair(dict(kernel_size=3, padding=1), 3)
    x = torch.randn(4, 6, 6, dtype=D64, requires_grad=True)
    out = loc(x).sum((1, 2))[:3]  # an (unbatched) output of size 3
    capture_output_error(loc, out)
    r = torch.randn(3, dtype=D64)
    (out * r).sum().backward()
    expected = _explicit_dfa_input_grad(loc, dict(padding=1), x[None], loc.B_dfa, r[None])[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-11, atol=1e-11)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, dtype=D64)
        self.c2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, dtype=D64)
        self.head = nn.Linear(5 * 3 * 3, 4, dtype=D64)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def test_dfa_conv_network_matches_the_gated_formula():
    torch.manual_seed(0)
    model, _ = convert(ConvNet(), "layer_dfa", num_classes=4, generator=torch.Generator().manual_seed(2))
    assert model.c2.B_dfa.shape == (4, 4, 3, 3) and model.head.B_dfa.shape == (4, 45)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 6, 6, generator=g, dtype=D64)
    y = torch.randint(0, 4, (3,), generator=g)
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()

    W1, W2 = model.c1.weight.detach(), model.c2.weight.detach()
    a1 = F.conv2d(x, W1, model.c1.bias.detach(), 1, 1)
    h1 = torch.relu(a1)
    a2 = F.conv2d(h1, W2, model.c2.bias.detach(), 2, 1)
    h2 = torch.relu(a2)
    logits = h2.flatten(1) @ model.head.weight.detach().t() + model.head.bias.detach()
    e = (torch.softmax(logits, -1) - F.one_hot(y, 4).to(D64)) / 3
    # head: BP's gradient from e
    torch.testing.assert_close(model.head.weight.grad, e.t() @ h2.flatten(1), rtol=1e-11, atol=1e-13)
    # c2: grad_out = (e @ B_head) reshaped, gated by relu'
    d2 = (e @ model.head.B_dfa).reshape(h2.shape) * (a2 > 0)
    torch.testing.assert_close(model.c2.weight.grad,
                               torch.nn.grad.conv2d_weight(h1, W2.shape, d2, 2, 1),
                               rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(model.c2.bias.grad, d2.sum((0, 2, 3)), rtol=1e-11, atol=1e-13)
    # c1: grad_out = transposed conv of e (broadcast over c2's output positions) with c2's B
    E = e[:, :, None, None].expand(3, 4, *a2.shape[2:])
    g1 = torch.nn.grad.conv2d_input(h1.shape, model.c2.B_dfa, E, 2, 1) * (a1 > 0)
    torch.testing.assert_close(model.c1.weight.grad,
                               torch.nn.grad.conv2d_weight(x, W1.shape, g1, 1, 1),
                               rtol=1e-11, atol=1e-13)


def test_dfa_conv_error_of_the_wrong_shape():
    _, loc = _dfa_pair(dict(kernel_size=3), 3)
    x = torch.randn(2, 4, 6, 6, dtype=D64, requires_grad=True)
    out = loc(x).mean((2, 3))[:, :3].repeat(2, 1)  # batch 4 != the layer's batch 2
    capture_output_error(loc, out)
    with pytest.raises(ValueError, match=r"\(batch, target_dim\) = \(2, 3\)"):
        out.sum().backward()
