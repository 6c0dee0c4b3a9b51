"""The one rule registry: every rule on every architecture, read by every diagnostic.

* ``fa_study.rules.RULES`` holds every rule; ``build_rule`` checks options against the class.
* A parametrized test builds every registered rule on ResidualMLP, ViTMini and SmallResNet,
  trains a few steps, and runs the audit, direction quality and the fresh-feedback null on the
  result; a combination that cannot work is refused before training with a clear error.
* For converted models the protocol's BP reference is the gradient of the unconverted network
  (checked against ``torch.autograd.grad`` of an independent BP copy).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fa_study import data, rules
from fa_study.models import arch_names, build_model
from fa_study.diagnostics import audit, bp_reference, direction_quality, fresh_feedback_null
from fa_study.rules import RULES, build_rule
from fa_study.train import TrainConfig, train

SHAPE = (3, 8, 8)
EXPECTED = {"bp", "frozen", "shallow", "fa", "dfa", "oracle", "grape_fa", "stiefel_dfa", "layer_fa",
            "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack", "weight_mirror", "layer_dfa",
            "layer_dfa_block", "ra_fa", "ra_rev", "ra_recon", "ra_comb"}


def _datasets(n=48, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    y = torch.arange(n) % classes
    mk = lambda split: data.Dataset("toy", split, x.clone(), y.clone(), "synthetic", classes,  # noqa: E731
                                    (0.0,) * 3, (1.0,) * 3)
    return mk("train"), mk("test")


def _model(arch, rule_cls, classes=4, seed=0):
    torch.manual_seed(seed)
    kw = dict(d=16, num_blocks=2)
    if arch == "vit":
        kw["heads"] = 2
    kw.update(rule_cls().model_kwargs())
    return build_model(arch, input_shape=SHAPE, num_classes=classes, **kw)


# ---------------------------------------------------------------------------- the registry

def test_the_registry_holds_every_rule_and_each_names_itself():
    assert EXPECTED <= set(RULES)
    for name, cls in RULES.items():
        assert cls.name == name and cls.summary and cls.family in {"bp", "baseline", "block", "learned",
                                                                    "layer", "ra"}
        for opt in cls.OPTIONS.values():
            assert opt.doc, (name, opt)
    table = rules.rule_table()
    assert set(table["rule"]) == set(RULES) and {"resmlp", "vit", "resnet"} <= set(table.columns)


def test_build_rule_checks_options_and_names_the_allowed_ones():
    assert build_rule("dfa", penalty=0.01).penalty == 0.01
    with pytest.raises(ValueError, match="rule 'dfa' has no option 'lam'; allowed options: 'penalty'"):
        build_rule("dfa", lam=0.1)
    with pytest.raises(ValueError, match="unknown rule 'dfa2'.*'bp'"):
        build_rule("dfa2")
    for name, bad in [("dfa", {"penalty": -1.0}), ("dfa", {"penalty": math.inf}), ("dfa", {"penalty": "0.1"}),
                      ("grape_fa", {"n_probe": 2.5}), ("weight_mirror", {"sigma": math.inf}),
                      ("layer_grape", {"lr_b": math.nan}), ("stiefel_dfa", {"probe": "jvp"}),
                      ("layer_fa", {"init": "xavier"}), ("ra_comb", {"lam": 1.5})]:
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            build_rule(name, **bad)


def test_register_refuses_non_rules_and_name_clashes():
    with pytest.raises(ValueError, match="subclass of fa_study.rules.Method"):
        rules.register(int)

    class Nameless(rules.BlockLocal):
        pass

    with pytest.raises(ValueError, match="class attribute name"):
        rules.register(Nameless)

    class Impostor(rules.BlockLocal):
        name = "dfa"

    with pytest.raises(ValueError, match="already registered"):
        rules.register(Impostor)
    assert RULES["dfa"] is rules.DFA


def test_what_differs_between_rules_is_asked_of_the_class():
    assert RULES["dfa"].takes_penalty and RULES["fa"].takes_penalty and not RULES["bp"].takes_penalty
    assert RULES["frozen"].is_baseline and RULES["shallow"].is_baseline and not RULES["dfa"].is_baseline
    assert RULES["dfa"].has_random_feedback and not RULES["bp"].has_random_feedback
    assert not RULES["sign_sym"].has_random_feedback and RULES["frsf"].has_random_feedback
    assert RULES["grape_fa"].learns_feedback and not RULES["fa"].learns_feedback
    assert not RULES["ra_rev"].supports("resmlp") and RULES["ra_rev"].supports("matrix_mlp")
    assert not RULES["layer_dfa_block"].supports("resnet")
    assert RULES["dfa"].label_for({"penalty": 0.01}) == "dfa λ=0.01" and RULES["dfa"].label_for({}) == "dfa"


# ---------------------------------------------------------------------------- every rule x architecture

@pytest.mark.parametrize("arch", arch_names())
@pytest.mark.parametrize("name", sorted(RULES))  # every registered rule: a new one is covered as it is added
def test_every_rule_trains_and_is_read_on_every_architecture_or_is_refused(name, arch):
    from fa_study.runs import DataSpec, ModelSpec, RunSpec

    cls = RULES[name]
    if not cls.supports(arch):
        with pytest.raises(ValueError, match=f"rule {name!r} cannot train a {arch!r} model"):
            RunSpec(rule=name, model=ModelSpec(arch), data=DataSpec("cifar10"))
        with pytest.raises(ValueError, match="cannot train"):
            cls().setup(_model(arch, RULES["bp"]), 4, torch.Generator().manual_seed(0))
        return
    train_ds, test_ds = _datasets()
    model = _model(arch, cls)
    rule = cls()
    cfg = TrainConfig(epochs=1, batch_size=16, eval_batch=16, seed=1)
    hist = train(model, rule, train_ds, test_ds, cfg)
    assert list(hist["status"]) == ["ok", "ok"] and math.isfinite(hist["test_acc"].iloc[-1])
    x, y = test_ds.x[:16], test_ds.y[:16]
    rep = audit(model, x, y)
    assert len(rep.grad_norms) == model.num_blocks + 1 and math.isfinite(rep.g_L)
    if model.num_blocks:
        dq = direction_quality(model, x, y, rule)
        assert len(dq) == model.num_blocks + 1 and dq["cos_mean"].between(-1 - 1e-9, 1 + 1e-9).all()
    if cls.has_random_feedback:
        null = fresh_feedback_null(model, rule, x, y, n_draws=2)
        assert math.isfinite(null["training_deep_cos"]) and len(null["fresh_deep_cos"]) == 2
    else:
        with pytest.raises(ValueError, match="no random feedback"):
            fresh_feedback_null(model, rule, x, y, n_draws=2)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if RULES[n].family == "ra") + ["bp", "fa"])
def test_ra_rules_and_block_rules_train_the_explicit_matrix_mlp(name):
    train_ds, test_ds = _datasets()
    torch.manual_seed(0)
    model = build_model("matrix_mlp", input_shape=SHAPE, num_classes=4, d=12, num_blocks=1)
    rule = RULES[name]()
    hist = train(model, rule, train_ds, test_ds,
                 TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.0,
                             weight_decay=0.0,
                             schedule="constant", eval_batch=16, feedback_quality=True))
    assert (hist["status"] == "ok").all()
    if RULES[name].family == "ra":
        assert {"align_0", "angle_2", "update_angle_1", "rev_loss", "recon_loss"} <= set(hist.columns)


# ---------------------------------------------------------------------------- converted models

LAYER_RULES = sorted(n for n, c in RULES.items() if c.family == "layer")


@pytest.mark.parametrize("name", LAYER_RULES)
def test_protocol_reference_of_a_converted_model_is_the_unconverted_networks_gradient(name):
    """On a converted ResidualMLP every layer rule's audit gradient norms and direction-quality
    reference equal torch.autograd.grad of the unconverted twin: never the rule's own signal."""
    train_ds, test_ds = _datasets()
    torch.manual_seed(0)
    plain = build_model("resmlp", input_shape=SHAPE, num_classes=4, d=16, num_blocks=2)
    model = copy.deepcopy(plain)
    rule = RULES[name]()
    train(model, rule, train_ds, test_ds, TrainConfig(epochs=1, batch_size=16, eval_batch=16))
    # the unconverted twin carries the trained weights
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()},
                          strict=True)
    x, y = test_ds.x[:16], test_ds.y[:16]
    plain.eval()
    h = plain.embed(x)
    hs = [h]
    for l in range(plain.num_blocks):
        h = plain.step(l, h)
        hs.append(h)
    ref = torch.autograd.grad(F.cross_entropy(plain.readout(h), y), hs)
    ref_norms = [float(g.norm(dim=-1).median()) for g in ref]
    rep = audit(model, x, y)
    assert rep.grad_norms == pytest.approx(ref_norms, rel=1e-5)
    _, grads, _ = bp_reference(model, x, y)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9)
    dq = direction_quality(model, x, y, rule)
    assert list(dq["g_norm_median"]) == pytest.approx([float(g.norm(dim=-1).median()) for g in ref], rel=1e-5)


def test_the_readmes_rule_table_says_what_the_classes_say():
    """README's rule x architecture table: one row per registered rule, ✓ where the class
    supports the architecture (so the table cannot go stale)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    archs = ("resmlp", "vit", "resnet", "mlp", "matrix_mlp")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 + len(archs) and cells[0].startswith("`") and cells[0].strip("`") in RULES:
            rows[cells[0].strip("`")] = cells[3:]
    assert set(rows) == set(RULES)
    for name, marks in rows.items():
        assert marks == ["✓" if RULES[name].supports(a) else "✗" for a in archs], name
