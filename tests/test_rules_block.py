"""Block rules of ``fa_study.rules`` (bp, frozen, shallow, fa, dfa, oracle): each rule's
gradients against an explicit formula or a hand-written autograd of the reference's separate
local losses; credit signals against their definitions; the shared surrogate helpers of
``fa_study.rules.base``."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study.models import audit_archs, build_model
from fa_study.diagnostics import bp_reference
from fa_study.rules import (BP, DFA, FA, RULES, Frozen, Method, Oracle, Shallow, backward_local,
                            build_rule, local_forward, local_surrogate, output_error,
                            rms_normalise, surrogate_output_grads)

SHAPE = (3, 4, 4)
CLASSES = 5
BATCH = 7
SIZES = {"resmlp": dict(d=8, num_blocks=3), "vit": dict(d=8, num_blocks=2, heads=2, patch_size=2),
         "resnet": dict(d=4, num_blocks=2)}


def _model(arch: str = "resmlp", seed: int = 0, **kw):
    torch.manual_seed(seed)
    sizes = dict(SIZES[arch])
    sizes.update(kw)
    return build_model(arch, input_shape=SHAPE, num_classes=CLASSES, **sizes).double()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, *SHAPE, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (BATCH,), generator=g))


def _setup(method: Method, model, seed: int = 3) -> Method:
    method.setup(model, CLASSES, torch.Generator().manual_seed(seed))
    if getattr(method, "B", None):
        method.B = [b.double() for b in method.B]
    return method


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rms_normalised(a):
    """Per-sample rms over the feature axis (the reference's (batch, d) signals)."""
    return a / (a.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)


def _reference_local_grads(model, x, y, signals, penalty):
    """The reference's separate local losses, one autograd call each.

    ``signals[0]`` trains the embedding, ``signals[l + 1]`` block l; every loss is
    ``mean over batch and positions of <f, a/rms(a)>`` plus ``penalty * ||f||^2`` likewise.
    ``signals`` are ``(batch, d)``. Returns the parameter gradients of the blocks and the
    embedding by name.
    """
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    named = {id(p): n for n, p in model.named_parameters()}
    out = {}

    def local(f, a, lam):
        a_b = model.broadcast(_rms_normalised(a), f)
        per_pos = (f * a_b).reshape(f.shape[0], -1, model.width) if f.dim() != 4 else \
            (f * a_b).flatten(2).transpose(1, 2)
        sq = (f * f).reshape(per_pos.shape) if f.dim() != 4 else (f * f).flatten(2).transpose(1, 2)
        return per_pos.sum(-1).mean() + lam * sq.sum(-1).mean()

    for l in range(model.num_blocks):
        f = model.branch(l, hiddens[l].detach())
        params = model.block_parameters(l)
        for p, g in zip(params, torch.autograd.grad(local(f, signals[l + 1], penalty), params)):
            out[named[id(p)]] = g
    params = model.embed_parameters()
    for p, g in zip(params, torch.autograd.grad(local(model.embed(x), signals[0], 0.0), params)):
        out[named[id(p)]] = g
    return out


def _head_grads(model, x, y):
    """The head's gradients: cross-entropy on a detached h_L."""
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    head = model.head_parameters()
    named = {id(p): n for n, p in model.named_parameters()}
    grads = torch.autograd.grad(F.cross_entropy(model.readout(hiddens[-1]), y), head)
    return {named[id(p)]: g for p, g in zip(head, grads)}


# --------------------------------------------------------------------------------------------
# DFA
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", audit_archs())
@pytest.mark.parametrize("penalty", [0.0, 0.05])
def test_dfa_gradients_equal_the_reference_local_losses(arch, penalty):
    model = _model(arch).eval()  # eval: BatchNorm uses the same statistics in both computations
    x, y = _batch()
    dfa = _setup(DFA(penalty=penalty), model)
    loss, logits = dfa.fill_grads(model, x, y)
    ours = _grads(model)

    with torch.no_grad():
        ref_logits = model(x)
        e = torch.softmax(ref_logits, -1) - F.one_hot(y, CLASSES).double()
    signals = [e @ dfa.B[0].t()] + [e @ b.t() for b in dfa.B]
    expected = _reference_local_grads(model, x, y, signals, penalty)
    expected.update(_head_grads(model, x, y))

    assert set(ours) == set(expected) == {n for n, _ in model.named_parameters()}
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(loss, F.cross_entropy(ref_logits, y))
    torch.testing.assert_close(logits, ref_logits)
    assert loss.dim() == 0 and not loss.requires_grad and not logits.requires_grad


def test_dfa_second_linear_gradient_is_the_explicit_formula():
    """dL/dW2 of block l = mean_b (a_b/rms(a_b) + 2 lam f_b) z_b^T, z = GELU(W1 LN(h_l))."""
    lam = 0.05
    model = _model("resmlp")
    x, y = _batch()
    grads = {}
    for penalty in (0.0, lam):
        dfa = _setup(DFA(penalty=penalty), model)
        dfa.fill_grads(model, x, y)
        grads[penalty] = [(b.w2.weight.grad.clone(), b.w2.bias.grad.clone()) for b in model.blocks]
    with torch.no_grad():
        logits, hiddens = model(x, return_hidden=True)
        e = torch.softmax(logits, -1) - F.one_hot(y, CLASSES).double()
        for l, blk in enumerate(model.blocks):
            z = F.gelu(blk.w1(blk.ln(hiddens[l])))
            f = z @ blk.w2.weight.t() + blk.w2.bias
            a = e @ dfa.B[l].t()
            a_n = a / (a.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
            torch.testing.assert_close(grads[0.0][l][0], a_n.t() @ z / BATCH)
            torch.testing.assert_close(grads[0.0][l][1], a_n.mean(0))
            # the penalty's own contribution: 2 lam f z^T / batch
            torch.testing.assert_close(grads[lam][l][0] - grads[0.0][l][0], 2 * lam * f.t() @ z / BATCH)
            torch.testing.assert_close(grads[lam][l][1] - grads[0.0][l][1], 2 * lam * f.mean(0))


@pytest.mark.parametrize("arch", audit_archs())
def test_dfa_credit_is_error_times_feedback(arch):
    model = _model(arch).eval()
    x, y = _batch()
    dfa = _setup(DFA(), model)
    credit = dfa.credit(model, x, y)
    with torch.no_grad():
        logits, hiddens = model(x, return_hidden=True)
    e = output_error(logits, y)
    torch.testing.assert_close(e, torch.softmax(logits, -1) - F.one_hot(y, CLASSES).double())
    assert len(credit) == model.num_blocks + 1
    torch.testing.assert_close(credit[0], model.broadcast(e @ dfa.B[0].t(), hiddens[0]))
    for l in range(model.num_blocks):
        torch.testing.assert_close(credit[l + 1], model.broadcast(e @ dfa.B[l].t(), hiddens[l + 1]))
    assert all(c.shape == h.shape for c, h in zip(credit, hiddens))
    # feedback_matrices() is the matrix M_l with a_l = e M_l^T at every hidden state
    for a, M, h in zip(credit, dfa.feedback_matrices(), hiddens):
        torch.testing.assert_close(a, model.broadcast(e @ M.t(), h))


def test_dfa_feedback_shapes_and_scale():
    torch.manual_seed(0)
    model = build_model("resmlp", input_shape=SHAPE, num_classes=10, d=64, num_blocks=3)
    dfa = DFA()
    dfa.setup(model, 10, torch.Generator().manual_seed(0))
    assert [tuple(b.shape) for b in dfa.B] == [(64, 10)] * 3
    std = torch.cat([b.flatten() for b in dfa.B]).std().item()
    assert abs(std - 1 / math.sqrt(10)) < 0.05  # entries ~ N(0, 1/C)


# --------------------------------------------------------------------------------------------
# Block FA
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", audit_archs())
def test_fa_gradients_equal_the_reference_local_losses(arch):
    model = _model(arch).eval()
    x, y = _batch()
    fa = _setup(FA(penalty=0.02), model)
    fa.fill_grads(model, x, y)
    ours = _grads(model)

    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    z = model.pool(hiddens[-1]).detach().requires_grad_(True)
    head = model.head_parameters()
    loss = F.cross_entropy(model.classify(z), y)
    g = torch.autograd.grad(loss, [z] + head)
    a = [g[0]]
    for l in range(model.num_blocks - 1, -1, -1):  # a_l = a_{l+1} B_l, from the top down
        a.insert(0, a[0] @ fa.B[l])
    expected = _reference_local_grads(model, x, y, a, 0.02)
    named = {id(p): n for n, p in model.named_parameters()}
    expected.update({named[id(p)]: gp for p, gp in zip(head, g[1:])})
    assert set(ours) == set(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_fa_feedback_shapes_and_scale():
    torch.manual_seed(0)
    model = build_model("resmlp", input_shape=SHAPE, num_classes=10, d=64, num_blocks=3)
    fa = FA()
    fa.setup(model, 10, torch.Generator().manual_seed(0))
    assert [tuple(b.shape) for b in fa.B] == [(64, 64)] * 3
    std = torch.cat([b.flatten() for b in fa.B]).std().item()
    assert abs(std - 1 / math.sqrt(64)) < 0.01  # entries ~ N(0, 1/d)


def test_fa_signals_follow_feedback_replaced_or_changed_in_place():
    """FA caches the products B_{L-1}...B_l; the credit must follow any change of B."""
    model = _model("resmlp").eval()
    x, y = _batch()
    fa = _setup(FA(), model)

    def chained(a_top):
        a = [a_top]
        for l in range(model.num_blocks - 1, -1, -1):
            a.insert(0, a[0] @ fa.B[l])
        return a

    for change in (None, "in_place", "replaced"):
        if change == "in_place":
            fa.B[1].mul_(-2.0)
        elif change == "replaced":
            fa.B = [b.flip(0).clone() for b in fa.B]
        a_top = fa.credit(model, x, y)[-1]
        for got, want in zip(fa.credit(model, x, y), chained(a_top)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=str(change))


def test_fa_with_true_jacobians_gives_the_bp_gradient():
    """A linear residual MLP (no norms, identity activation): with B_l set to the block
    Jacobians dh_{l+1}/dh_l, FA's credit is exactly the BP gradient (cosine 1)."""
    model = _model("resmlp", d=6, num_blocks=4, activation="identity", block_norm=False,
                   final_norm=False, w2_std=0.3)
    x, y = _batch()
    fa = _setup(FA(), model)
    h = torch.zeros(1, 6, dtype=torch.float64)
    fa.B = [torch.autograd.functional.jacobian(lambda v, l=l: model.step(l, v), h)[0, :, 0, :]
            for l in range(model.num_blocks)]
    for l, blk in enumerate(model.blocks):  # the Jacobian of h + W2 W1 h
        torch.testing.assert_close(fa.B[l], torch.eye(6, dtype=torch.float64) + blk.w2.weight @ blk.w1.weight)
    credit = fa.credit(model, x, y)
    _, grads, _ = bp_reference(model, x, y)
    for a, g in zip(credit, grads):
        cos = F.cosine_similarity(a, g, dim=-1, eps=1e-30)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-10)
        torch.testing.assert_close(a, g)
    # the random feedback it replaced is far from parallel
    random_fa = _setup(FA(), model)
    cos_random = F.cosine_similarity(random_fa.credit(model, x, y)[0], grads[0], dim=-1).mean()
    assert cos_random < 0.9


@pytest.mark.parametrize("arch", audit_archs())
def test_fa_credit_at_the_top_is_the_head_gradient(arch):
    model = _model(arch).eval()
    x, y = _batch()
    fa = _setup(FA(), model)
    credit = fa.credit(model, x, y)
    _, hiddens = model(x, return_hidden=True)
    z = model.pool(hiddens[-1]).detach().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model.classify(z), y), z)
    torch.testing.assert_close(credit[-1], model.broadcast(g, hiddens[-1]))
    assert [c.shape for c in credit] == [h.shape for h in hiddens]


# --------------------------------------------------------------------------------------------
# Oracle: the block-local scheme driven by the exact gradient
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", audit_archs())
def test_oracle_gradients_are_the_local_surrogates_of_the_bp_gradient(arch):
    """Signals shaped like h (the BP gradient at every position) enter the surrogates as they
    are: block l follows mean over batch and positions of <f_l, g_{l+1}/rms(g_{l+1})>, the
    rms taken per sample over every non-batch entry."""
    model = _model(arch).eval()
    x, y = _batch()
    oracle = _setup(Oracle(penalty=0.03), model)
    oracle.fill_grads(model, x, y)
    ours = _grads(model)

    _, g, _ = bp_reference(model, x, y)
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    named = {id(p): n for n, p in model.named_parameters()}
    expected = _head_grads(model, x, y)

    def local(f, a, lam):
        n = f.shape[0] * (f[0].numel() // model.width)  # batch * positions
        a_n = a / (a.pow(2).flatten(1).mean(1).sqrt().reshape(-1, *[1] * (a.dim() - 1)) + 1e-6)
        return ((f * a_n).sum() + lam * (f * f).sum()) / n

    for l in range(model.num_blocks):
        params = model.block_parameters(l)
        loss = local(model.branch(l, hiddens[l]), g[l + 1], 0.03)
        expected.update({named[id(p)]: gp for p, gp in zip(params, torch.autograd.grad(loss, params))})
    params = model.embed_parameters()
    loss = local(model.embed(x), g[0], 0.0)
    expected.update({named[id(p)]: gp for p, gp in zip(params, torch.autograd.grad(loss, params))})
    assert set(ours) == set(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    for a, b in zip(oracle.credit(model, x, y), g):
        torch.testing.assert_close(a, b)


def test_oracle_reads_batchnorm_statistics_before_its_forward():
    """In train mode the BP reference runs before the surrogates' forward and leaves the running
    statistics as they were: one step moves them exactly as one plain forward does."""
    model = _model("resnet").train()
    twin = _model("resnet").train()
    x, y = _batch()
    _setup(Oracle(), model).fill_grads(model, x, y)
    with torch.no_grad():
        twin(x)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)


# --------------------------------------------------------------------------------------------
# BP and the baselines
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", audit_archs())
def test_bp_gradients_and_credit_are_autograd(arch):
    model = _model(arch).eval()
    x, y = _batch()
    bp = _setup(BP(), model)
    loss, _ = bp.fill_grads(model, x, y)
    ours = _grads(model)
    params = list(model.parameters())
    logits, hiddens = model(x, return_hidden=True)
    ref = F.cross_entropy(logits, y)
    expected = torch.autograd.grad(ref, params, retain_graph=True)
    for (name, _), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(ours[name], g, msg=name)
    for a, g in zip(bp.credit(model, x, y), torch.autograd.grad(ref, hiddens)):
        torch.testing.assert_close(a, g)
    torch.testing.assert_close(loss, ref.detach())


def test_frozen_freezes_blocks_and_pins_batchnorm():
    model = _model("resnet")
    frozen = _setup(Frozen(), model)
    block_ids = {id(p) for l in range(model.num_blocks) for p in model.block_parameters(l)}
    assert all(not p.requires_grad for l in range(model.num_blocks) for p in model.block_parameters(l))
    trainable = {id(p) for p in frozen.trainable_parameters(model)}
    assert trainable == {id(p) for p in model.embed_parameters() + model.head_parameters()}
    assert [g["name"] for g in frozen.param_groups(model)] == ["embed", "head"]
    model.train()
    bns = [m for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.stem_bn.training  # the embedding's BatchNorm still trains
    x, y = _batch()
    frozen.fill_grads(model, x, y)
    assert all(p.grad is None for p in model.parameters() if id(p) in block_ids)
    assert all(p.grad is not None for p in model.parameters() if id(p) in trainable)


def test_shallow_needs_a_model_without_blocks():
    shallow = build_rule("shallow")
    assert shallow.model_kwargs() == {"num_blocks": 0}
    with pytest.raises(ValueError, match="num_blocks=0"):
        shallow.setup(_model("resmlp"), CLASSES, torch.Generator())
    model = _model("resmlp", **shallow.model_kwargs())
    shallow.setup(model, CLASSES, torch.Generator())
    loss, _ = shallow.fill_grads(model, *_batch())
    assert torch.isfinite(loss)


def test_dfa_trains_a_model_without_blocks():
    model = _model("resmlp", num_blocks=0)
    dfa = _setup(DFA(), model)
    dfa.fill_grads(model, *_batch())
    assert model.embed_linear.weight.grad is not None and model.out_head.weight.grad is not None
    assert len(dfa.credit(model, *_batch())) == 1


# --------------------------------------------------------------------------------------------
# The shared surrogate helpers of fa_study.rules.base
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", audit_archs())
def test_closed_form_surrogate_grads_equal_autograd_of_local_surrogate(arch):
    """surrogate_output_grads is d local_surrogate / d f, for (batch, d) signals and for signals
    shaped like h, with and without the penalty; backward_local feeds them to one backward."""
    model = _model(arch).eval()
    x, _ = _batch()
    g = torch.Generator().manual_seed(5)
    h0, branches, hiddens = local_forward(model, x)
    outputs = [h0] + branches
    for shaped_like_h in (False, True):
        signals = [torch.randn(h.shape if shaped_like_h else (h.shape[0], model.width), generator=g,
                               dtype=h.dtype) for h in hiddens]
        penalties = [0.0] + [0.07] * model.num_blocks
        closed = surrogate_output_grads(model, outputs, signals, penalties)
        for f, a, p, c in zip(outputs, signals, penalties, closed):
            want, = torch.autograd.grad(local_surrogate(model, f, a, p), f, retain_graph=True)
            torch.testing.assert_close(c, want, rtol=1e-10, atol=1e-13)
    # backward_local: the parameter gradients of the summed surrogates, in one call
    model.zero_grad()
    backward_local(model, outputs, signals, penalties)
    ours = _grads(model)
    model.zero_grad()
    h0, branches, _ = local_forward(model, x)
    sum(local_surrogate(model, f, a, p) for f, a, p in zip([h0] + branches, signals, penalties)).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-10, atol=1e-13, msg=name)


def test_local_forward_detaches_every_block_input():
    model = _model("resmlp")
    x, _ = _batch()
    h0, branches, hiddens = local_forward(model, x)
    _, ref = model(x, return_hidden=True)
    for h, r in zip(hiddens, ref):
        torch.testing.assert_close(h, r)
        assert not h.requires_grad
    assert h0.requires_grad and all(f.requires_grad for f in branches)
    # a branch's graph reaches its own block only
    params = model.block_parameters(0) + model.embed_parameters()
    grads = torch.autograd.grad(branches[1].sum(), params, allow_unused=True)
    assert all(gr is None for gr in grads)


def test_rms_normalise_is_per_sample_over_every_non_batch_entry():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    a[1] *= 1e3
    n = rms_normalise(a)
    torch.testing.assert_close(n.pow(2).mean(dim=(1, 2)), torch.ones(3, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    flat = rms_normalise(a.reshape(3, -1))
    torch.testing.assert_close(flat, _rms_normalised(a.reshape(3, -1)))
    assert torch.equal(rms_normalise(torch.zeros(2, 3)), torch.zeros(2, 3))  # the floor: no NaN


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", [("bp", {}), ("fa", {}), ("dfa", {}), ("stiefel_dfa", {"eta_B": 0.0})])
def test_one_forward_per_step(name, opts):
    """fa and dfa (every BlockLocal rule whose feedback does not learn) reuse the single
    forward: every block and the embedding run exactly once."""
    model = _model("resmlp")
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda *_, i=i: calls.append(i))
    model.embed_linear.register_forward_hook(lambda *_: calls.append("embed"))
    method = build_rule(name, **opts)
    method.setup(model, CLASSES, torch.Generator().manual_seed(3))
    method.fill_grads(model, *_batch())
    assert calls == ["embed", 0, 1, 2]


def test_fresh_draws_new_feedback_with_the_same_options():
    model = _model("resmlp")
    for cls in (FA, DFA):
        method = _setup(cls(penalty=0.01), model)
        before = [b.clone() for b in method.B]
        other = method.fresh(torch.Generator().manual_seed(99))
        assert other.penalty == 0.01 and other.ready and type(other) is cls
        assert [b.shape for b in other.B] == [b.shape for b in before]
        assert all(not torch.equal(a.double(), b) for a, b in zip(other.B, before))
        assert all(torch.equal(a, b) for a, b in zip(method.B, before))  # the original is untouched
        again = method.fresh(torch.Generator().manual_seed(99))
        assert all(torch.equal(a, b) for a, b in zip(other.B, again.B))  # seeded
        # the fresh copy's credit uses its own feedback
        x, y = _batch()
        other.B = [b.double() for b in other.B]
        assert not torch.allclose(other.credit(model, x, y)[0], method.credit(model, x, y)[0])
    assert isinstance(_setup(BP(), model).fresh(torch.Generator()), BP)


def test_misuse_and_bad_options():
    model = _model("resmlp")
    with pytest.raises(RuntimeError, match="setup"):
        DFA().fill_grads(model, *_batch())
    with pytest.raises(RuntimeError, match="setup"):
        FA().fresh(torch.Generator())
    with pytest.raises(RuntimeError, match="setup"):
        BP().fill_grads(model, *_batch())
    with pytest.raises(ValueError, match="unknown rule 'hebbian'; allowed values: 'bp', 'frozen', "
                                         "'shallow', 'fa', 'dfa'"):
        build_rule("hebbian")
    with pytest.raises(ValueError, match="rule 'bp' has no option 'penalty'; allowed options: none"):
        build_rule("bp", penalty=0.1)
    with pytest.raises(ValueError, match="penalty"):
        build_rule("dfa", penalty=-1.0)
    dfa = _setup(DFA(), model)
    with pytest.raises(ValueError, match="set up for"):
        dfa.fill_grads(_model("resmlp", num_blocks=2), *_batch())
    with pytest.raises(ValueError, match="batch is empty"):
        dfa.fill_grads(model, *[t[:0] for t in _batch()])
    with pytest.raises(ValueError, match="labels y must be"):
        dfa.fill_grads(model, _batch()[0], _batch()[1][:3])
    assert {"bp", "fa", "dfa", "frozen", "shallow", "oracle"} <= set(RULES)
    assert build_rule("dfa", penalty=0.01).options() == {"penalty": 0.01}
    assert build_rule("fa").options() == {"penalty": 0.0}
    assert isinstance(build_rule("shallow"), Shallow) and isinstance(build_rule("oracle"), Oracle)


def test_param_groups_cover_every_trainable_parameter_once():
    model = _model("vit")
    groups = _setup(DFA(), model).param_groups(model)
    assert [g["name"] for g in groups] == ["embed", "block0", "block1", "head"]
    assert [g["clip"] for g in groups] == [False, True, True, False]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
