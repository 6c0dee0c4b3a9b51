"""Layer-level rules as Methods (``fa_study.rules.layer``): a converted model plus the one
post-backward step. Each rule's gradients against a hand-converted copy trained by the recipe of
:mod:`fa_study.feedback` (autograd, ``capture_output_error``, ``feedback_step``); Nøkland's gated
DFA against its explicit formula; the credit against what the converted backward delivers."""
import math

import pytest
import torch
import torch.nn.functional as F

from fa_study import feedback
from fa_study.models import build_model
from fa_study.diagnostics import bp_reference, bp_twin
from fa_study.rules import RULES, build_rule, convert
from fa_study.rules.base import draw_seed
from fa_study.train import TrainConfig

SHAPE = (3, 4, 4)
CLASSES = 5
BATCH = 7
D, L = 8, 3
LAYER_RULES = sorted(n for n, c in RULES.items() if c.family == "layer")


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    sizes = dict(d=D, num_blocks=L, w2_std=0.3)
    sizes.update(kw)
    return build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, **sizes).double()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, *SHAPE, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (BATCH,), generator=g))


def _rule(name, model, seed=4, **opts):
    rule = build_rule(name, **opts)
    rule.setup(model, CLASSES, torch.Generator().manual_seed(seed))
    return rule


# how each registered layer rule converts a model, written out by hand: convert() with every
# option spelled out (Kolen-Pollack without a trainer config: step 0.01, no decay)
BY_HAND = {
    ("layer_fa", ()): {"init": "gaussian", "sparse_k": None, "init_std": None},
    ("sign_sym", ()): {},
    ("frsf", ()): {"init_std": None},
    ("brsf", ()): {"init_std": None},
    ("layer_grape", ()): {"lr_b": 0.05, "n_probe": 32, "scale_free": True, "normalize_columns": False},
    ("kolen_pollack", ()): {"lr_b": 0.01, "b_decay": 0.0},
    ("weight_mirror", ()): {"lr_b": 0.05, "sigma": 1.0, "n_noise": 64},
    ("layer_dfa", ()): {"gated": True, "init_std": 0.02},
    ("layer_dfa", (("gated", False),)): {"gated": False, "init_std": 0.02},
    ("layer_dfa_block", ()): {},
}


def test_by_hand_covers_every_layer_rule():
    assert {name for name, _ in BY_HAND} == set(LAYER_RULES)


@pytest.mark.parametrize("name,opts", sorted(BY_HAND), ids=lambda v: str(v))
def test_layer_rule_is_autograd_plus_the_feedback_step(name, opts):
    x, y = _batch()
    ours = _model()
    rule = _rule(name, ours, **dict(opts))
    for _ in range(2):  # twice: learned feedback must move the same way as by hand
        rule.fill_grads(ours, x, y)

    ref = _model()  # the same weights, converted and stepped by hand
    g = torch.Generator().manual_seed(4)
    convert(ref, name, generator=g, num_classes=CLASSES, **BY_HAND[(name, opts)])
    step_gen = torch.Generator().manual_seed(draw_seed(g))  # the rule's own noise stream
    for _ in range(2):
        for p in ref.parameters():
            p.grad = None
        out = ref(x)
        feedback.capture_output_error(ref, out)
        F.cross_entropy(out, y).backward()
        feedback.feedback_step(ref, generator=step_gen)

    assert len(feedback.local_layers(ours)) == 2 + 2 * ours.num_blocks  # embed, head, 2 per block
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)
    for (n, a), b in zip(ours.named_buffers(), ref.buffers()):  # B, B_dfa, B_abs, ...
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)
    methods = [[m.method for _, m in feedback.local_layers(net)] for net in (ours, ref)]
    assert methods[0] == methods[1]


def _gelu_prime(z):
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        g, = torch.autograd.grad(F.gelu(zz).sum(), zz)
    return g


def test_layer_dfa_is_noklands_gated_update():
    """A block's first linear W1 (input u = LN(h_l), pre-activation a = W1 u + b) updates by
    ((e B^T) ⊙ f'(a))^T u, where B is the next layer's (W2's) direct feedback matrix and e the
    output error dL/dlogits; the second linear by the gradient the converted backward delivers
    at the block output, (credit at h_{l+1})^T GELU(a). The ungated variant drops f'."""
    x, y = _batch()
    model = _model()
    rule = _rule("layer_dfa", model)
    credit = rule.credit(model, x, y)
    rule.fill_grads(model, x, y)
    with torch.no_grad():
        logits, hiddens = model(x, return_hidden=True)
        e = (torch.softmax(logits, -1) - F.one_hot(y, CLASSES).double()) / BATCH  # dL/dlogits
        for l, blk in enumerate(model.blocks):
            u = blk.ln(hiddens[l])
            a = blk.w1(u)
            assert tuple(blk.w2.B_dfa.shape) == (CLASSES, D)
            delta = (e @ blk.w2.B_dfa) * _gelu_prime(a)
            torch.testing.assert_close(blk.w1.weight.grad, delta.t() @ u, msg=f"block {l} W1")
            torch.testing.assert_close(blk.w1.bias.grad, delta.sum(0), msg=f"block {l} b1")
            torch.testing.assert_close(blk.w2.weight.grad, credit[l + 1].t() @ F.gelu(a), msg=f"block {l} W2")
    # the head's own update is its BP gradient (its grad_out is e)
    head_in = model.out_ln(hiddens[-1])
    torch.testing.assert_close(model.out_head.weight.grad, e.t() @ head_in)

    ungated = _model()
    rule_u = _rule("layer_dfa", ungated, gated=False)
    assert rule_u.gated is False and rule.gated is True
    assert not rule_u.credit_uses_feedback(rule_u.options()) and rule.credit_uses_feedback(rule.options())
    rule_u.fill_grads(ungated, x, y)
    with torch.no_grad():
        blk = ungated.blocks[0]
        u = blk.ln(hiddens[0])
        assert tuple(blk.w1.B_dfa.shape) == (D, CLASSES)
        torch.testing.assert_close(blk.w1.weight.grad, (e @ blk.w1.B_dfa.t()).t() @ u)  # no f'


def _hidden_grads(model, x, y):
    """autograd of the mean cross-entropy at every h_l through the model's own block interface
    (the output error captured first, for the gated DFA)."""
    h = model.embed(x)
    hiddens = [h]
    for l in range(model.num_blocks):
        h = model.step(l, h)
        hiddens.append(h)
    logits = model.readout(h)
    feedback.capture_output_error(model, logits)
    return list(torch.autograd.grad(F.cross_entropy(logits, y), hiddens)), hiddens


@pytest.mark.parametrize("name", ["layer_fa", "layer_dfa", "frsf"])
def test_layer_rule_credit_is_what_its_backward_delivers(name):
    x, y = _batch()
    model = _model()
    rule = _rule(name, model)
    credit = rule.credit(model, x, y)
    expected, hiddens = _hidden_grads(model, x, y)
    for a, g in zip(credit, expected):
        torch.testing.assert_close(a, g)
    _, true_grads, _ = bp_reference(model, x, y)
    for g, t in zip(true_grads, _hidden_grads(bp_twin(model).model, x, y)[0]):
        torch.testing.assert_close(g, t)  # the BP reference is the BP twin's gradient
    assert not torch.allclose(credit[0], true_grads[0])  # the rule's signal, not BP's
    assert not torch.allclose(credit[-1], true_grads[-1])  # the head is converted too
    fresh = rule.fresh(torch.Generator().manual_seed(5))
    before = {n: b.clone() for n, b in model.named_buffers()}
    fresh_credit = fresh.credit(model, x, y)
    assert not torch.allclose(fresh_credit[0], credit[0])  # newly drawn feedback
    assert [c.shape for c in fresh_credit] == [h.shape for h in hiddens]
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())  # the model's is untouched
    torch.testing.assert_close(rule.credit(model, x, y)[0], credit[0])
    again = rule.fresh(torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.credit(model, x, y)[0], fresh_credit[0])  # seeded


def test_layer_dfa_block_credit_at_block_boundaries_is_the_ordinary_backward():
    x, y = _batch()
    model = _model()
    rule = _rule("layer_dfa_block", model)
    assert not rule.has_random_feedback
    for a, g in zip(rule.credit(model, x, y), bp_reference(model, x, y)[1]):
        torch.testing.assert_close(a, g)


def test_layer_rule_options_names_and_refusals():
    assert build_rule("layer_fa").options() == {"init": "gaussian", "sparse_k": None, "init_std": None}
    model = _model()
    _rule("layer_fa", model, init="orthogonal")
    assert {m.rule.init for _, m in feedback.local_layers(model)} == {"orthogonal"}
    assert RULES["layer_fa"].label_for({"init": "sparse"}) == "layer_fa init=sparse"
    with pytest.raises(ValueError, match="unknown rule 'layer'"):
        build_rule("layer", rule="fa")
    with pytest.raises(ValueError, match="unknown init 'uniform'; allowed values: 'gaussian', 'orthogonal'"):
        build_rule("layer_fa", init="uniform")
    with pytest.raises(ValueError, match="rule 'sign_sym' has no option 'init'"):
        build_rule("sign_sym", init="gaussian")
    with pytest.raises(ValueError, match="lr_b \\* sigma\\*\\*2 < 1"):
        _rule("weight_mirror", _model(), lr_b=2.0)
    with pytest.raises(RuntimeError, match="setup"):
        build_rule("layer_fa").fill_grads(_model(), *_batch())
    with pytest.raises(ValueError, match="'layer_fa' cannot train a 'matrix_mlp' model: it needs an nn.Lin"):
        build_rule("layer_fa").setup(build_model("matrix_mlp", input_shape=SHAPE, num_classes=CLASSES, d=8),
                                     CLASSES, torch.Generator())
    with pytest.raises(ValueError, match="'layer_dfa_block' cannot train a 'resnet' model"):
        resnet = build_model("resnet", input_shape=SHAPE, num_classes=CLASSES, d=4)
        build_rule("layer_dfa_block").setup(resnet, CLASSES, torch.Generator())


def test_a_model_converted_by_the_caller_keeps_its_own_layers():
    model = _model()
    convert(model, "layer_fa", generator=torch.Generator().manual_seed(0), init="orthogonal")
    B = [m.B.clone() for _, m in feedback.local_layers(model)]
    _rule("layer_fa", model)  # default init gaussian: but the caller's conversion stands
    assert all(torch.equal(b, m.B) for b, (_, m) in zip(B, feedback.local_layers(model)))


def test_kolen_pollack_matches_the_step_of_the_trainers_optimizer():
    sgd = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
    model = _model()
    build_rule("kolen_pollack").setup(model, CLASSES, torch.Generator(), train_cfg=sgd)
    opts = {(m.rule.step_size, m.rule.decay) for _, m in feedback.local_layers(model)}
    (lr_b, decay), = opts
    assert lr_b == pytest.approx(0.1 / (1 - 0.9)) and decay == pytest.approx(1e-3 * 0.1 / (1 - 0.9))
    adamw = TrainConfig(lr=2e-3, weight_decay=0.05)
    model = _model()
    build_rule("kolen_pollack").setup(model, CLASSES, torch.Generator(), train_cfg=adamw)
    (lr_b, decay), = {(m.rule.step_size, m.rule.decay) for _, m in feedback.local_layers(model)}
    assert lr_b == pytest.approx(2e-3) and decay == pytest.approx(2e-3 * 0.05)
    model = _model()
    build_rule("kolen_pollack", lr_b=0.3, b_decay=0.1).setup(model, CLASSES, torch.Generator(), train_cfg=sgd)
    assert {(m.rule.step_size, m.rule.decay) for _, m in feedback.local_layers(model)} == {(0.3, 0.1)}
    with pytest.raises(ValueError, match="derived decay of B is 10"):
        build_rule("kolen_pollack").setup(_model(), CLASSES, torch.Generator(),
                                          train_cfg=TrainConfig(optimizer="sgd", lr=1.0, momentum=0.9,
                                                                weight_decay=1.0))


def test_kolen_pollack_under_matched_sgd_brings_B_to_W():
    """With the matched step, B - W only shrinks: (1 - decay) per step, whatever the gradients."""
    from fa_study.train import make_optimizer

    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.5)
    model = _model()
    rule = build_rule("kolen_pollack")
    rule.setup(model, CLASSES, torch.Generator().manual_seed(0), train_cfg=cfg)
    opt = make_optimizer(rule.param_groups(model), cfg)
    layers = [m for _, m in feedback.local_layers(model)]
    gap0 = [float((m.B - m.weight.detach()).norm()) for m in layers]
    x, y = _batch()
    for _ in range(5):
        rule.fill_grads(model, x, y)
        opt.step()
    for m, g0 in zip(layers, gap0):
        assert float((m.B - m.weight.detach()).norm()) == pytest.approx(g0 * (1 - 0.05 * 0.5) ** 5, rel=1e-9)


def test_layer_rules_train_in_float32_with_their_own_noise_stream_reproducibly():
    """brsf and the weight mirror draw noise from a stream seeded at setup: two setups from the
    same generator give the same steps."""
    x, y = (t.float() if t.is_floating_point() else t for t in _batch())
    runs = []
    for _ in range(2):
        model = _model().float()
        rule = _rule("weight_mirror", model)
        rule.fill_grads(model, x, y)
        runs.append([m.B.clone() for _, m in feedback.local_layers(model)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert all(math.isfinite(float(b.sum())) for b in runs[0])
