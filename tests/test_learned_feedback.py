"""Learned block feedback (GrAPE-FA, Stiefel-DFA): each piece against autograd, an explicit
formula or a known qualitative result, and both rules through the unchanged trainer."""
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fa_study.config import seed_everything
from fa_study.data import Dataset
from fa_study.learned_feedback import (GrAPEFA, OracleCredit, StiefelDFA, build_learned_method, cosine_alignment_grad,
                                       feedback_quality, grape_step, jvp_jacobian_estimate,
                                       mean_block_jacobian, node_perturbation_grads,
                                       per_sample_gradients)
from fa_study.methods import FA, bp_gradients, rms_normalise
from fa_study.models import build_model
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


def _batch(n=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g)


def _cos(a, b):
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------ GrAPE pieces

def test_cosine_alignment_grad_is_autograds_gradient_of_one_minus_cos():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(5, 7, generator=g, dtype=torch.float64)
    loss = 1 - (B * T).sum() / (B.norm() * T.norm())
    ref, = torch.autograd.grad(loss, B)
    torch.testing.assert_close(cosine_alignment_grad(B.detach(), T), ref, rtol=1e-12, atol=1e-14)
    # a zero target gives no direction: no step
    assert torch.equal(cosine_alignment_grad(B.detach(), torch.zeros_like(T)), torch.zeros_like(T))


def test_grape_step_is_the_scaled_gradient_step_and_turns_B_toward_the_target():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    T = torch.randn(6, 6, generator=g, dtype=torch.float64)
    expected = B - 0.1 * B.norm() ** 2 * cosine_alignment_grad(B, T)
    before = _cos(B, T)
    returned = grape_step(B, T, 0.1)
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
    fq = feedback_quality(method, model, x, torch.zeros(32, dtype=torch.long))
    assert [fq[f"fb_align_{l}"] for l in range(3)] == pytest.approx(end, abs=1e-5)


def test_grape_fa_without_steps_is_block_fa_bit_for_bit():
    x, y = _batch(8)
    grads = []
    for method in (FA(), GrAPEFA(eta_B=0.0)):
        model = _model()
        method.setup(model, CLASSES, torch.Generator().manual_seed(4))
        loss, _ = method.fill_grads(model, x, y)
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


def test_oracle_trains_blocks_through_the_surrogates_of_the_exact_gradient():
    model = _model()
    method = OracleCredit()
    method.setup(model, CLASSES, torch.Generator().manual_seed(0))
    x, y = _batch(8)
    method.fill_grads(model, x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, g, _ = bp_gradients(model, x, y)
    model.zero_grad()
    h0 = model.embed(x)
    hs, fs = [h0.detach()], []
    for l in range(model.num_blocks):
        f = model.blocks[l](hs[-1])
        fs.append(f)
        hs.append((hs[-1] + f).detach())
    loss = F.cross_entropy(model.readout(hs[-1]), y) + (h0 * rms_normalise(g[0])).sum(-1).mean()
    for l, f in enumerate(fs):
        loss = loss + (f * rms_normalise(g[l + 1])).sum(-1).mean()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    for a, b in zip(method.credit(model, x, y), g):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ node perturbation

def test_node_perturbation_is_an_unbiased_estimate_of_the_per_sample_gradient():
    model = _model(d=5, num_blocks=2, dtype=torch.float64).eval()
    x, y = _batch(2, dtype=torch.float64)
    exact = per_sample_gradients(model, x, y)
    # the definition: the gradient of each sample's own cross-entropy at h_l
    _, grads, _ = bp_gradients(model, x[:1], y[:1])
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
    torch.testing.assert_close(credit[2], a[2])


def test_stiefel_dfa_keeps_U_orthonormal_and_learns_the_gradient_subspace_from_the_true_gradient():
    model = _model(d=10, num_blocks=2)
    method = _stiefel(model, rank=3, eta_B=0.1, probe="bp", tau=0.5)
    x, y = _batch(64)
    before = feedback_quality(method, model, x, y)
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
        c = method.feedback.compress(F.softmax(model(x), -1) - F.one_hot(y, CLASSES))
    for _ in range(80):  # a fixed network: the feedback alone learns
        method.learn(model, x, y, hiddens, c)
    after = feedback_quality(method, model, x, y)
    for layer in method.feedback.layers:
        torch.testing.assert_close(layer.U.t() @ layer.U, torch.eye(3), atol=1e-5, rtol=0)
    for l in range(3):
        assert after[f"rho_{l}"] > max(before[f"rho_{l}"] + 0.3, 0.6), (before, after)
        assert after[f"fb_align_{l}"] > before[f"fb_align_{l}"]
    # the credit now points along the BP gradient
    grads = bp_gradients(model, x, y)[1]
    credit = method.credit(model, x, y)
    assert all(_cos(a, g) > 0.3 for a, g in zip(credit, grads))


def test_stiefel_dfa_learns_from_node_perturbation_alone():
    model = _model(d=10, num_blocks=2)
    method = _stiefel(model, rank=3, eta_B=0.05, probe="node", tau=0.95)
    x, y = _batch(64)
    before = feedback_quality(method, model, x, y)
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
        c = method.feedback.compress(F.softmax(model(x), -1) - F.one_hot(y, CLASSES))
    for _ in range(150):
        method.learn(model, x, y, hiddens, c)
    after = feedback_quality(method, model, x, y)
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
    with pytest.raises(ValueError, match="'grape_fa', 'stiefel_dfa'"):
        build_learned_method("grape")
    with pytest.raises(ValueError, match="no option 'lr_b'"):
        build_learned_method("grape_fa", lr_b=0.1)
    assert isinstance(build_learned_method("fa"), FA)
    assert build_learned_method("stiefel_dfa", rank=2).rank == 2


def test_fresh_redraws_the_stiefel_feedback():
    model = _model()
    method = _stiefel(model, rank=3)
    other = method.fresh(torch.Generator().manual_seed(99))
    assert not torch.equal(other.feedback.C, method.feedback.C)
    assert other.feedback is not method.feedback


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
def test_the_rules_train_with_the_unchanged_trainer_reproducibly(name, opts):
    train_ds, test_ds = _toy(96, "train", 1), _toy(32, "test", 2)
    cfg = TrainConfig(epochs=2, batch_size=32, eval_batch=16, seed=3)
    runs = []
    for _ in range(2):
        seed_everything(0)
        model = build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, d=8, num_blocks=2)
        method = build_learned_method(name, **opts)
        runs.append((train(model, method, train_ds, test_ds, cfg), method))
    (first, method), (second, _) = runs
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert (first["status"] == "ok").all() and first[["cos_0", "cos_1", "cos_2"]].notna().all().all()
    assert first["method"].iloc[0] == name
    if name == "oracle":
        assert (first[["cos_0", "cos_1", "cos_2"]] > 0.999).all().all()
        return
    assert first["eta_B"].iloc[0] == method.eta_B
    state = method.feedback_state()
    assert state and all(math.isfinite(v) for v in state.values())
