"""Credit metrics against hand computations, autograd and known qualitative results."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study import metrics


def _softmax_loss(w: torch.Tensor, y: torch.Tensor):
    """A smooth per-sample loss of h (batch, d): cross-entropy of a fixed linear readout."""

    def loss_fn(h: torch.Tensor) -> torch.Tensor:
        labels = y.repeat(h.shape[0] // y.shape[0])
        return F.cross_entropy(torch.tanh(h) @ w, labels, reduction="none")

    return loss_fn


def _problem(batch=64, d=16, classes=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, d, generator=g, dtype=dtype)
    w = torch.randn(d, classes, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    loss_fn = _softmax_loss(w, y)
    hg = h.clone().requires_grad_(True)
    grad = torch.autograd.grad(loss_fn(hg).mean(), hg)[0]  # dL/dh of the batch-mean loss
    return h, grad, loss_fn, g


# --------------------------------------------------------------------------- cosine

def test_batch_cosine_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = (1.0 + 1.0 / math.sqrt(2.0) - 1.0) / 3.0
    assert metrics.batch_cosine(a, b) == pytest.approx(expected, rel=1e-6)
    assert metrics.offline_bp_cosine(a, b) == pytest.approx(expected, rel=1e-6)


def test_batch_cosine_flattens_per_sample_for_token_and_conv_shapes():
    g = torch.Generator().manual_seed(1)
    for shape in [(4, 5, 6), (4, 3, 2, 2)]:
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ref = F.cosine_similarity(a.reshape(4, -1), b.reshape(4, -1), dim=1).mean().item()
        assert metrics.batch_cosine(a, b) == pytest.approx(ref, abs=1e-6)


def test_cosine_clamp_hides_tiny_gradients_unless_eps_is_tiny():
    # The clamp the D2 diagnostic warns about: ||a|| = 1, ||b|| = 1e-12, b parallel to a.
    a = torch.tensor([[0.6, 0.8]])
    b = 1e-12 * a
    assert metrics.batch_cosine(a, b) == pytest.approx(1e-4, rel=1e-4)
    assert metrics.batch_cosine(a, b, eps=1e-30) == pytest.approx(1.0, rel=1e-6)


def test_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.batch_cosine(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- perturbation rho

def test_perturbation_correlation_true_gradient_is_near_one():
    h, grad, loss_fn, _ = _problem()
    rho = metrics.perturbation_correlation(h, grad, loss_fn, epsilon=1e-4, num_directions=32,
                                           generator=torch.Generator().manual_seed(3))
    assert rho > 0.999


def test_perturbation_correlation_negated_gradient_is_near_minus_one():
    h, grad, loss_fn, _ = _problem()
    rho = metrics.perturbation_correlation(h, -grad, loss_fn, epsilon=1e-4,
                                           generator=torch.Generator().manual_seed(3))
    assert rho < -0.999


def test_perturbation_correlation_random_signal_is_near_zero():
    h, grad, loss_fn, g = _problem()
    a = torch.randn(h.shape, generator=g, dtype=h.dtype)
    rho = metrics.perturbation_correlation(h, a, loss_fn, epsilon=1e-4, num_directions=32,
                                           generator=torch.Generator().manual_seed(3))
    # 64 * 32 pairs: the null standard deviation is about 1/sqrt(2048) = 0.022.
    assert abs(rho) < 0.1


def test_perturbation_correlation_vectorised_equals_loop_and_is_reproducible():
    h, grad, loss_fn, g = _problem(batch=8)
    a = grad + 0.5 * grad.std() * torch.randn(h.shape, generator=g, dtype=h.dtype)
    kw = dict(epsilon=1e-3, num_directions=16)
    r1 = metrics.perturbation_correlation(h, a, loss_fn, generator=torch.Generator().manual_seed(7), **kw)
    r2 = metrics.perturbation_correlation(h, a, loss_fn, generator=torch.Generator().manual_seed(7),
                                          vectorize=False, **kw)
    r3 = metrics.perturbation_correlation(h, a, loss_fn, generator=torch.Generator().manual_seed(7), **kw)
    assert r1 == pytest.approx(r2, abs=1e-12)
    assert r1 == r3
    assert 0.0 < r1 < 0.999  # a noisy gradient: positive but imperfect


def test_perturbation_correlation_degenerate_signal_returns_zero():
    h, _, loss_fn, _ = _problem(batch=4)
    assert metrics.perturbation_correlation(h, torch.zeros_like(h), loss_fn) == 0.0


def test_perturbation_correlation_rejects_bad_arguments():
    h, grad, loss_fn, _ = _problem(batch=4)
    with pytest.raises(ValueError, match="num_directions"):
        metrics.perturbation_correlation(h, grad, loss_fn, num_directions=1)
    with pytest.raises(ValueError, match="epsilon"):
        metrics.perturbation_correlation(h, grad, loss_fn, epsilon=0.0)


# --------------------------------------------------------------------------- nudging

def test_nudging_against_the_gradient_lowers_the_loss():
    h, grad, loss_fn, _ = _problem()
    assert metrics.nudging_test(h, grad, loss_fn, eta=0.01) < 0
    assert metrics.nudging_test(h, -grad, loss_fn, eta=0.01) > 0


def test_nudging_hand_computed_for_a_linear_loss():
    c = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    h = torch.zeros(2, 3, dtype=torch.float64)
    a = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)

    def loss_fn(x):
        return (x * c).sum(-1)

    # loss(h - eta a / (rms(a) + 1e-6)) - loss(h) = -eta <c, a> / (rms(a) + 1e-6)
    rms = torch.tensor([1.0, math.sqrt(4.0 / 3.0)], dtype=torch.float64) + 1e-6
    expected = float((-0.1 * (c * a).sum(-1) / rms).mean())
    assert metrics.nudging_test(h, a, loss_fn, eta=0.1) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- drift

def test_feature_drift_hand_computed():
    init = {"w": torch.tensor([[3.0, 4.0]]), "b": torch.zeros(2), "only_init": torch.ones(1)}
    final = {"w": torch.tensor([[3.0, 5.0]]), "b": torch.ones(2)}
    drift = metrics.feature_drift(init, final)
    assert drift == {"w": pytest.approx(0.2)}  # ||(0, 1)|| / ||(3, 4)||; b has zero init norm


def test_feature_drift_from_modules_and_snapshot():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    before = metrics.parameter_snapshot(net)
    with torch.no_grad():
        net.weight.mul_(1.5)
    drift = metrics.feature_drift(before, net)
    assert drift["weight"] == pytest.approx(0.5, rel=1e-6)
    assert drift["bias"] == pytest.approx(0.0, abs=1e-12)


def test_feature_drift_rejects_shape_change():
    with pytest.raises(ValueError, match="changed shape"):
        metrics.feature_drift({"w": torch.ones(2)}, {"w": torch.ones(3)})


# --------------------------------------------------------------------------- bridge residual

def _value_nets():
    def value(h, t, s):
        return h.sum(-1) + t + 0.5 * s.sum(-1)

    def target_value(h, t, s):
        return 2.0 * h.sum(-1) - t + s[:, 0]

    return value, target_value


def test_bridge_residual_hand_computed():
    value, target_value = _value_nets()
    h = torch.tensor([[0.1, 0.2], [0.3, -0.4]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0], [0.5, 0.5]], dtype=torch.float64)
    t_next = torch.tensor([0.5, 1.5], dtype=torch.float64)
    nxt = [torch.tensor([[0.0, 0.1], [0.2, 0.2]], dtype=torch.float64),
           torch.tensor([[0.3, 0.0], [-0.1, 0.0]], dtype=torch.float64),
           torch.tensor([[0.05, 0.05], [0.0, 0.4]], dtype=torch.float64)]
    lam = 0.1

    hn = h.numpy(); tn = t.numpy(); sn = s.numpy(); tnn = t_next.numpy()
    v = hn.sum(-1) + tn + 0.5 * sn.sum(-1)
    vk = np.stack([2.0 * x.numpy().sum(-1) - tnn + sn[:, 0] for x in nxt], axis=-1)
    target = -lam * np.log(np.mean(np.exp(-vk / lam), axis=-1))
    expected = float(np.mean(np.abs(v - target)))

    got = metrics.bridge_residual(value, target_value, h, t, s, nxt, t_next, lam=lam)
    assert got == pytest.approx(expected, rel=1e-12)
    stacked = metrics.bridge_residual(value, target_value, h, t, s, torch.stack(nxt), t_next, lam=lam)
    assert stacked == pytest.approx(expected, rel=1e-12)


def test_bridge_residual_single_sample_is_plain_difference():
    value, target_value = _value_nets()
    h = torch.tensor([[1.0, 2.0]]); t = torch.tensor([0.0]); s = torch.tensor([[0.0, 0.0]])
    h_next = torch.tensor([[0.5, 0.5]]); t_next = torch.tensor([0.0])
    # K = 1: soft-min is the value itself: |3 - 2| = 1.
    assert metrics.bridge_residual(value, target_value, h, t, s, [h_next], t_next) == pytest.approx(1.0)


def test_bridge_residual_rejects_bad_temperature():
    value, target_value = _value_nets()
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="lam"):
        metrics.bridge_residual(value, target_value, z, torch.zeros(1), z, [z], torch.zeros(1), lam=0.0)
