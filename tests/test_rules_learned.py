"""Learned block feedback of ``fa_study.rules.learned`` (grape_fa, stiefel_dfa): each piece
against autograd, an explicit formula or a known qualitative result, the forward-mode pieces
on every audit architecture, and both rules through the trainer."""
import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study.config import seed_everything
from fa_study.data import Dataset
from fa_study.feedback import grape_step
from fa_study.models import build_model
from fa_study.diagnostics import bp_reference
from fa_study.rules import FA, GrAPEFA, StiefelDFA, build_rule, rms_normalise
from fa_study.rules.base import CreditContext
from fa_study.diagnostics.jacobians import (block_jvp, forward_mode_safe, jvp_jacobian_estimate,
                                             mean_block_jacobian, per_sample_gradients)
from fa_study.rules.learned import node_perturbation_grads
from fa_study.train import TrainConfig, train

SHAPE = (1, 2, 3)
CLASSES = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second thread only adds synchronisation (slow on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(d=6, num_blocks=2, seed=0, dtype=torch.float32, **kw):
    seed_everything(seed)
    kw.setdefault("w2_std", 0.3)  # blocks far from the identity, so Jacobians are not trivial
    m = build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, d=d, num_blocks=num_blocks, **kw)
    return m.to(dtype)


def _batch(n=8, seed=1, dtype=torch.float32, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g)


def _cos(a, b):
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _ctx(model, x, y):
    """The CreditContext a BlockLocal rule's learn() receives for the batch (x, y)."""
    with torch.no_grad():
        logits, hiddens = model(x, return_hidden=True)
    return CreditContext(model, x, y, hiddens, logits, None)


# ------------------------------------------------------------------------------ GrAPE pieces

def test_grape_plain_step_is_autograds_gradient_of_one_minus_cos():
    """The old ``cosine_alignment_grad``: now the plain (``scale_free=False``) GrAPE step."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(5, 7, generator=g, dtype=torch.float64)
    loss = 1 - (B * T).sum() / (B.norm() * T.norm())
    ref, = torch.autograd.grad(loss, B)
    stepped = B.detach().clone()
    grape_step(stepped, T, 1.0, scale_free=False)
    torch.testing.assert_close(B.detach() - stepped, ref, rtol=1e-12, atol=1e-14)
    # a zero target gives no direction: no step
    still = B.detach().clone()
    grape_step(still, torch.zeros_like(T), 1.0)
    assert torch.equal(still, B.detach())


def test_grape_step_is_the_scaled_gradient_step_and_turns_B_toward_the_target():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    T = torch.randn(6, 6, generator=g, dtype=torch.float64)
    Bv = B.clone().requires_grad_(True)
    grad, = torch.autograd.grad(1 - (Bv * T).sum() / (Bv.norm() * T.norm()), Bv)
    expected = B - 0.1 * B.norm() ** 2 * grad
    expected = expected * (B.norm() / expected.norm())  # then rescaled: a rotation toward T
    before = _cos(B, T)
    returned = grape_step(B, T, 0.1)  # scale-free by default
    torch.testing.assert_close(B, expected)
    assert float(returned) == pytest.approx(before)
    assert _cos(B, T) > before + 0.05
    # scale-free: the same step on 10 B turns it by the same angle
    B2 = 10 * torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grape_step(B2, T, 0.1)
    assert _cos(B2, T) == pytest.approx(_cos(B, T), rel=1e-9)


def test_mean_block_jacobian_matches_autograd_and_the_probe_estimate_is_unbiased():
    model = _model(dtype=torch.float64).eval()
    x, _ = _batch(5, dtype=torch.float64)
    h = model.embed(x).detach()
    J = mean_block_jacobian(model, 0, h)
    full = torch.autograd.functional.jacobian(lambda t: model.step(0, t), h)  # (n, d, n, d)
    ref = torch.stack([full[i, :, i, :] for i in range(h.shape[0])]).mean(0)
    torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_block_jacobian(model, 0, h, chunk_rows=7), ref, rtol=1e-10, atol=1e-12)
    # (1/n) sum (J p) p^T over many probes -> the mean Jacobian
    g = torch.Generator().manual_seed(3)
    reps = 4000
    p = torch.randn(reps * h.shape[0], h.shape[1], generator=g, dtype=torch.float64)
    est = jvp_jacobian_estimate(model, 0, h.repeat(reps, 1), p)
    assert (est - J).norm() / J.norm() < 0.05
    assert _cos(est, J) > 0.998


ARCH_SIZES = {"vit": dict(d=8, num_blocks=2, heads=2, patch_size=2), "resnet": dict(d=4, num_blocks=2)}
IMAGE = (3, 4, 4)


def _arch_model(arch, seed=0):
    seed_everything(seed)
    return build_model(arch, input_shape=IMAGE, num_classes=CLASSES, **ARCH_SIZES[arch]).double()


def _autograd_mean_jacobian(model, l, h):
    """Autograd's batch-mean Jacobian of ``pool(step(l, h + broadcast(v)))`` in ``v`` at 0:
    the map a (batch, d) FA signal travels through (rows: outputs)."""
    n = h.shape[0]
    v0 = torch.zeros(n, model.width, dtype=h.dtype)
    full = torch.autograd.functional.jacobian(
        lambda v: model.pool(model.step(l, h + model.broadcast(v, h))), v0)  # (n, d, n, d)
    return torch.stack([full[i, :, i, :] for i in range(n)])  # per sample (n, d_out, d_in)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_jvp_jacobian_estimate_matches_autograd_on_token_and_conv_models(arch):
    """The forward-mode pieces GrAPE-FA uses run through ViTMini's attention and SmallResNet's
    BatchNorm (eval statistics, math attention kernel) and agree with autograd in eval mode,
    whatever mode the model is in; no mode and no running statistic changes."""
    model = _arch_model(arch).train()  # train mode: forward_mode_safe must switch BatchNorm to eval
    x, _ = _batch(4, dtype=torch.float64, shape=IMAGE)
    with torch.no_grad():
        model.eval()
        _, hiddens = model(x, return_hidden=True)
        model.train()
    buffers = copy.deepcopy(dict(model.named_buffers()))
    modes = [m.training for m in model.modules()]
    for l in range(model.num_blocks):
        h = hiddens[l]
        J = mean_block_jacobian(model, l, h)
        model.eval()
        per_sample = _autograd_mean_jacobian(model, l, h)
        model.train()
        torch.testing.assert_close(J, per_sample.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mean_block_jacobian(model, l, h, chunk_rows=9), J, rtol=1e-10, atol=1e-13)
        # one probe per sample: block_jvp is J_i p_i, the estimate (1/n) sum (J_i p_i) p_i^T
        p = torch.randn(h.shape[0], model.width, generator=torch.Generator().manual_seed(l), dtype=h.dtype)
        jp = block_jvp(model, l, h, p)
        torch.testing.assert_close(jp, torch.einsum("nij,nj->ni", per_sample, p), rtol=1e-9, atol=1e-12)
        est = jvp_jacobian_estimate(model, l, h, p)
        torch.testing.assert_close(est, torch.einsum("ni,nj->ij", jp, p) / h.shape[0], rtol=1e-9, atol=1e-12)
        # unbiased: many probes at the same inputs recover the mean Jacobian
        reps = 1500
        pp = torch.randn(reps * h.shape[0], model.width, generator=torch.Generator().manual_seed(10 + l),
                         dtype=h.dtype)
        est = jvp_jacobian_estimate(model, l, h.repeat(reps, *[1] * (h.dim() - 1)), pp)
        assert (est - J).norm() / J.norm() < 0.1 and _cos(est, J) > 0.99
    assert [m.training for m in model.modules()] == modes
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_forward_mode_safe_restores_modes_and_the_fast_path():
    model = _arch_model("resnet").train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].eval()  # a module already in eval mode stays there
    modes = [m.training for m in model.modules()]
    fast = torch.backends.mha.get_fastpath_enabled()
    with forward_mode_safe(model):
        assert not any(m.training for m in bns)
        assert not torch.backends.mha.get_fastpath_enabled()
    assert [m.training for m in model.modules()] == modes
    assert torch.backends.mha.get_fastpath_enabled() == fast


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_grape_fa_steps_on_token_and_conv_models_leave_running_statistics_to_the_forward(arch):
    """A grape_fa step in train mode moves every B_l and the BatchNorm running statistics exactly
    as one plain forward does (the probes do not move them)."""
    model = _arch_model(arch).train()
    twin = _arch_model(arch).train()
    method = GrAPEFA(eta_B=0.2, n_probe=3)
    method.setup(model, CLASSES, torch.Generator().manual_seed(0))
    before = [b.clone() for b in method.B]
    x, y = _batch(4, dtype=torch.float64, shape=IMAGE)
    method.fill_grads(model, x, y)
    with torch.no_grad():
        twin(x)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    assert all(not torch.equal(a, b) for a, b in zip(before, method.B))
    state = method.state()
    assert sorted(state) == [f"probe_cos_{l}" for l in range(model.num_blocks)]
    assert all(-1.0 <= v <= 1.0 for v in state.values())


def test_grape_fa_steps_align_B_with_the_jacobian_of_a_fixed_linear_residual_model():
    # linear blocks without norms: J_l = I + W2 W1 exactly, the same at every input
    model = _model(d=8, num_blocks=3, activation="identity", block_norm=False)
    method = GrAPEFA(eta_B=0.1)
    method.setup(model, CLASSES, torch.Generator().manual_seed(0))
    x, _ = _batch(32)
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    exact = [torch.eye(8) + b.w2.weight @ b.w1.weight for b in model.blocks]
    start = [_cos(B, J) for B, J in zip(method.B, exact)]
    for _ in range(60):
        method.align(model, hiddens)
    end = [_cos(B, J) for B, J in zip(method.B, exact)]
    assert max(abs(c) for c in start) < 0.5
    assert min(end) > 0.95, (start, end)
    fq = method.feedback_quality(model, x, torch.zeros(32, dtype=torch.long))
    assert [fq[f"fb_align_{l}"] for l in range(3)] == pytest.approx(end, abs=1e-5)


def test_grape_fa_without_steps_is_block_fa_bit_for_bit():
    x, y = _batch(8)
    grads = []
    for method in (FA(), GrAPEFA(eta_B=0.0)):
        model = _model()
        method.setup(model, CLASSES, torch.Generator().manual_seed(4))
        method.fill_grads(model, x, y)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_grape_fa_gradients_are_the_local_surrogates_and_B_moves_after_them():
    model = _model()
    method = GrAPEFA(eta_B=0.2)
    method.setup(model, CLASSES, torch.Generator().manual_seed(4))
    B_before = [b.clone() for b in method.B]
    x, y = _batch(8)
    method.fill_grads(model, x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the explicit formula: a_L = dCE/dh_L, a_l = a_{l+1} B_l (old B), block l follows
    # <f_l(h_l), a_{l+1}/rms(a_{l+1})> (batch mean), the embedding <h_0, a_0/rms>, the head CE
    model.zero_grad()
    h0 = model.embed(x)
    hs, fs = [h0.detach()], []
    for l in range(model.num_blocks):
        f = model.blocks[l](hs[-1])
        fs.append(f)
        hs.append((hs[-1] + f).detach())
    z = hs[-1].clone().requires_grad_(True)
    ce = F.cross_entropy(model.readout(z), y)
    a_top, = torch.autograd.grad(ce, z, retain_graph=True)
    a = [a_top]
    for l in reversed(range(model.num_blocks)):
        a.insert(0, a[0] @ B_before[l])
    loss = ce + (h0 * rms_normalise(a[0])).sum(-1).mean()
    for l, f in enumerate(fs):
        loss = loss + (f * rms_normalise(a[l + 1])).sum(-1).mean()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert all(not torch.equal(b0, b1) for b0, b1 in zip(B_before, method.B))


# ------------------------------------------------------------------------------ node perturbation

def test_node_perturbation_is_an_unbiased_estimate_of_the_per_sample_gradient():
    model = _model(d=5, num_blocks=2, dtype=torch.float64).eval()
    x, y = _batch(2, dtype=torch.float64)
    exact = per_sample_gradients(model, x, y)
    # the definition: the gradient of each sample's own cross-entropy at h_l
    _, grads, _ = bp_reference(model, x[:1], y[:1])
    torch.testing.assert_close(exact[1][:1], grads[1], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        h0 = model.embed(x)
    est = node_perturbation_grads(model, h0, y, sigma=1e-3, repeats=100_000,
                                  generator=torch.Generator().manual_seed(0))
    for g_hat, g in zip(est, exact):
        assert (g_hat - g).norm() / g.norm() < 0.04  # observed ~0.01
    # a single probe is a noisy but correctly scaled estimate: <g_hat, g> ~ |g|^2 on average
    one = node_perturbation_grads(model, h0.repeat(4000, 1), y.repeat(4000), sigma=1e-3,
                                  generator=torch.Generator().manual_seed(1))
    ratio = float((one[0] * exact[0].repeat(4000, 1)).sum() / exact[0].repeat(4000, 1).pow(2).sum())
    assert ratio == pytest.approx(1.0, abs=0.15)


def test_node_perturbation_rejects_bad_settings():
    model = _model()
    h0 = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="sigma"):
        node_perturbation_grads(model, h0, torch.zeros(2, dtype=torch.long), sigma=0.0)
    with pytest.raises(ValueError, match="repeats"):
        node_perturbation_grads(model, h0, torch.zeros(2, dtype=torch.long), repeats=0)


# ------------------------------------------------------------------------------ Stiefel-DFA

def _stiefel(model, **kw):
    method = StiefelDFA(**kw)
    method.setup(model, CLASSES, torch.Generator().manual_seed(2))
    return method


def test_stiefel_dfa_gradients_are_the_local_surrogates_of_its_credit():
    model = _model()
    method = _stiefel(model, rank=3, eta_B=0.0)
    x, y = _batch(8)
    method.fill_grads(model, x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    h0 = model.embed(x)
    hs, fs = [h0.detach()], []
    for l in range(model.num_blocks):
        f = model.blocks[l](hs[-1])
        fs.append(f)
        hs.append((hs[-1] + f).detach())
    logits = model.readout(hs[-1])
    e = (torch.softmax(logits, -1) - F.one_hot(y, CLASSES)).detach()
    C = method.feedback.C
    a = [layer.alpha * (e @ C.t()) @ layer.U.t() for layer in method.feedback.layers]
    loss = F.cross_entropy(logits, y) + (h0 * rms_normalise(a[0])).sum(-1).mean()
    for l, f in enumerate(fs):
        loss = loss + (f * rms_normalise(a[l + 1])).sum(-1).mean()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    credit = method.credit(model, x, y)
    for l in range(3):
        torch.testing.assert_close(credit[l], a[l])
    # feedback_matrices(): the matrix M_l with a_l = e M_l^T (DFA's form)
    for a_l, M in zip(a, method.feedback_matrices()):
        torch.testing.assert_close(a_l, e @ M.t(), rtol=1e-5, atol=1e-7)


def test_stiefel_dfa_rank_defaults_to_the_number_of_classes():
    method = StiefelDFA()
    assert method.rank is None
    model = _model(d=6)
    method.setup(model, CLASSES, torch.Generator().manual_seed(2))
    assert method.feedback.rank == CLASSES and tuple(method.feedback.C.shape) == (CLASSES, CLASSES)
    assert all(tuple(layer.U.shape) == (6, CLASSES) for layer in method.feedback.layers)
    assert method.options()["rank"] is None  # the option stays "derived"
    narrow = _model(d=3)
    with pytest.raises(ValueError, match="at most the width d=3"):
        StiefelDFA().setup(narrow, CLASSES, torch.Generator())


def test_stiefel_dfa_keeps_U_orthonormal_and_learns_the_gradient_subspace_from_the_true_gradient():
    model = _model(d=10, num_blocks=2)
    method = _stiefel(model, rank=3, eta_B=0.1, probe="bp", tau=0.5)
    x, y = _batch(64)
    before = method.feedback_quality(model, x, y)
    ctx = _ctx(model, x, y)
    for _ in range(80):  # a fixed network: the feedback alone learns
        method.learn(model, ctx)
    after = method.feedback_quality(model, x, y)
    for layer in method.feedback.layers:
        torch.testing.assert_close(layer.U.t() @ layer.U, torch.eye(3), atol=1e-5, rtol=0)
    for l in range(3):
        assert after[f"rho_{l}"] > max(before[f"rho_{l}"] + 0.3, 0.6), (before, after)
        assert after[f"fb_align_{l}"] > before[f"fb_align_{l}"]
    # the credit now points along the BP gradient
    grads = bp_reference(model, x, y)[1]
    credit = method.credit(model, x, y)
    assert all(_cos(a, g) > 0.3 for a, g in zip(credit, grads))


def test_stiefel_dfa_learns_from_node_perturbation_alone():
    model = _model(d=10, num_blocks=2)
    method = _stiefel(model, rank=3, eta_B=0.05, probe="node", tau=0.95)
    x, y = _batch(64)
    before = method.feedback_quality(model, x, y)
    ctx = _ctx(model, x, y)
    for _ in range(150):
        method.learn(model, ctx)
    after = method.feedback_quality(model, x, y)
    assert min(after[f"rho_{l}"] - before[f"rho_{l}"] for l in range(3)) > 0.2, (before, after)


def test_stiefel_step_does_not_depend_on_the_gradient_scale():
    # U's speed must not follow the gradient's size (it changes by decades during training)
    g = torch.Generator().manual_seed(5)
    g_hats = [torch.randn(16, 6, generator=g) for _ in range(3)]
    c = torch.randn(16, 3, generator=g)
    Us = []
    for scale in (1.0, 1e3):
        method = _stiefel(_model(), rank=3, eta_B=0.2, tau=0.5)
        U0 = [layer.U.clone() for layer in method.feedback.layers]
        for _ in range(3):
            method.update_feedback([scale * h for h in g_hats], c)
        Us.append([layer.U.clone() for layer in method.feedback.layers])
    for a, b, u0 in zip(*Us, U0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert (a - u0).norm() > 0.1  # and it did move
        # each step is at most eta_B in Frobenius norm (before the retraction)
        assert (a - u0).norm() < 3 * 0.2 + 1e-4


def test_stiefel_dfa_rejects_bad_options_and_misuse():
    with pytest.raises(ValueError, match="probe"):
        StiefelDFA(probe="backprop")
    with pytest.raises(ValueError, match="rank"):
        StiefelDFA(rank=0)
    with pytest.raises(ValueError, match="tau"):
        StiefelDFA(tau=1.0)
    with pytest.raises(ValueError, match="eta_B"):
        GrAPEFA(eta_B=-1.0)
    with pytest.raises(ValueError, match="n_probe"):
        GrAPEFA(n_probe=0)
    with pytest.raises(ValueError, match="at most the number of classes"):
        _stiefel(_model(), rank=CLASSES + 1)
    with pytest.raises(RuntimeError, match="setup"):
        StiefelDFA().fill_grads(_model(), *_batch(4))
    with pytest.raises(RuntimeError, match="setup"):
        GrAPEFA().fill_grads(_model(), *_batch(4))
    with pytest.raises(ValueError, match="unknown rule 'grape'.*'grape_fa', 'stiefel_dfa'"):
        build_rule("grape")
    with pytest.raises(ValueError, match="rule 'grape_fa' has no option 'lr_b'"):
        build_rule("grape_fa", lr_b=0.1)
    method = _stiefel(_model(d=6, num_blocks=2), rank=3)
    with pytest.raises(ValueError, match="set up for"):
        method.fill_grads(_model(d=6, num_blocks=1), *_batch(4))
    assert isinstance(build_rule("fa"), FA) and not isinstance(build_rule("fa"), GrAPEFA)
    assert build_rule("stiefel_dfa", rank=2).rank == 2
    assert build_rule("grape_fa", eta_B=0.3).options() == {"penalty": 0.0, "eta_B": 0.3, "n_probe": 32}


def test_fresh_redraws_the_stiefel_feedback():
    model = _model()
    method = _stiefel(model, rank=3)
    C, Us = method.feedback.C.clone(), [layer.U.clone() for layer in method.feedback.layers]
    other = method.fresh(torch.Generator().manual_seed(99))
    assert not torch.equal(other.feedback.C, method.feedback.C)
    assert other.feedback is not method.feedback and other.rank == 3 and other.ready
    assert all(not torch.equal(a.U, b) for a, b in zip(other.feedback.layers, Us))
    assert torch.equal(method.feedback.C, C)  # the original is untouched
    again = method.fresh(torch.Generator().manual_seed(99))
    assert torch.equal(again.feedback.C, other.feedback.C)  # seeded
    x, y = _batch(8)
    assert not torch.allclose(other.credit(model, x, y)[1], method.credit(model, x, y)[1])


def test_fresh_grape_fa_redraws_B_as_fa_does():
    model = _model()
    method = GrAPEFA()
    method.setup(model, CLASSES, torch.Generator().manual_seed(1))
    other = method.fresh(torch.Generator().manual_seed(7))
    fa = FA()
    fa.setup(model, CLASSES, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(method.B, fa.B))  # drawn exactly as FA's
    assert all(torch.equal(a, b) for a, b in zip(other.B, fa.fresh(torch.Generator().manual_seed(7)).B))
    assert all(not torch.equal(a, b) for a, b in zip(other.B, method.B))


# ------------------------------------------------------------------------------ through the trainer

def _toy(n, split, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(CLASSES, math.prod(SHAPE), generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, *SHAPE, generator=g)
    return Dataset("toy", split, x, (x.reshape(n, -1) @ teacher.t()).argmax(-1), "toy-teacher",
                   CLASSES, (0.0,), (1.0,))


@pytest.mark.parametrize("name,opts", [("grape_fa", {"eta_B": 0.2, "n_probe": 16}), ("oracle", {}),
                                       ("stiefel_dfa", {"rank": 3}),
                                       ("stiefel_dfa", {"rank": 2, "probe": "bp"})])
def test_the_rules_train_with_the_trainer_reproducibly(name, opts):
    train_ds, test_ds = _toy(96, "train", 1), _toy(32, "test", 2)
    cfg = TrainConfig(epochs=2, batch_size=32, eval_batch=16, seed=3)
    runs = []
    for _ in range(2):
        seed_everything(0)
        model = build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, d=8, num_blocks=2)
        method = build_rule(name, **opts)
        runs.append((train(model, method, train_ds, test_ds, cfg), method))
    (first, method), (second, _) = runs
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert (first["status"] == "ok").all() and first[["cos_0", "cos_1", "cos_2"]].notna().all().all()
    assert first["rule"].iloc[0] == name
    if name == "oracle":
        assert (first[["cos_0", "cos_1", "cos_2"]] > 0.999).all().all()
        return
    assert first["eta_B"].iloc[0] == method.eta_B
    state = method.state()
    assert state and all(math.isfinite(v) for v in state.values())
    # rule.state() is a column of every epoch after the first step
    for key, value in state.items():
        assert first[key].iloc[-1] == pytest.approx(value)


def test_grape_fa_probes_each_block_at_its_own_input():
    """align(): the step of B_l is GrAPE's toward J_hat_l = (1/n) sum_i (J_l(h_l,i) p_i) p_i^T,
    block l's Jacobian taken at ITS input h_l (not at h_{l+1}), with per-sample Jacobians from
    autograd; the returned cosine is cos(B_l, J_hat_l) before the step. A gelu model, so the
    Jacobian depends on where it is taken."""
    model = _model(d=6, num_blocks=3, dtype=torch.float64).eval()
    method = GrAPEFA(eta_B=0.3, n_probe=5)
    method.setup(model, CLASSES, torch.Generator().manual_seed(0))
    x, _ = _batch(8, dtype=torch.float64)
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    before = [b.clone() for b in method.B]
    cos = method.align(model, hiddens)
    probes = torch.Generator().manual_seed(method._step_seed)  # the rule's own probe stream
    for l, (b0, b1) in enumerate(zip(before, method.B)):
        p = torch.randn(5, 6, generator=probes, dtype=torch.float64)
        h = hiddens[l][:5]
        full = torch.autograd.functional.jacobian(lambda t: model.step(l, t), h)  # (n, d, n, d)
        J_hat = sum(full[i, :, i, :] @ p[i][:, None] @ p[i][None, :] for i in range(5)) / 5
        assert float(cos[l]) == pytest.approx(_cos(b0, J_hat), abs=1e-9)
        expected = b0.clone()
        grape_step(expected, J_hat, 0.3)
        torch.testing.assert_close(b1, expected, rtol=1e-9, atol=1e-12)


def test_direct_feedback_quality_is_the_cosine_with_the_gradient_error_cross_covariance():
    """DFA's fb_align_l = cos(M_l, (1/n) sum_i g_i e_i^T) with M_l the matrix of a_l = e M_l^T
    (B_0 for h_0 and h_1, B_l for h_{l+1}), e = softmax - onehot and g_i the per-sample
    gradient of loss_i at h_l (autograd of the summed per-sample losses)."""
    model = _model(d=6, num_blocks=2)
    method = build_rule("dfa")
    method.setup(model, CLASSES, torch.Generator().manual_seed(0))
    x, y = _batch(16)
    fq = method.feedback_quality(model, x, y)
    model.eval()
    logits, hiddens = model(x, return_hidden=True)
    grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), hiddens)
    e = torch.softmax(logits.detach(), -1) - F.one_hot(y, CLASSES).float()
    M = [method.B[0], method.B[0], method.B[1]]
    for l, g in enumerate(grads):
        assert fq[f"fb_align_{l}"] == pytest.approx(_cos(M[l], g.t() @ e / 16), abs=1e-5)
