"""Reciprocal alignment (fa_study.rules.ra): the formulas against references (torch autograd,
explicit formulas, hand-built matrices), the RA rules trained on a MatrixMLP through the one
trainer (fa_study.train.train) against a by-hand replay of the reference's SGD loop, and the
validation of the rules' options and of fa_study.experiments.RAStudy.

Autograd references for the feedback-alignment rules are built with two standard tricks:

* ``fa_linear(a, M, Fb)`` has the value ``a @ M.T`` and the gradient ``g @ M``'s replacement
  ``g @ Fb.T`` with respect to ``a`` (the feedback matrix ``Fb`` has the shape of ``M.T``);
  its gradient with respect to ``M`` is the ordinary ``g.T @ a``.
* ``st_layernorm(h)`` has the value of a LayerNorm and the identity as its Jacobian.

A network written with these and differentiated by autograd gives the updates that the module
claims to compute (FA through B, LayerNorm derivative ignored) without reusing its code.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fa_study import data
from fa_study.models import MatrixMLP
from fa_study.rules import RULES, build_rule, ra
from fa_study.train import TrainConfig, train

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def fa_linear(a: torch.Tensor, M: torch.Tensor, Fb: torch.Tensor) -> torch.Tensor:
    """Value ``a @ M.T``; gradient to ``a`` through ``Fb`` (shape of ``M.T``) instead of ``M``."""
    through_fb = a @ Fb
    return a.detach() @ M.T + (through_fb - through_fb.detach())


def st_layernorm(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm forward, identity backward."""
    return h + (F.layer_norm(h, h.shape[-1:]) - h).detach()


ACT = {"linear": lambda z: z, "relu": F.relu, "tanh": torch.tanh}


def small_problem(seed: int = 0, dims=(12, 9, 7, 5), n: int = 16, activation: str = "linear"):
    W, B = ra.init_mats(list(dims), seed, activation, device="cpu", dtype=DT)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, dims[0], generator=g, dtype=DT)
    y = torch.randint(0, dims[-1], (n,), generator=g)
    return W, B, x, y


def autograd_w(x, y, W, B, activation, ln, feedback: str, ln_grad: str):
    """Gradient of the mean cross-entropy w.r.t. every W[l] in a torch-written network.

    feedback: "bp" (true transpose) or "fa" (through B); ln_grad: "true" or "ignored".
    """
    Wv = [w.clone().requires_grad_(True) for w in W]
    h = x
    for l, w in enumerate(Wv):
        z = h @ w.T if feedback == "bp" else fa_linear(h, w, B[l])
        if l < len(Wv) - 1:
            h = ACT[activation](z)
            if ln:
                h = F.layer_norm(h, h.shape[-1:]) if ln_grad == "true" else st_layernorm(h)
        else:
            h = z
    loss = F.cross_entropy(h, y)
    return torch.autograd.grad(loss, Wv)


def module_w(x, y, W, B, activation, ln, use_bp):
    acts, pre = ra.forward(x, W, activation, ln)
    _, grad_top = ra.output_grad(acts[-1], y)
    return ra.w_grads(acts, pre, grad_top, W, B, use_bp, activation)


def rev_pathway(top, x, B, W, ln_b: bool, feedback: str, ln_grad: str):
    """0.5 * mean ||b_0 - x||² of the B pathway, written in torch, B differentiable."""
    Bv = [b.clone().requires_grad_(True) for b in B]
    h = top.detach()
    for l in range(len(Bv), 0, -1):
        h = h @ Bv[l - 1].T if feedback == "bp" else fa_linear(h, Bv[l - 1], W[l - 1])
        if ln_b and l > 1:
            h = F.layer_norm(h, h.shape[-1:]) if ln_grad == "true" else st_layernorm(h)
    loss = 0.5 * (h - x).pow(2).sum(-1).mean()
    return loss, Bv


def close(a, b, **kw):
    return all(torch.allclose(u, v, **(kw or TOL)) for u, v in zip(a, b))


# --------------------------------------------------------------------------------------------
# dimensions, initialisation, forward
# --------------------------------------------------------------------------------------------

def test_make_dims_counts_weight_matrices():
    assert ra.make_dims(784, 256, 4, 10) == [784, 256, 256, 256, 10]
    assert ra.make_dims(5, 3, 2, 2) == [5, 3, 2]
    with pytest.raises(ValueError, match="depth"):
        ra.make_dims(784, 256, 1, 10)
    with pytest.raises(ValueError, match="hidden"):
        ra.make_dims(784, 0, 3, 10)


@pytest.mark.parametrize("activation,gain",
                         [("linear", 1.0), ("tanh", 1.0), ("relu", math.sqrt(2.0))])
def test_init_mats_reproduces_the_reference_draws(activation, gain):
    dims = [6, 5, 4, 3]
    W, B = ra.init_mats(dims, 7, activation, device="cpu")
    # the reference: one CPU generator, W[l] then B[l] per layer, std gain / sqrt(fan-in)
    g = torch.Generator().manual_seed(7)
    for l, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        w = torch.empty(d_out, d_in).normal_(std=gain * (1.0 / d_in) ** 0.5, generator=g)
        b = torch.empty(d_in, d_out).normal_(std=gain * (1.0 / d_out) ** 0.5, generator=g)
        assert torch.equal(W[l], w) and torch.equal(B[l], b)
    W64, _ = ra.init_mats(dims, 7, activation, device="cpu", dtype=torch.float64)
    assert W64[0].dtype == torch.float64 and torch.equal(W64[0], W[0].double())


def test_init_mats_scale_is_gain_over_sqrt_fan_in():
    W, B = ra.init_mats([400, 300, 10], 0, "relu", device="cpu")
    assert W[0].std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    assert B[0].std().item() == pytest.approx(math.sqrt(2 / 300), rel=0.02)


def test_forward_layernorm_and_preactivations():
    W, B, x, y = small_problem(activation="tanh")
    acts, pre = ra.forward(x, W, "tanh", ln=True)
    assert pre[0] is None and len(acts) == len(pre) == len(W) + 1
    assert torch.allclose(pre[2], acts[1] @ W[1].T, **TOL)
    for h in acts[1:-1]:  # hidden outputs are normalised per sample
        assert torch.allclose(h.mean(-1), torch.zeros(len(x), dtype=DT), atol=1e-10)
        assert torch.allclose(h.var(-1, unbiased=False), torch.ones(len(x), dtype=DT), atol=1e-3)
    assert torch.equal(acts[-1], pre[-1])  # logits: no activation, no LayerNorm
    acts_noln, _ = ra.forward(x, W, "tanh", ln=False)
    assert torch.allclose(acts_noln[1], torch.tanh(x @ W[0].T), **TOL)


# --------------------------------------------------------------------------------------------
# W updates
# --------------------------------------------------------------------------------------------

def test_output_grad_is_autograd_of_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=g, dtype=DT, requires_grad=True)
    y = torch.randint(0, 5, (8,), generator=g)
    loss, grad_top = ra.output_grad(logits.detach(), y)
    ref_loss = F.cross_entropy(logits, y)
    (ref,) = torch.autograd.grad(ref_loss, logits)
    assert loss.dim() == 0 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert torch.allclose(grad_top, ref, **TOL)


@pytest.mark.parametrize("activation", ra.ACTIVATIONS)
def test_bp_without_layernorm_is_exact_backprop(activation):
    W, B, x, y = small_problem(activation=activation)
    ours = module_w(x, y, W, B, activation, ln=False, use_bp=True)
    ref = autograd_w(x, y, W, B, activation, ln=False, feedback="bp", ln_grad="true")
    assert close(ours, ref)


def test_bp_with_layernorm_ignores_its_derivative():
    """With ln=True the BP arm is the gradient of the network with identity LayerNorm
    Jacobians, not the true gradient -- the docstring's caveat, checked both ways."""
    W, B, x, y = small_problem()
    ours = module_w(x, y, W, B, "linear", ln=True, use_bp=True)
    st = autograd_w(x, y, W, B, "linear", ln=True, feedback="bp", ln_grad="ignored")
    true = autograd_w(x, y, W, B, "linear", ln=True, feedback="bp", ln_grad="true")
    assert close(ours, st)
    assert torch.allclose(ours[-1], true[-1], **TOL)  # the top matrix sees no LayerNorm
    assert not torch.allclose(ours[0], true[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize("activation", ra.ACTIVATIONS)
@pytest.mark.parametrize("ln", [False, True])
def test_fa_equals_autograd_with_feedback_through_B(activation, ln):
    W, B, x, y = small_problem(seed=3, activation=activation)
    ours = module_w(x, y, W, B, activation, ln=ln, use_bp=False)
    ref = autograd_w(x, y, W, B, activation, ln=ln, feedback="fa", ln_grad="ignored")
    assert close(ours, ref)
    bp = module_w(x, y, W, B, activation, ln=ln, use_bp=True)
    assert torch.equal(ours[-1], bp[-1])  # same top update, different hidden updates
    assert not torch.allclose(ours[0], bp[0], rtol=1e-2, atol=0)


@pytest.mark.parametrize("activation", ra.ACTIVATIONS)
@pytest.mark.parametrize("ln", [False, True])
def test_fa_with_B_equal_to_W_transpose_reproduces_bp(activation, ln):
    W, _, x, y = small_problem(seed=5, activation=activation)
    B = [w.T.clone() for w in W]
    fa = module_w(x, y, W, B, activation, ln=ln, use_bp=False)
    bp = module_w(x, y, W, B, activation, ln=ln, use_bp=True)
    # identical arithmetic up to the memory layout of the feedback matrix: float64 round-off
    assert close(fa, bp, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------------
# B updates
# --------------------------------------------------------------------------------------------

def test_recon_gradient_is_autograd_of_half_mean_squared_residual():
    W, B, x, _ = small_problem(seed=2, activation="relu")
    acts, _ = ra.forward(x, W, "relu", ln=True)
    grads, loss = ra.b_grads_recon(acts, B)
    Bv = [b.clone().requires_grad_(True) for b in B]
    ref_loss = sum(0.5 * (acts[l + 1] @ Bv[l].T - acts[l]).pow(2).sum(-1).mean() for l in range(len(B)))
    ref = torch.autograd.grad(ref_loss, Bv)
    assert loss.dim() == 0 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert close(grads, ref)


@pytest.mark.parametrize("activation", ra.ACTIVATIONS)
def test_rev_gradient_is_true_gradient_when_B_is_W_transpose_and_no_ln_b(activation):
    """Feedback through W equals backprop through B exactly when B[l] = W[l]ᵀ; without the
    B-pathway LayerNorm nothing else is approximated, so the rule is gradient descent on
    0.5 * mean ||b_0 - x||². (The forward activation only shapes the logits, a constant.)"""
    W, _, x, _ = small_problem(seed=4, activation=activation)
    B = [w.T.clone() for w in W]
    acts, _ = ra.forward(x, W, activation, ln=True)
    grads, loss = ra.b_grads_rev(acts, x, W, B, ln_b=False)
    ref_loss, Bv = rev_pathway(acts[-1], x, B, W, ln_b=False, feedback="bp", ln_grad="true")
    ref = torch.autograd.grad(ref_loss, Bv)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert close(grads, ref)


def test_rev_gradient_in_general_is_fa_through_W_with_ln_derivative_ignored():
    W, B, x, _ = small_problem(seed=6)
    acts, _ = ra.forward(x, W, "linear", ln=True)
    for ln_b in (True, False):
        grads, loss = ra.b_grads_rev(acts, x, W, B, ln_b=ln_b)
        ref_loss, Bv = rev_pathway(acts[-1], x, B, W, ln_b=ln_b, feedback="fa", ln_grad="ignored")
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert close(grads, torch.autograd.grad(ref_loss, Bv))
    # against the true gradient of the loss: exact for the bottom matrix B[0] only
    grads, _ = ra.b_grads_rev(acts, x, W, B, ln_b=True)
    true_loss, Bv = rev_pathway(acts[-1], x, B, W, ln_b=True, feedback="bp", ln_grad="true")
    true = torch.autograd.grad(true_loss, Bv)
    assert torch.allclose(grads[0], true[0], **TOL)
    assert not torch.allclose(grads[1], true[1], rtol=1e-2, atol=0)


def _rule_with(name: str, B, **options):
    """An RA rule holding the feedback matrices ``B`` (its b_grads reads only ``self.B``)."""
    rule = build_rule(name, **options)
    rule.B = B
    return rule


def test_rules_b_grads_dispatch_and_mix():
    """Each RA rule's B update is the formula it names; ra_comb mixes (1 - lam) rev + lam recon."""
    W, B, x, _ = small_problem(seed=8)
    acts, _ = ra.forward(x, W, "linear", ln=True)
    g_rev, l_rev = ra.b_grads_rev(acts, x, W, B)
    g_rec, l_rec = ra.b_grads_recon(acts, B)
    assert _rule_with("ra_fa", B).b_grads(acts, x, W) == (None, None, None)  # B stays fixed
    g, rev, recon = _rule_with("ra_rev", B).b_grads(acts, x, W)
    assert close(g, g_rev) and recon is None and torch.equal(rev, l_rev)
    g, _, _ = _rule_with("ra_rev", B, ln_b=False).b_grads(acts, x, W)  # the option reaches the formula
    assert close(g, ra.b_grads_rev(acts, x, W, B, ln_b=False)[0])
    assert not close(g, g_rev)
    g, rev, recon = _rule_with("ra_recon", B).b_grads(acts, x, W)
    assert close(g, g_rec) and rev is None and torch.equal(recon, l_rec)
    g, rev, recon = _rule_with("ra_comb", B, lam=0.25).b_grads(acts, x, W)
    assert close(g, [0.75 * a + 0.25 * b for a, b in zip(g_rev, g_rec)])
    assert torch.equal(rev, l_rev) and torch.equal(recon, l_rec)
    assert close(_rule_with("ra_comb", B).b_grads(acts, x, W)[0],  # default lam = 0.5
                 [0.5 * a + 0.5 * b for a, b in zip(g_rev, g_rec)])
    g0, _, _ = _rule_with("ra_comb", B, lam=0.0).b_grads(acts, x, W)
    assert all(torch.equal(a, b) for a, b in zip(g0, g_rev))
    g1, _, _ = _rule_with("ra_comb", B, lam=1.0).b_grads(acts, x, W)
    assert all(torch.equal(a, b) for a, b in zip(g1, g_rec))


# --------------------------------------------------------------------------------------------
# read-outs
# --------------------------------------------------------------------------------------------

def test_readouts_on_hand_built_matrices():
    W = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0]])]  # ||W|| = 1, 5
    cases = {  # B: (alignment per layer, angle per layer)
        "transpose": ([w.T.clone() for w in W], [0.0, 0.0], [0.0, 0.0]),
        "scaled": ([2 * w.T for w in W], [1.0, 1.0], [0.0, 0.0]),
        "opposite": ([-w.T for w in W], [2.0, 2.0], [180.0, 180.0]),
        # flattened orthogonal to Wᵀ: [[0,1],[0,0]] and [[4],[-3]]
        "orthogonal": ([torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[4.0], [-3.0]])],
                       [math.sqrt(2.0), math.sqrt(2.0)], [90.0, 90.0]),
    }
    for name, (B, align, ang) in cases.items():
        assert ra.alignment(W, B) == pytest.approx(align, abs=1e-6), name
        assert ra.angles(W, B) == pytest.approx(ang, abs=1e-4), name
    # a 45-degree case and an undefined one
    B = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.zeros(2, 1)]
    got = ra.angles(W, B)
    assert got[0] == pytest.approx(45.0, abs=1e-4) and math.isnan(got[1])


def test_readouts_on_random_matrices_match_numpy():
    W, B, _, _ = small_problem(seed=9)
    for w, b, a, ang in zip(W, B, ra.alignment(W, B), ra.angles(W, B)):
        wn, bn = w.numpy(), b.numpy()
        assert a == pytest.approx(np.linalg.norm(bn - wn.T) / np.linalg.norm(wn), rel=1e-9)
        cos = (bn.ravel() @ wn.T.ravel()) / (np.linalg.norm(bn) * np.linalg.norm(wn))
        assert ang == pytest.approx(np.degrees(np.arccos(cos)), abs=1e-6)


def test_update_angles_between_fa_and_bp_updates():
    W, B, x, y = small_problem(seed=10, activation="tanh")
    acts, pre = ra.forward(x, W, "tanh", ln=False)
    _, grad_top = ra.output_grad(acts[-1], y)
    got = ra.update_angles(acts, pre, grad_top, W, B, "tanh")
    assert len(got) == len(W) - 1  # hidden layers only: the top update is the same in both
    bp = autograd_w(x, y, W, B, "tanh", ln=False, feedback="bp", ln_grad="true")
    fa = autograd_w(x, y, W, B, "tanh", ln=False, feedback="fa", ln_grad="ignored")
    for l, ang in enumerate(got):
        u, v = fa[l].numpy().ravel(), bp[l].numpy().ravel()
        ref = np.degrees(np.arccos(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
        assert ang == pytest.approx(ref, abs=1e-6)
    assert max(got) > 10.0  # random feedback: far from BP
    aligned = ra.update_angles(acts, pre, grad_top, W, [w.T.clone() for w in W], "tanh")
    assert aligned == pytest.approx([0.0] * (len(W) - 1), abs=1e-4)


# --------------------------------------------------------------------------------------------
# options of the rules and of the study (validation only: nothing is trained here)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,field", [
    ("ra_comb", {"lam": 1.5}, "lam"), ("ra_comb", {"lam": -0.1}, "lam"), ("ra_comb", {"lam": 1.01}, "lam"),
    ("ra_comb", {"lam": math.nan}, "lam"), ("ra_comb", {"lam": "0.5"}, "lam"),
    ("ra_rev", {"lr_b": 0.0}, "lr_b"), ("ra_rev", {"lr_b": -1.0}, "lr_b"),
    ("ra_recon", {"lr_b": math.inf}, "lr_b"), ("ra_comb", {"lr_b": math.nan}, "lr_b"),
    ("ra_rev", {"ln_b": "yes"}, "ln_b"), ("ra_comb", {"ln_b": 1}, "ln_b"),
])
def test_rule_options_reject_bad_values_naming_the_option(name, options, field):
    with pytest.raises(ValueError, match=field):
        build_rule(name, **options)


def test_rule_options_belong_to_the_rule_that_takes_them():
    """lam only exists for ra_comb, ln_b only where the reverse task runs, and the fixed-B
    control takes no option at all (its B is never trained)."""
    with pytest.raises(ValueError, match="rule 'ra_rev' has no option 'lam'"):
        build_rule("ra_rev", lam=0.9)
    with pytest.raises(ValueError, match="rule 'ra_recon' has no option 'ln_b'"):
        build_rule("ra_recon", ln_b=False)
    with pytest.raises(ValueError, match="rule 'ra_fa' has no option 'lr_b'"):
        build_rule("ra_fa", lr_b=0.1)
    assert set(RULES["ra_comb"].OPTIONS) == {"lr_b", "b_clip", "ln_b", "rev_feedback", "ln_derivative", "lam"}
    assert set(RULES["ra_recon"].OPTIONS) == {"lr_b", "b_clip"}
    with pytest.raises(ValueError, match="rule 'ra_recon' has no option 'rev_feedback'"):
        build_rule("ra_recon", rev_feedback="forward_ln")
    assert not RULES["ra_fa"].learns_feedback and RULES["ra_comb"].learns_feedback
    assert all(RULES[n].has_random_feedback and RULES[n].supports("matrix_mlp")
               and not RULES[n].supports("resmlp") for n in ("ra_fa", "ra_rev", "ra_recon", "ra_comb"))


def test_rule_option_defaults_and_coercion():
    rule = build_rule("ra_comb")
    # lr_b None: the trainer's lr; the stabilisation off: seed 001's reverse task
    assert rule.options() == {"lr_b": None, "b_clip": None, "ln_b": True, "rev_feedback": "W",
                              "ln_derivative": False, "lam": 0.5}
    rule = build_rule("ra_comb", lr_b=np.float32(0.5), lam=1)
    assert type(rule.lr_b) is float and rule.lr_b == 0.5 and type(rule.lam) is float and rule.lam == 1.0
    assert rule.label() == "ra_comb lr_b=0.5 λ=1"


@pytest.mark.parametrize("kwargs,field", [
    ({"rules": ("dfa",)}, "rule"), ({"rules": ()}, "rules"), ({"activation": "gelu"}, "activation"),
    ({"depth": 1}, "depth"), ({"depth": 2.5}, "depth"), ({"hidden": 0}, "hidden"), ({"lr": 0.0}, "lr"),
    ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr_b": 0.0}, "lr_b"), ({"epochs": 0}, "epochs"),
    ({"batch_size": -4}, "batch_size"), ({"lam": -0.1}, "lam"), ({"lam": 1.01}, "lam"), ({"ln": "yes"}, "ln"),
    ({"n_train": 0}, "n_train"), ({"n_test": 0}, "n_test"), ({"seeds": (1.5,)}, "seeds"),
    ({"seeds": (1, 1)}, "seeds"), ({"dataset": "cifar10"}, "dataset"),
])
def test_study_rejects_bad_values_naming_the_field(kwargs, field):
    from fa_study.experiments import RAStudy

    with pytest.raises(ValueError, match=field) as info:
        RAStudy(**kwargs)
    if field in ("rule", "activation"):  # enumerated: the message lists what is allowed
        allowed = ("bp", "ra_fa", "ra_rev", "ra_recon", "ra_comb") if field == "rule" else ra.ACTIVATIONS
        assert all(repr(a) in str(info.value) for a in allowed)


def test_study_defaults_and_its_runs():
    """RAStudy's runs are MatrixMLP runs with plain SGD (no momentum, no decay, constant step),
    the RA read-outs on, and each rule given only the options it takes."""
    from fa_study.experiments import RAStudy

    study = RAStudy()
    assert (study.depth, study.hidden, study.activation, study.ln, study.lr, study.lr_b, study.lam) == \
        (4, 256, "linear", True, 0.05, 1e-3, 0.5)
    with pytest.raises(Exception):
        study.lr = 0.1  # frozen
    study = RAStudy(rules=("bp", "ra_fa", "ra_rev", "ra_comb"), depth=3, hidden=32, lam=0.3)
    specs = {s.rule: s for s in study.specs()}
    assert dict(specs["ra_comb"].options) == {"lr_b": 1e-3, "lam": 0.3}
    assert dict(specs["ra_rev"].options) == {"lr_b": 1e-3}
    stab = {s.rule: s for s in study.stabilised().specs()}
    assert dict(stab["ra_rev"].options) == {"lr_b": 1e-3, "rev_feedback": "forward_ln",
                                            "ln_derivative": True, "b_clip": 0.01}
    assert dict(stab["ra_fa"].options) == {}
    assert dict(specs["ra_fa"].options) == {} and dict(specs["bp"].options) == {}
    for spec in specs.values():
        assert (spec.model.arch, spec.model.d, spec.model.num_blocks) == ("matrix_mlp", 32, 1)
        assert dict(spec.model.options) == {"activation": "linear", "ln": True}
        t = spec.train
        assert (t.optimizer, t.momentum, t.weight_decay, t.schedule, t.lr) == \
            ("sgd", 0.0, 0.0, "constant", 0.05)
        assert t.feedback_quality and t.seed == 42


# --------------------------------------------------------------------------------------------
# training through fa_study.train.train
# --------------------------------------------------------------------------------------------

IMAGE = (1, 4, 5)  # 20 features, seen by MatrixMLP as a 1x4x5 image
CLASSES = 4


def blobs(seed: int, n: int, d: int = 20, k: int = CLASSES):
    """Gaussian clusters: linearly separable enough that every rule can learn them."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def _dataset(split, x, y, shape=IMAGE, classes=CLASSES):
    return data.Dataset("blobs", split, x.reshape(x.shape[0], *shape), y, "synthetic", classes,
                        (0.0,), (1.0,))


@pytest.fixture(scope="module")
def toy():
    return _dataset("train", *blobs(1, 256)), _dataset("test", *blobs(2, 128))


def _mlp(seed: int = 0, d: int = 16, num_blocks: int = 1, **kw) -> MatrixMLP:
    """MatrixMLP 20 -> d -> ... -> 4 with ``num_blocks + 2`` matrices (the reference's depth)."""
    torch.manual_seed(seed)
    return MatrixMLP(IMAGE, CLASSES, d, num_blocks, **kw)


def _cfg(**kw) -> TrainConfig:
    """Plain SGD as the reference: no momentum, no decay, constant step."""
    base = dict(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0,
                schedule="constant", eval_batch=128, log_every=4, seed=0, feedback_quality=True)
    base.update(kw)
    return TrainConfig(**base)


def test_history_is_tidy_and_complete(toy):
    model, rule = _mlp(), build_rule("ra_comb", lr_b=0.002)
    hist = train(model, rule, *toy, _cfg())
    assert list(hist["epoch"]) == [0, 1, 2, 3] and (hist["status"] == "ok").all()
    assert hist["diverged_epoch"].isna().all() and hist.attrs["status"] == "ok"
    layer_cols = [f"{p}_{l}" for p in ("align", "angle") for l in range(3)]  # every matrix
    layer_cols += [f"update_angle_{l}" for l in range(2)]  # the hidden matrices only
    for col in ["epoch", "train_loss", "train_acc", "test_acc", "rev_loss", "recon_loss", "status",
                "diverged_epoch", *layer_cols, "cos_0", "g_norm_1", "rule", "lr_b", "ln_b", "lam", "arch",
                "num_blocks", "optimizer", "lr", "epochs", "batch_size", "seed"]:
        assert col in hist.columns, col
    assert "update_angle_2" not in hist.columns and "align_3" not in hist.columns
    assert hist[layer_cols].notna().all().all()
    # rev_loss / recon_loss are means over an epoch's steps: none before training
    assert hist[["rev_loss", "recon_loss"]].iloc[0].isna().all()
    assert hist[["rev_loss", "recon_loss"]].iloc[1:].notna().all().all()
    assert (hist["rule"] == "ra_comb").all() and (hist["arch"] == "matrix_mlp").all()
    assert (hist["lam"] == 0.5).all() and (hist["lr_b"] == 0.002).all()
    assert hist["test_acc"].iloc[-1] > 0.8  # qualitative: separable blobs are learned
    # ra_fa computes neither B loss; its B never moves
    model, fixed = _mlp(), build_rule("ra_fa")
    fixed.setup(model, CLASSES, torch.Generator().manual_seed(0))
    B0 = [b.clone() for b in fixed.B]
    hist = train(model, fixed, *toy, _cfg())
    assert hist[["rev_loss", "recon_loss"]].isna().all().all()
    assert all(torch.equal(a, b) for a, b in zip(B0, fixed.B))


def test_read_outs_are_the_formulas_on_the_eval_batch(toy):
    """align_l / angle_l / update_angle_l of the last epoch are ra.alignment / angles /
    update_angles of the trained W and B on the eval batch."""
    train_ds, test_ds = toy
    model, rule = _mlp(), build_rule("ra_rev", lr_b=0.01)
    hist = train(model, rule, train_ds, test_ds, _cfg(epochs=2, eval_batch=64))
    W = [w.detach() for w in model.matrices()]
    acts, pre = ra.forward(test_ds.x[:64].reshape(64, -1), W, "linear", True)
    _, grad_top = ra.output_grad(acts[-1], test_ds.y[:64])
    last = hist.iloc[-1]
    for prefix, vals in (("align", ra.alignment(W, rule.B)), ("angle", ra.angles(W, rule.B)),
                         ("update_angle", ra.update_angles(acts, pre, grad_top, W, rule.B))):
        assert [last[f"{prefix}_{l}"] for l in range(len(vals))] == pytest.approx(vals, rel=1e-6, abs=1e-6)
    assert last["align_0"] < hist["align_0"].iloc[0]  # the reverse task pulls B towards W^T


def _replay(train_ds, cfg, W, B, rule_name, lr_b, activation="linear", ln=True, ln_b=True, lam=0.5):
    """The reference's loop by hand: per batch, W -= lr * w_grads(...) and B -= lr_b * b_grads(...)
    from the same snapshot of W and B; returns per-epoch (sample-weighted) mean losses."""
    from fa_study.data import BatchIterator

    batches = BatchIterator.from_dataset(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed)
    epochs = []
    for _ in range(cfg.epochs):
        sums, n = torch.zeros(3, dtype=torch.float64), 0
        for xb, yb in batches:
            xb = xb.reshape(xb.shape[0], -1)
            acts, pre = ra.forward(xb, W, activation, ln)
            loss, grad_top = ra.output_grad(acts[-1], yb)
            g_w = ra.w_grads(acts, pre, grad_top, W, B, use_bp=rule_name == "bp", activation=activation)
            g_b, rev, recon = None, math.nan, math.nan
            if rule_name in ("ra_rev", "ra_comb"):
                g_b, rev = ra.b_grads_rev(acts, xb, W, B, ln_b=ln_b)
            if rule_name in ("ra_recon", "ra_comb"):
                g_rec, recon = ra.b_grads_recon(acts, B)
                g_b = g_rec if g_b is None else [(1 - lam) * a + lam * b for a, b in zip(g_b, g_rec)]
            for w, g in zip(W, g_w):
                w.sub_(cfg.lr * g)
            if g_b is not None:
                for b, g in zip(B, g_b):
                    b.sub_(lr_b * g)
            sums += torch.tensor([float(loss), float(rev), float(recon)], dtype=torch.float64) * len(yb)
            n += len(yb)
        epochs.append((sums / n).tolist())
    return epochs


@pytest.mark.parametrize("rule_name,options,ln", [
    ("ra_comb", {"lr_b": 0.05, "lam": 0.3}, True), ("ra_rev", {"ln_b": False}, True),
    ("ra_recon", {"lr_b": 0.02}, True), ("ra_fa", {}, True), ("ra_comb", {"lr_b": 0.03}, False),
    ("bp", {}, False),  # without LayerNorm the reference's BP arm is the exact gradient: bp's
])
def test_sgd_steps_replay_the_reference_loop(toy, rule_name, options, ln):
    """256 samples in batches of 100 (100, 100, 56): train_loss (and rev_loss / recon_loss) are
    the sample-weighted means of the epoch's steps, and the trained W and B equal the reference's
    ``W -= lr * w_grads(...)``, ``B -= lr_b * b_grads(...)`` replayed by hand (float64; torch's SGD
    may round differently). ``lr_b`` None means the trainer's lr."""
    train_ds, test_ds = (data.Dataset(d.name, d.split, d.x.double(), d.y, d.source, d.num_classes,
                                      d.mean, d.std) for d in toy)
    cfg = _cfg(epochs=2, batch_size=100, log_every=100, seed=3, lr=0.04)
    model = _mlp(activation="tanh", ln=ln).double()
    rule = build_rule(rule_name, **options)
    rule.setup(model, CLASSES, torch.Generator().manual_seed(5), train_cfg=cfg)
    W = [w.detach().clone() for w in model.matrices()]
    B = [b.clone() for b in getattr(rule, "B", [])]
    hist = train(model, rule, train_ds, test_ds, cfg)
    lr_b = options.get("lr_b") or cfg.lr
    expected = _replay(train_ds, cfg, W, B, rule_name, lr_b, activation="tanh", ln=ln,
                       ln_b=options.get("ln_b", True), lam=options.get("lam", 0.5))
    for epoch, (loss, rev, recon) in enumerate(expected, start=1):
        row = hist[hist["epoch"] == epoch].iloc[0]
        assert row["train_loss"] == pytest.approx(loss, rel=1e-6)
        if rule_name != "bp":
            assert row["rev_loss"] == pytest.approx(rev, rel=1e-9, nan_ok=True)
            assert row["recon_loss"] == pytest.approx(recon, rel=1e-9, nan_ok=True)
    for w, ref in zip(model.matrices(), W):
        torch.testing.assert_close(w.detach(), ref, rtol=1e-10, atol=1e-12)
    if rule_name != "bp":
        for b, ref in zip(rule.B, B):
            torch.testing.assert_close(b, ref, rtol=1e-10, atol=1e-12)


def test_one_step_updates_b_from_the_snapshot_of_this_forward():
    """One fill_grads: W's .grad is the FA update of this batch's forward and B has moved by
    lr_b * b_grads of the same W, B and activations (as the reference), before any W step."""
    model = _mlp(d=9).double()
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(16, 20, generator=g, dtype=DT), torch.randint(0, CLASSES, (16,), generator=g)
    rule = build_rule("ra_comb", lr_b=0.1, lam=0.4)
    rule.setup(model, CLASSES, torch.Generator().manual_seed(0))
    W = [w.detach().clone() for w in model.matrices()]
    B = [b.clone() for b in rule.B]
    acts, pre = ra.forward(x, W, "linear", True)
    _, grad_top = ra.output_grad(acts[-1], y)
    loss, logits = rule.fill_grads(model, x.reshape(-1, *IMAGE), y)
    assert torch.equal(logits, acts[-1]) and loss.item() == pytest.approx(F.cross_entropy(acts[-1], y).item())
    assert all(torch.equal(w, w0) for w, w0 in zip(model.matrices(), W))  # the optimizer steps W
    for p, g_w in zip(model.matrices(), ra.w_grads(acts, pre, grad_top, W, B, False)):
        torch.testing.assert_close(p.grad, g_w, rtol=1e-12, atol=1e-14)
    g_rev, _ = ra.b_grads_rev(acts, x, W, B)
    g_rec, _ = ra.b_grads_recon(acts, B)
    for b, b0, gr, gc in zip(rule.B, B, g_rev, g_rec):
        torch.testing.assert_close(b, b0 - 0.1 * (0.6 * gr + 0.4 * gc), rtol=1e-12, atol=1e-14)
    # the rule's credit at h_0 .. h_L is the FA error carried down through B (LayerNorm as identity)
    _, signals = ra.w_grads(acts, pre, grad_top, W, rule.B, False, return_signals=True)
    assert all(torch.equal(a, s) for a, s in zip(rule.credit(model, x, y), signals))


def test_same_seed_gives_identical_histories(toy):
    a = train(_mlp(), build_rule("ra_comb", lr_b=0.002), *toy, _cfg())
    b = train(_mlp(), build_rule("ra_comb", lr_b=0.002), *toy, _cfg())
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    c = train(_mlp(), build_rule("ra_comb", lr_b=0.002), *toy, _cfg(seed=1))  # another B and batch order
    assert not np.array_equal(a["align_0"].to_numpy(), c["align_0"].to_numpy())


def test_divergence_is_reported_not_raised(toy):
    steps = []
    hist = train(_mlp(), build_rule("ra_rev", lr_b=50.0), *toy, _cfg(lr=1.0, log_every=2),
                 callback=lambda step, record: steps.append(step), callback_every=1)
    assert list(hist["epoch"]) == [0, 1] and list(hist["status"]) == ["ok", "diverged"]
    assert (hist["diverged_epoch"] == 1).all() and hist.attrs["status"] == "diverged"
    assert "not finite" in hist["diverged_reason"].iloc[-1]
    assert max(steps) < 8  # stopped at a check inside the first epoch (8 steps), not at its end
    last = hist.iloc[-1]
    assert math.isnan(last["test_acc"]) and not math.isfinite(last["train_loss"])
    for col in ("align_0", "update_angle_1", "rev_loss"):
        assert col in hist.columns and math.isnan(last[col])


def test_training_rejects_bad_inputs(toy):
    train_ds, test_ds = toy
    with pytest.raises(ValueError, match="TrainConfig"):
        train(_mlp(), build_rule("ra_comb"), train_ds, test_ds, {"optimizer": "sgd"})
    with pytest.raises(ValueError, match="fa_study.rules.Method"):
        train(_mlp(), "ra_comb", train_ds, test_ds, _cfg())
    # RAConfig's training fields are the trainer's now
    for bad in ({"log_every": 0}, {"lr": 0.0}, {"batch_size": -4}, {"epochs": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _cfg(**bad)
    with pytest.raises(ValueError, match="cannot train a 'resmlp' model"):
        from fa_study.models import build_model
        torch.manual_seed(0)
        train(build_model("resmlp", input_shape=IMAGE, num_classes=CLASSES, d=8, num_blocks=1),
              build_rule("ra_comb"), train_ds, test_ds, _cfg())
    x, y = blobs(3, 64, d=12)
    wrong = _dataset("train", x, y, shape=(1, 3, 4))
    with pytest.raises(ValueError, match="expects inputs shaped"):  # 12 features for a 20-feature model
        train(_mlp(), build_rule("ra_comb"), wrong, wrong, _cfg())
    five = _dataset("train", *blobs(3, 64, k=5), classes=5)
    with pytest.raises(ValueError, match="5 classes"):
        train(_mlp(), build_rule("ra_comb"), five, five, _cfg())
    with pytest.raises(RuntimeError, match="setup"):
        build_rule("ra_comb").fill_grads(_mlp(), train_ds.x[:4], train_ds.y[:4])
    rule = build_rule("ra_comb")
    rule.setup(_mlp(d=8), CLASSES, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="set up for"):  # B drawn for another model's widths
        train(_mlp(d=16), rule, train_ds, test_ds, _cfg())
    with pytest.raises(ValueError, match="activation"):
        ra.forward(train_ds.x.reshape(256, -1), [torch.zeros(3, 20)], "softplus", True)


def test_small_images_train_without_augmentation():
    """A 1x3x4 image is smaller than the default crop pad (4): unaugmented batches never pad,
    so the trainer must not refuse it (it did: the pad was checked against every image)."""
    x, y = blobs(3, 64, d=12)
    ds = _dataset("train", x, y, shape=(1, 3, 4))
    torch.manual_seed(0)
    hist = train(MatrixMLP((1, 3, 4), CLASSES, 8, 1), build_rule("ra_recon"), ds, ds, _cfg(epochs=1))
    assert list(hist["status"]) == ["ok", "ok"]


# --------------------------------------------------------------------------------------------
# the stabilisation of the reverse task (notebook 01)
# --------------------------------------------------------------------------------------------

def test_layer_norm_backward_is_autograds():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 7, generator=g, dtype=DT, requires_grad=True)
    up = torch.randn(5, 7, generator=g, dtype=DT)
    (ref,) = torch.autograd.grad((F.layer_norm(h, h.shape[-1:]) * up).sum(), h)
    assert torch.allclose(ra.layer_norm_backward(h.detach(), up), ref, **TOL)


def test_rev_with_the_ln_derivative_is_the_true_gradient_when_B_is_W_transpose():
    """With the LayerNorm derivative on the B pathway and B = W^T, FA through W *is* BP through B:
    the updates equal autograd of the reverse loss through the (LayerNorm'd) B pathway."""
    W, _, x, y = small_problem(seed=4)
    B = [w.T.clone() for w in W]
    acts, _ = ra.forward(x, W, "linear", True)
    ours, _ = ra.b_grads_rev(acts, x, W, B, ln_b=True, ln_derivative=True)
    loss, Bv = rev_pathway(acts[-1], x, B, W, ln_b=True, feedback="bp", ln_grad="true")
    ref = torch.autograd.grad(loss, Bv)
    assert close(ours, ref)
    plain, _ = ra.b_grads_rev(acts, x, W, B, ln_b=True)  # seed 001: LN derivative ignored
    assert not close(plain[1:], ref[1:], rtol=1e-3, atol=0)


def test_rev_forward_ln_scales_the_feedback_by_the_forward_layernorms_sigma():
    W, B, x, y = small_problem(seed=6, activation="tanh")
    acts, pre = ra.forward(x, W, "tanh", True)
    z = [None] + [torch.tanh(p) for p in pre[1:]]
    ours, _ = ra.b_grads_rev(acts, x, W, B, ln_b=False, forward_ln=z)
    # by hand: eta_l = eta_{l-1} W[l-1]^T / sigma(z_l) per sample for the hidden layers
    b = [None] * len(acts)
    b[-1] = acts[-1]
    for l in range(len(B), 0, -1):
        b[l - 1] = b[l] @ B[l - 1].T
    eta = (b[0] - x) / x.shape[0]
    expected = []
    for l in range(len(B)):
        expected.append(eta.T @ b[l + 1])
        eta = eta @ W[l].T
        if l + 1 < len(B):
            eta = eta / torch.sqrt(z[l + 1].var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert close(ours, expected)


def test_b_clip_bounds_every_b_step_relative_to_b():
    from fa_study.data import Dataset
    from fa_study.models import build_model
    from fa_study.train import TrainConfig, train

    torch.manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    ds = Dataset("toy", "train", x, torch.arange(64) % 3, "synthetic", 3, (0.0,), (1.0,))
    model = build_model("matrix_mlp", input_shape=(1, 4, 4), num_classes=3, d=8, num_blocks=1)
    rule = build_rule("ra_rev", lr_b=10.0, b_clip=0.01)
    seen = []

    def probe(step, model, rule):
        seen.append(rule.trace(model))
        return {}

    train(model, rule, ds, ds, TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.01, momentum=0.0,
                                           weight_decay=0.0, schedule="constant", eval_batch=16),
          probe=probe, probe_every=1)
    steps = [t for t in seen if "dB_0" in t]
    assert steps
    for t in steps:  # the step is bounded by 1 % of B (of B before the step: allow the change)
        for l in range(3):
            assert t[f"dB_{l}"] <= 0.0101 * t[f"B_{l}"] * 1.01, (l, t)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_credit_with_B_equal_to_W_transpose_and_no_layernorm_is_the_bp_gradient(activation):
    """Without LayerNorm and with B = W^T the FA errors carried down are BP's: the credit at
    h_0 .. h_L (the hidden outputs, before the next layer's f') equals autograd's dL/dh_l."""
    from fa_study.diagnostics import bp_reference

    model = _mlp(d=9, num_blocks=2, activation=activation, ln=False).double()
    rule = build_rule("ra_fa")
    rule.setup(model, CLASSES, torch.Generator().manual_seed(0))
    rule.B = [w.detach().t().clone() for w in model.matrices()]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, *IMAGE, generator=g, dtype=DT), torch.randint(0, CLASSES, (16,), generator=g)
    _, grads, _ = bp_reference(model, x, y)
    credit = rule.credit(model, x, y)
    assert len(credit) == len(grads) == model.num_blocks + 1
    for a, ref in zip(credit, grads):
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)


def test_rule_feedback_is_scaled_by_its_own_fan_in():
    """The rule's B[l] (d_l, d_{l+1}) ~ N(0, gain^2 / d_{l+1}), as init_mats draws it."""
    model = _mlp(d=64, num_blocks=1, activation="relu")  # widths 20 -> 64 -> 64 -> 4
    rule = build_rule("ra_fa")
    rule.setup(model, CLASSES, torch.Generator().manual_seed(0))
    dims = list(model.dims)
    assert [tuple(b.shape) for b in rule.B] == list(zip(dims[:-1], dims[1:]))
    for b, d_out in zip(rule.B, dims[1:]):
        assert float(b.std()) == pytest.approx(math.sqrt(2.0 / d_out), rel=0.15)


def _ra_history():
    """Two seeds of ra_fa (finished), ra_rev one finished and one diverged at epoch 2 (its NaN
    row last), ra_comb one run that raised; one hidden layer's columns."""
    rows = []
    for seed, (acc1, acc2) in [(0, (0.5, 0.7)), (1, (0.6, 0.9))]:
        for ep, acc in ((1, acc1), (2, acc2)):
            rows.append(dict(model="matrix_mlp", rule="ra_fa", arm="ra_fa", seed=seed, epoch=ep, status="ok",
                             test_acc=acc, align_0=1.0 / ep, angle_0=80.0 + ep, update_angle_0=50.0))
    rows.append(dict(model="matrix_mlp", rule="ra_rev", arm="ra_rev", seed=0, epoch=1, status="ok",
                     test_acc=0.4, align_0=2.0, angle_0=85.0, update_angle_0=60.0))
    rows.append(dict(model="matrix_mlp", rule="ra_rev", arm="ra_rev", seed=0, epoch=2, status="diverged",
                     test_acc=math.nan, align_0=math.nan, angle_0=math.nan, update_angle_0=math.nan))
    rows.append(dict(model="matrix_mlp", rule="ra_rev", arm="ra_rev", seed=1, epoch=2, status="ok",
                     test_acc=0.8, align_0=1.5, angle_0=84.0, update_angle_0=61.0))
    rows.append(dict(model="matrix_mlp", rule="ra_comb", arm="ra_comb", seed=0, epoch=0, status="error",
                     test_acc=math.nan, align_0=math.nan, angle_0=math.nan, update_angle_0=math.nan))
    return pd.DataFrame(rows)


def test_ra_final_means_the_last_epochs_and_keeps_the_worst_status():
    from fa_study.experiments import ra_final

    final = ra_final(_ra_history())
    assert list(final.columns) == ["test_acc", "align_0", "angle_0", "update_angle_0", "status"]
    assert final.loc["ra_fa", "test_acc"] == pytest.approx(0.8)  # (0.7 + 0.9) / 2, epoch 2 only
    assert final.loc["ra_fa", "angle_0"] == pytest.approx(82.0) and final.loc["ra_fa", "status"] == "ok"
    # the diverged run's last row is NaN: the mean is the finished seed's, its status "diverged"
    assert final.loc["ra_rev", "test_acc"] == pytest.approx(0.8)
    assert final.loc["ra_rev", "status"] == "diverged"
    assert final.loc["ra_comb", "status"] == "error" and math.isnan(final.loc["ra_comb", "test_acc"])


def test_stability_tables_share_trained_and_accuracy_with_diverged_cells_blank():
    from fa_study.experiments import stability_tables

    grid = pd.DataFrame(dict(rule=["ra_rev"] * 4, stabilised=[False, False, True, True],
                             lr=[0.05, 0.05, 0.05, 0.05], lr_b=[1e-4, 1e-3, 1e-4, 1e-3],
                             status=["ok", "diverged", "ok", "ok"], test_acc=[0.9, 0.1, 0.91, 0.92]))
    share, acc = stability_tables(grid)
    assert share.loc[("ra_rev", False), "ok"] == 0.5 and share.loc[("ra_rev", True), "ok"] == 1.0
    assert acc.loc[("ra_rev", False, 0.05), 1e-4] == pytest.approx(0.9)
    assert math.isnan(acc.loc[("ra_rev", False, 0.05), 1e-3])  # diverged: no accuracy shown
    assert acc.loc[("ra_rev", True, 0.05), 1e-3] == pytest.approx(0.92)


# --------------------------------------------------------------------------------------------
# the RA study (fa_study.experiments.ra_study): cached runs, stability map, failed and
# diverged runs in the view and the summaries
# --------------------------------------------------------------------------------------------

def _tiny_ra_study(rules=("bp", "ra_fa"), epochs=1):
    from fa_study.experiments import RAStudy

    return RAStudy.for_profile("quick", rules=rules, epochs=epochs, n_train=300, n_test=200, hidden=32)


def test_run_ra_is_tidy_and_cached(cache):
    import dataclasses

    from fa_study.experiments import ra_summary, run_ra
    from fa_study.runs import Results

    study = _tiny_ra_study()
    first = run_ra(study)
    assert isinstance(first, Results) and first.from_cache == 0 and first.units == 2
    hist = first.history
    assert set(hist["arm"]) == {"bp", "ra_fa"} and set(hist["epoch"]) == {0, 1}
    assert {"data_source", "seed", "lr", "d", "rule", "test_acc", "align_0", "status"} <= set(hist.columns)
    assert set(hist["d"]) == {32} and set(first.runs["model"]) == {"matrix_mlp"}
    again = run_ra(study)
    assert again.from_cache == 2
    pd.testing.assert_frame_equal(hist, again.history)
    # one changed setting reuses nothing for that setting but everything for the rest
    three = dataclasses.replace(study, rules=("bp", "ra_fa", "ra_recon"))
    more = run_ra(three)
    assert more.from_cache == 2 and more.units == 3
    table = ra_summary(more.history)
    assert list(table["arm"]) == [s.label for s in three.specs()]
    assert (table["diverged"] == 0).all()


def test_stability_map_keeps_the_row_of_a_run_that_diverged_early(cache):
    from fa_study.experiments import stability_figure, stability_map

    study = _tiny_ra_study(rules=("bp", "ra_rev"), epochs=2)
    table = stability_map(study, lrs=(0.05, 1e4), lr_bs=(1e-3,))
    assert list(zip(table["rule"], table["lr"], table["lr_b"])) == \
        [("ra_rev", 0.05, 1e-3), ("ra_rev", 1e4, 1e-3)]
    ok, bad = table.iloc[0], table.iloc[1]
    assert ok["status"] == "ok" and math.isnan(ok["diverged_epoch"]) and np.isfinite(ok["mean_alignment"])
    # diverged in epoch 1 of 2; the same label at the lower lr ran both epochs
    assert bad["status"] == "diverged" and bad["diverged_epoch"] == 1.0 and math.isnan(bad["test_acc"])
    fig = stability_figure(table)
    assert "✗" in [t.get_text() for t in fig.axes[0].texts]


def test_ra_view_leaves_a_diverged_run_out_of_the_plots(cache, monkeypatch):
    from fa_study.experiments import ra_view
    from study_helpers import assert_not_drawn, diverge

    diverge(monkeypatch, "ra_fa")
    out = ra_view(_tiny_ra_study(rules=("bp", "ra_fa", "ra_recon")))
    status = out.extra.runs.set_index("arm")["status"]
    assert status["ra_fa"] == "diverged" and (status.drop("ra_fa") == "ok").all()
    assert any(n.startswith("Diverged runs") and "ra_fa (seed 42)" in n for n in out.notes)
    assert_not_drawn(out.figures, "ra_fa")
    t = out.table.set_index("arm")
    assert t.loc["ra_fa", "diverged"] == 1 and t.loc["ra_fa", "test_acc_text"] == "n/a"


def test_ra_final_and_summary_name_a_rule_whose_runs_failed(cache, fail_runs):
    from fa_study.experiments import ra_final, ra_summary, ra_view

    fail_runs("ra_fa")
    out = ra_view(_tiny_ra_study())
    final = ra_final(out.results, out.extra.runs)
    assert final.loc["ra_fa", "status"] == "error" and math.isnan(final.loc["ra_fa", "test_acc"])
    assert "injected failure of ra_fa" in final.loc["ra_fa", "error"] and final.loc["bp", "error"] == ""
    assert final.loc["bp", "status"] == "ok" and np.isfinite(final.loc["bp", "test_acc"])
    assert "ra_fa" not in ra_final(out.results).index  # the history alone has no trace of it
    table = ra_summary(out.results, out.extra.runs).set_index("arm")
    assert table.loc["ra_fa", "diverged"] == 1 and table.loc["ra_fa", "test_acc_text"] == "n/a"
    empty = ra_summary(pd.DataFrame(), out.extra.runs)  # no history at all: no KeyError
    assert empty["arm"].tolist() == ["bp", "ra_fa"] and (empty["test_acc_text"] == "n/a").all()
