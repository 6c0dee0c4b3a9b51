"""Learned feedback: GrAPE, Kolen-Pollack and weight mirrors move B toward W."""
import math

import pytest
import torch
from torch import nn

from fa_study.feedback import (
    LocalConv2d, LocalLinear, feedback_step, grape_step, has_feedback_step, kolen_pollack_step,
    probe_jacobian, weight_mirror_step,
)
from fa_study.rules import build_rule

D64 = torch.float64


def _linear(in_f, out_f, rule, dtype=None, **options):
    return LocalLinear(in_f, out_f, rule=build_rule(rule, **options), dtype=dtype)


def _conv(in_c, out_c, k, rule, padding=0, **options):
    return LocalConv2d(in_c, out_c, k, padding=padding, rule=build_rule(rule, **options))


def _cos(a, b):
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def test_grape_increases_cos_and_leaves_w_untouched():
    torch.manual_seed(0)
    grape = build_rule("layer_grape", lr_b=0.5)  # one rule instance may drive many layers
    model = nn.Sequential(LocalLinear(12, 10, rule=grape), nn.ReLU(), LocalLinear(10, 4, rule=grape))
    assert has_feedback_step(model)
    ws = [m.weight.detach().clone() for m in model if isinstance(m, LocalLinear)]
    before = [_cos(m.B, m.weight) for m in model if isinstance(m, LocalLinear)]
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        assert feedback_step(model, generator=g) == {"layer_grape": 2}
        history.append([_cos(m.B, m.weight) for m in model if isinstance(m, LocalLinear)])
    after = history[-1]
    for b, a in zip(before, after):
        assert a > b + 0.3 and a > 0.8
    for w, m in zip(ws, [m for m in model if isinstance(m, LocalLinear)]):
        assert torch.equal(w, m.weight)


def _angle(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))


def test_grape_plain_step_is_gradient_descent_on_one_minus_cos():
    # scale_free=False: the reference's step, checked against autograd of 1 - cos(B, T).
    torch.manual_seed(4)
    T = torch.randn(5, 7, dtype=D64)
    B = torch.randn(5, 7, dtype=D64)
    Bv = B.clone().requires_grad_(True)
    cos = (Bv * T).sum() / (Bv.norm() * T.norm())
    (1 - cos).backward()
    expected = B - 0.1 * Bv.grad
    got = grape_step(B, T, 0.1, scale_free=False)
    torch.testing.assert_close(B, expected, rtol=1e-12, atol=1e-12)
    assert isinstance(got, torch.Tensor) and got.dim() == 0
    torch.testing.assert_close(got, cos.detach())  # the cosine *before* the step


def test_grape_scale_free_step_matches_its_formula():
    torch.manual_seed(5)
    T = torch.randn(4, 3, 2, 2, dtype=D64)  # any shape: a conv kernel
    B = torch.randn(4, 3, 2, 2, dtype=D64)
    B0 = B.clone()
    cos = float((B0 * T).sum() / (B0.norm() * T.norm()))
    got = grape_step(B, T, 0.3)
    step = B0 + 0.3 * (B0.norm() / T.norm() * T - cos * B0)
    expected = step * (B0.norm() / step.norm())  # a rotation: B keeps its norm
    torch.testing.assert_close(B, expected, rtol=1e-12, atol=1e-12)
    assert B.norm().item() == pytest.approx(B0.norm().item(), rel=1e-12)
    assert got.dim() == 0 and got.item() == pytest.approx(cos, rel=1e-12)
    # before the rescaling it is the plain step with lr = rate |B|^2
    B1 = B0.clone()
    grape_step(B1, T, 0.3 * float(B0.norm()) ** 2, scale_free=False)
    torch.testing.assert_close(B1, step, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_grape_scale_free_closes_the_fraction_rate_of_a_small_angle(scale):
    g = torch.Generator().manual_seed(0)
    T = torch.randn(6, 8, generator=g, dtype=D64)
    u = torch.randn(6, 8, generator=g, dtype=D64)
    u = u - (u * T).sum() / T.norm() ** 2 * T  # orthogonal to T
    theta, rate = 0.01, 0.2
    B = scale * (math.cos(theta) * T / T.norm() + math.sin(theta) * u / u.norm())
    grape_step(B, T, rate)
    assert _angle(B, T) / theta == pytest.approx(1 - rate, rel=1e-3)
    # the plain step's effect depends on |B|: at |B| = 1e3 it barely moves
    Bp = scale * (math.cos(theta) * T / T.norm() + math.sin(theta) * u / u.norm())
    grape_step(Bp, T, rate, scale_free=False)
    ratio = _angle(Bp, T) / theta
    if scale == 1e3:
        assert ratio > 0.999
    elif scale == 1e-3:
        assert abs(ratio - (1 - rate)) > 1.0  # overshoots: the step is far larger than B


def test_grape_step_leaves_zero_b_unchanged():
    B = torch.zeros(3, 4)
    cos = grape_step(B, torch.randn(3, 4), 0.5)
    assert torch.equal(B, torch.zeros(3, 4)) and cos.item() == 0.0
    B = torch.randn(3, 4)
    B0 = B.clone()
    grape_step(B, torch.zeros(3, 4), 0.5, scale_free=False)
    assert torch.equal(B, B0)
    with pytest.raises(ValueError, match="rate must be a finite number >= 0"):
        grape_step(B, B0, float("nan"))


@pytest.mark.parametrize("scale_free", [True, False])
def test_layer_grape_steps_toward_the_probed_jacobian(scale_free):
    # The layer estimates J_hat = (p W^T)^T p / n from forward probes and calls grape_step.
    torch.manual_seed(2)
    layer = _linear(7, 5, "layer_grape", lr_b=0.2, n_probe=16, scale_free=scale_free, dtype=D64)
    W, B0 = layer.weight.detach().clone(), layer.B.clone()
    p = torch.randn(16, 7, generator=torch.Generator().manual_seed(9), dtype=D64)
    J = (p @ W.t()).t() @ p / 16
    torch.testing.assert_close(probe_jacobian(W, 16, torch.Generator().manual_seed(9)), J)
    assert feedback_step(nn.Sequential(layer), generator=torch.Generator().manual_seed(9)) == \
        {"layer_grape": 1}
    cos = float((B0 * J).sum() / (B0.norm() * J.norm()))
    if scale_free:
        expected = B0 + 0.2 * (B0.norm() / J.norm() * J - cos * B0)
        expected = expected * (B0.norm() / expected.norm())
    else:
        expected = B0 - 0.2 * (-J / (B0.norm() * J.norm()) + cos * B0 / B0.norm() ** 2)
    torch.testing.assert_close(layer.B, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.weight, W)


def test_grape_on_conv_and_column_normalisation():
    torch.manual_seed(0)
    conv = _conv(3, 4, 3, "layer_grape", normalize_columns=True, lr_b=0.5)
    before = _cos(conv.B, conv.weight)
    for _ in range(20):
        conv.feedback_step()
    assert _cos(conv.B, conv.weight) > before + 0.3
    torch.testing.assert_close(conv.B.reshape(4, -1).norm(dim=0), torch.ones(27))


def _sgd_kp_model(decay, lr):
    torch.manual_seed(0)
    model = nn.Sequential(_linear(6, 8, "kolen_pollack", dtype=D64, lr_b=lr, b_decay=decay),
                          nn.Tanh(),
                          _linear(8, 3, "kolen_pollack", dtype=D64, lr_b=lr, b_decay=decay))
    # W trained by SGD with the same step and the same multiplicative decay as B.
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay / lr)
    return model, opt


def test_kolen_pollack_drives_b_minus_w_to_zero_geometrically():
    decay, lr, steps = 0.1, 0.05, 40
    model, opt = _sgd_kp_model(decay, lr)
    layers = [m for m in model if isinstance(m, LocalLinear)]
    gap0 = [float((m.B - m.weight).detach().norm()) for m in layers]
    x, y = torch.randn(16, 6, dtype=D64), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert feedback_step(model) == {"kolen_pollack": 2}
        opt.step()
    for m, g0 in zip(layers, gap0):
        gap = float((m.B - m.weight).detach().norm())
        # B - W <- (1 - decay)(B - W) at every step, whatever the gradients
        assert gap == pytest.approx(g0 * (1 - decay) ** steps, rel=1e-6)
        assert gap < 0.02 * g0


def test_kolen_pollack_step_formula_and_conv():
    torch.manual_seed(0)
    conv = _conv(2, 3, 3, "kolen_pollack", lr_b=0.1, b_decay=0.2, padding=1)
    B0 = conv.B.clone()
    with pytest.raises(RuntimeError, match=r"loss.backward\(\)"):
        conv.feedback_step()
    conv(torch.randn(2, 2, 5, 5)).square().sum().backward()
    conv.feedback_step()
    torch.testing.assert_close(conv.B, 0.8 * B0 - 0.1 * conv.weight.grad)
    # the step function on its own
    B1 = conv.B.clone()
    kolen_pollack_step(conv.B, conv.weight.grad, lr_b=1.0)
    torch.testing.assert_close(conv.B, B1 - conv.weight.grad)


@pytest.mark.parametrize("make", [
    lambda: _linear(20, 12, "weight_mirror", lr_b=0.02, n_noise=32),
    lambda: _conv(3, 6, 3, "weight_mirror", lr_b=0.02, n_noise=32),
])
def test_weight_mirror_aligns_b_with_w(make):
    torch.manual_seed(0)
    layer = make()
    model = nn.Sequential(layer)
    before = _cos(layer.B, layer.weight)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        assert feedback_step(model, generator=g) == {"weight_mirror": 1}
    after = _cos(layer.B, layer.weight)
    assert abs(before) < 0.4 and after > 0.95
    # the default decay lr_b * sigma^2 makes W itself the fixed point, magnitude included
    assert 0.8 < float(layer.B.norm() / layer.weight.detach().norm()) < 1.2


def test_weight_mirror_expected_step_is_sigma_squared_w():
    # Averaged over many noise draws, the step without decay is lr * sigma^2 * W.
    W = torch.randn(4, 6, dtype=D64)
    B = torch.zeros(4, 6, dtype=D64)
    weight_mirror_step(B, W, lr_b=1.0, decay=0.0, sigma=0.5, n=200_000,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(B, 0.25 * W, atol=0.01, rtol=0)


def test_plain_rules_have_no_post_backward_update():
    model = nn.Sequential(_linear(3, 3, "layer_fa"), _linear(3, 3, "sign_sym"), _linear(3, 3, "frsf"),
                          nn.Linear(3, 3))
    assert not has_feedback_step(model)
    B = model[0].B.clone()
    assert feedback_step(model) == {}
    assert torch.equal(model[0].B, B)


def test_learned_feedback_options_are_checked_by_their_rule():
    # the step sizes and decays are the rule's own options (no per-call override)
    with pytest.raises(ValueError, match=r"b_decay must be a finite number >= 0 and < 1.*got 1.5"):
        build_rule("kolen_pollack", b_decay=1.5)
    with pytest.raises(ValueError, match="lr_b must be a finite number > 0 or None.*inf"):
        build_rule("kolen_pollack", lr_b=float("inf"))
    with pytest.raises(ValueError, match="lr_b must be a finite number >= 0.*inf"):
        build_rule("layer_grape", lr_b=float("inf"))
    with pytest.raises(ValueError, match="n_probe must be an integer >= 1, got 2.5"):
        build_rule("layer_grape", n_probe=2.5)
    with pytest.raises(ValueError, match="scale_free must be True or False"):
        build_rule("layer_grape", scale_free="yes")
    with pytest.raises(ValueError, match=r"weight_mirror needs lr_b \* sigma\*\*2 < 1"):
        build_rule("weight_mirror", lr_b=0.5, sigma=2.0)
    with pytest.raises(ValueError, match="'weight_mirror' has no option 'mirror_n'.*'n_noise'"):
        build_rule("weight_mirror", mirror_n=8)


def test_scale_free_grape_keeps_the_feedback_norm_under_noisy_targets():
    """Steps toward noisy targets add a component orthogonal to B; without the rescaling |B|
    grows as (1 + rate^2)^(steps/2) (threefold in 1,000 steps at rate 0.05, which blew up
    notebook 00's GrAPE runs). The step is a rotation: |B| stays where it was drawn."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(16, 16, generator=g, dtype=D64)
    n0 = float(B.norm())
    for _ in range(1000):
        grape_step(B, torch.randn(16, 16, generator=g, dtype=D64), 0.05)
    assert float(B.norm()) == pytest.approx(n0, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_weight_mirror_default_decay_makes_w_its_fixed_point_for_any_sigma(sigma):
    """The default decay is lr_b * sigma**2 (Akrout 2019): B* = W whatever sigma. A decay of
    lr_b * sigma would give B* = sigma W (half or twice W here)."""
    torch.manual_seed(0)
    layer = _linear(12, 8, "weight_mirror", lr_b=0.05 / sigma ** 2, sigma=sigma, n_noise=64)
    g = torch.Generator().manual_seed(2)
    for _ in range(600):
        feedback_step(nn.Sequential(layer), generator=g)
    assert _cos(layer.B, layer.weight) > 0.97
    assert 0.85 < float(layer.B.norm() / layer.weight.detach().norm()) < 1.15
