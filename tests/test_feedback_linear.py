"""LocalLinear against nn.Linear, hand-computed feedback gradients and gradcheck."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fa_study.feedback import FA_INIT_MODES, LocalLinear, init_feedback, sign_feedback
from fa_study.rules import LAYER_RULES, build_rule

D64 = torch.float64
# every layer rule with its default options, and ungated DFA (seed 000's form)
RULE_CASES = [(cls.name, {}) for cls in LAYER_RULES] + [("layer_dfa", {"gated": False})]


def _id(case):
    return case if isinstance(case, str) else ",".join(f"{k}={v}" for k, v in case.items()) or "default"


def _local(in_f, out_f, rule, generator=None, **options):
    return LocalLinear(in_f, out_f, rule=build_rule(rule, **options), generator=generator)


def _pair(rule, in_f=5, out_f=4, bias=True, dtype=D64, seed=0, **options):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    loc = LocalLinear(in_f, out_f, bias=bias, rule=build_rule(rule, **options), dtype=dtype)
    with torch.no_grad():
        loc.weight.copy_(ref.weight)
        if bias:
            loc.bias.copy_(ref.bias)
    return ref, loc


def _grads(layer, x, go):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(go)
    return out, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def test_layer_rules_list_every_rule_and_its_conv_form():
    names = tuple(cls.name for cls in LAYER_RULES)
    assert names == ("layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack",
                     "weight_mirror", "layer_dfa", "layer_dfa_block")
    conv = [n for n in names if build_rule(n).has_conv_form]
    assert conv == ["layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack",
                    "weight_mirror", "layer_dfa"]
    assert not build_rule("layer_dfa", gated=False).has_conv_form
    assert FA_INIT_MODES == ("gaussian", "orthogonal", "ortho_he", "sparse")


@pytest.mark.parametrize("bias", [True, False])
def test_local_linear_is_an_nn_linear_with_the_same_output_for_any_leading_shape(bias):
    # BP layers stay plain nn.Linear; a local layer's forward is theirs exactly
    ref, loc = _pair("layer_fa", bias=bias, dtype=torch.float32)
    assert isinstance(loc, nn.Linear)
    x = torch.randn(2, 3, 5)
    go = torch.randn(2, 3, 4)
    (out_r, _, gw_r, gb_r), (out_l, _, gw_l, gb_l) = _grads(ref, x, go), _grads(loc, x, go)
    assert torch.equal(out_r, out_l)
    torch.testing.assert_close(gw_l, gw_r)
    assert (gb_l is None) == (not bias) and (gb_l is None or torch.allclose(gb_l, gb_r))


@pytest.mark.parametrize("rule", ["layer_fa", "layer_grape", "kolen_pollack", "weight_mirror"])
def test_fa_with_b_equal_w_reproduces_bp(rule):
    ref, loc = _pair(rule)
    loc.set_feedback(loc.weight)
    x = torch.randn(3, 2, 5, dtype=D64)
    go = torch.randn(3, 2, 4, dtype=D64)
    for a, b in zip(_grads(ref, x, go), _grads(loc, x, go)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fa_input_gradient_is_grad_out_times_b():
    ref, loc = _pair("layer_fa")
    B = loc.B.clone()
    assert not torch.allclose(B, loc.weight)
    x = torch.randn(7, 5, dtype=D64)
    go = torch.randn(7, 4, dtype=D64)
    out_r, gx_r, gw_r, gb_r = _grads(ref, x, go)
    out_l, gx_l, gw_l, gb_l = _grads(loc, x, go)
    torch.testing.assert_close(out_l, out_r, rtol=0, atol=0)
    torch.testing.assert_close(gx_l, go @ B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw_l, go.t() @ x, rtol=1e-12, atol=1e-12)  # BP's, by hand
    torch.testing.assert_close(gb_l, go.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw_l, gw_r, rtol=1e-12, atol=1e-12)
    assert loc.B.grad is None and torch.equal(loc.B, B)  # B is fixed


def test_sign_sym_feedback_matches_formula():
    ref, loc = _pair("sign_sym")
    W = loc.weight.detach()
    expected_B = torch.sign(W) * W.norm() / math.sqrt(W.numel())
    torch.testing.assert_close(sign_feedback(W), expected_B)
    torch.testing.assert_close(expected_B.norm(), W.norm())  # the rescaling keeps ||B|| = ||W||
    x = torch.randn(6, 5, dtype=D64)
    go = torch.randn(6, 4, dtype=D64)
    _, gx, gw, gb = _grads(loc, x, go)
    torch.testing.assert_close(gx, go @ expected_B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, go.t() @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule, options", RULE_CASES, ids=_id)
def test_gradcheck_weight_and_bias_gradients(rule, options):
    # functional_call runs the module's own forward (and so its custom backward) with the
    # weight and bias that gradcheck perturbs; B stays random, so only W/b grads are exact.
    _, loc = _pair(rule, **options)
    x = torch.randn(3, 2, 5, dtype=D64)
    w = loc.weight.detach().clone().requires_grad_(True)
    b = loc.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, b: functional_call(loc, {"weight": w, "bias": b}, (x,)), (w, b))


@pytest.mark.parametrize("rule", ["layer_fa", "kolen_pollack"])
def test_gradcheck_input_gradient_with_b_equal_w(rule):
    _, loc = _pair(rule)
    loc.set_feedback(loc.weight)
    x = torch.randn(3, 2, 5, dtype=D64, requires_grad=True)
    w = loc.weight.detach().clone().requires_grad_(True)
    b = loc.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: functional_call(loc, {"weight": w, "bias": b}, (x,)), (x, w, b))


def test_gradcheck_detects_a_wrong_input_gradient():
    # The reference check has teeth: with a random B, fa's input gradient is not exact.
    _, loc = _pair("layer_fa")
    x = torch.randn(3, 5, dtype=D64, requires_grad=True)
    assert not torch.autograd.gradcheck(loc, (x,), raise_exception=False)


def test_fa_init_modes():
    g = torch.Generator().manual_seed(0)
    out, fan_in, std = 64, 256, 0.05
    B = init_feedback((out, fan_in), "gaussian", std, generator=g)
    assert abs(B.std().item() - std) < 0.05 * std
    B = init_feedback((out, fan_in), "orthogonal", std, generator=g)
    torch.testing.assert_close(B @ B.t(), torch.eye(out) * fan_in * std ** 2, atol=1e-4, rtol=1e-4)
    B = init_feedback((out, fan_in), "ortho_he", std, generator=g)
    torch.testing.assert_close(B @ B.t(), torch.eye(out) * 2.0 / out, atol=1e-5, rtol=1e-4)
    B = init_feedback((out, fan_in), "sparse", std, sparse_k=8, generator=g)
    nz = B != 0
    assert torch.equal(nz.sum(1), torch.full((out,), 8))
    scale = std * math.sqrt(fan_in / 8)
    torch.testing.assert_close(B[nz].abs(), torch.full((out * 8,), scale))
    # row norms equal the Gaussian B's expected row norm sqrt(fan_in) * std
    torch.testing.assert_close(B.norm(dim=1), torch.full((out,), math.sqrt(fan_in) * std))
    # default k = fan_in // 16, and different rows use different columns
    B = init_feedback((out, fan_in), "sparse", std, generator=g)
    assert torch.equal((B != 0).sum(1), torch.full((out,), fan_in // 16))
    assert (B != 0).any(0).sum() > fan_in // 16


def test_conv_shaped_init_uses_fan_in_view():
    B = init_feedback((8, 3, 3, 3), "orthogonal", 0.1, generator=torch.Generator().manual_seed(1))
    assert B.shape == (8, 3, 3, 3)
    B2 = B.reshape(8, 27)
    torch.testing.assert_close(B2 @ B2.t(), torch.eye(8) * 27 * 0.01, atol=1e-5, rtol=1e-4)


def test_default_b_scale_matches_weight_rms():
    torch.manual_seed(0)
    loc = _local(128, 96, "layer_fa")
    ratio = (loc.B.norm() / loc.weight.norm()).item()
    assert 0.95 < ratio < 1.05
    loc = _local(128, 96, "layer_fa", init_std=0.02)  # the reference's fixed scale
    assert abs(loc.B.std().item() - 0.02) < 0.002


def test_same_generator_seed_gives_same_b():
    kw = dict(init="sparse", sparse_k=2, init_std=0.1)
    a = _local(6, 4, "layer_fa", torch.Generator().manual_seed(3), **kw)
    b = _local(6, 4, "layer_fa", torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.B, b.B) and torch.equal(a.B != 0, b.B != 0)


def test_bad_rule_and_options_raise_value_error_listing_choices():
    with pytest.raises(ValueError, match="'nope'.*'layer_fa'.*'frsf'.*'weight_mirror'.*'layer_dfa_block'"):
        build_rule("nope")
    with pytest.raises(ValueError, match="'uniform'.*'gaussian'.*'sparse'"):
        build_rule("layer_fa", init="uniform")
    with pytest.raises(ValueError, match="'sign_sym' has no option 'lr_b'; allowed options: none"):
        build_rule("sign_sym", lr_b=0.1)
    with pytest.raises(ValueError, match="LocalLinear needs a layer rule.*got 'layer_fa'"):
        LocalLinear(3, 2, rule="layer_fa")
    with pytest.raises(ValueError, match="LocalLinear needs a layer rule"):
        LocalLinear(3, 2, rule=build_rule("bp"))
    with pytest.raises(ValueError, match="shape"):
        _local(3, 2, "layer_fa").set_feedback(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'frsf' stores no B.*layer_fa"):
        _local(3, 2, "frsf").set_feedback(torch.zeros(2, 3))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
@pytest.mark.parametrize("sizes, name", [((0, 3), "in_features"), ((3, 0), "out_features"),
                                         ((2.0, 3), "in_features")])
def test_zero_or_fractional_sizes_are_value_errors(sizes, name):
    for rule in ("layer_fa", "frsf", "layer_dfa"):
        with pytest.raises(ValueError, match=f"LocalLinear {name} must be an integer >= 1"):
            _local(*sizes, rule)
    with pytest.raises(ValueError, match="in_features"):
        LocalLinear.from_linear(nn.Linear(0, 3), build_rule("layer_fa"))


@pytest.mark.parametrize("rule, options", [("layer_dfa", {}), ("layer_dfa", {"gated": False}),
                                           ("layer_dfa_block", {}), ("brsf", {})], ids=_id)
def test_no_grad_forward_is_plain_and_caches_or_draws_nothing(rule, options):
    torch.manual_seed(0)
    loc = _local(5, 3, rule, **options)
    state = {k: v.clone() for k, v in loc.state_dict().items()}
    x = torch.randn(4, 5)
    with torch.no_grad():
        y = loc(x)
    assert loc._cached_input is None
    assert all(torch.equal(v, state[k]) for k, v in loc.state_dict().items())  # brsf: no redraw
    torch.testing.assert_close(y, x @ loc.weight.t() + loc.bias)
    # with gradients the post-backward rules cache their input
    loc(x)
    assert (loc._cached_input is not None) == (rule == "layer_dfa_block" or options == {"gated": False})


def test_autocast_bf16_gives_float32_gradients():
    torch.manual_seed(0)
    loc = _local(8, 4, "layer_fa")
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loc(x)
    out.float().sum().backward()
    assert loc.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.ones(3, 4) @ loc.B, atol=0.05, rtol=0.05)


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("mode", FA_INIT_MODES)
def test_init_under_float64_default_dtype_matches_the_float32_draw(mode):
    # The draws are float32 on the CPU whatever the default dtype: the same seed gives the same
    # matrix (sparse crashed under float64: float64 zeros scattered with float32 signs).
    ref = init_feedback((6, 40), mode, 0.1, sparse_k=3, generator=torch.Generator().manual_seed(2))
    assert ref.dtype == torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        B = init_feedback((6, 40), mode, 0.1, sparse_k=3, generator=torch.Generator().manual_seed(2))
        assert B.dtype == torch.float64
        torch.testing.assert_close(B, ref.double(), rtol=0, atol=0)
        loc = _local(40, 6, "layer_fa", torch.Generator().manual_seed(2), init=mode, sparse_k=3,
                     init_std=0.1)
        assert loc.weight.dtype == torch.float64 and loc.B.dtype == torch.float64
        torch.testing.assert_close(loc.B, ref.double(), rtol=0, atol=0)
    finally:
        torch.set_default_dtype(old)
    assert torch.get_default_dtype() == old


def test_sparse_rows_under_float64_default(float64_default):
    B = init_feedback((8, 64), "sparse", 0.05, sparse_k=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal((B != 0).sum(1), torch.full((8,), 4))
    torch.testing.assert_close(B.norm(dim=1), torch.full((8,), math.sqrt(64) * 0.05))
