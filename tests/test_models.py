"""The block models: every architecture honours the block interface, accepts images and flat
inputs, and each block computes the reference's formula; named variants resolve and display."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study.models import (DEFAULTS, MLP, VARIANTS, BlockModel, MatrixMLP, ResidualMLP, SmallResNet,
                             ViTMini, arch_names, audit_archs, build_model, display_name, model_names,
                             resolve)
from fa_study.models.mlp import MATRIX_ACTIVATIONS, MLP_ACTIVATIONS, act_deriv, activate
from fa_study.rules import ra

SHAPE = (3, 8, 8)
CLASSES = 5
SIZES = {"resmlp": dict(d=16, num_blocks=3), "vit": dict(d=16, num_blocks=2, heads=2),
         "resnet": dict(d=6, num_blocks=2), "mlp": dict(d=16, num_blocks=2),
         "matrix_mlp": dict(d=16, num_blocks=2)}
CLASSES_OF = {"resmlp": ResidualMLP, "vit": ViTMini, "resnet": SmallResNet, "mlp": MLP,
              "matrix_mlp": MatrixMLP}


def _model(arch: str, seed: int = 0, **kw) -> BlockModel:
    torch.manual_seed(seed)
    sizes = dict(SIZES.get(arch, dict(d=16, num_blocks=2)))  # a new architecture: small defaults
    sizes.update(kw)
    return build_model(arch, input_shape=SHAPE, num_classes=CLASSES, **sizes)


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


HIDDEN_SHAPES = {"resmlp": (16,), "vit": (1 + 4, 16), "resnet": (6, 8, 8), "mlp": (16,), "matrix_mlp": (16,)}


@pytest.mark.parametrize("arch", arch_names())
def test_forward_is_embed_steps_readout(arch):
    model = _model(arch).eval()
    x = _x()
    logits, hiddens = model(x, return_hidden=True)
    assert logits.shape == (6, CLASSES)
    assert len(hiddens) == model.num_blocks + 1
    assert all(tuple(h.shape) == (6, *HIDDEN_SHAPES[arch]) for h in hiddens)
    h = model.embed(x)
    assert torch.equal(h, hiddens[0])
    for l in range(model.num_blocks):
        h = model.step(l, h)
        assert torch.equal(h, hiddens[l + 1])
    assert torch.equal(model.readout(h), logits)
    assert torch.equal(model.classify(model.pool(h)), logits)
    assert torch.equal(model(x), logits)


@pytest.mark.parametrize("arch", arch_names())
def test_flat_and_image_inputs_agree(arch):
    model = _model(arch).eval()
    x = _x()
    assert torch.equal(model(x), model(x.reshape(6, -1)))
    with pytest.raises(ValueError, match="expects inputs shaped"):
        model(torch.randn(6, 7))


@pytest.mark.parametrize("arch", arch_names())
def test_step_is_input_plus_branch(arch):
    model = _model(arch).eval()
    h = model.embed(_x())
    for l in range(model.num_blocks):
        h_next, f = model.step_and_branch(l, h)
        assert torch.equal(h_next, model.step(l, h))
        assert torch.equal(f, model.branch(l, h))
        torch.testing.assert_close(h + f, h_next, rtol=0, atol=1e-6)
        if arch in ("resnet", "mlp", "matrix_mlp"):  # no h + f form: the branch is the net change
            assert torch.equal(f, h_next - h)
        h = h_next


@pytest.mark.parametrize("arch", arch_names())
def test_pool_and_broadcast(arch):
    model = _model(arch).eval()
    h = model.embed(_x())
    pooled = model.pool(h)
    assert pooled.shape == (6, 16 if arch != "resnet" else 6)
    if arch in ("resmlp", "mlp", "matrix_mlp"):
        assert torch.equal(pooled, h)
    elif arch == "vit":
        assert torch.equal(pooled, h[:, 0])  # the cls token
    else:
        torch.testing.assert_close(pooled, h.mean(dim=(2, 3)))
    a = torch.randn_like(pooled)
    b = model.broadcast(a, h)
    assert b.shape == h.shape
    assert model.positions(h) == {"resmlp": 1, "vit": 5, "resnet": 64, "mlp": 1, "matrix_mlp": 1}[arch]
    # every position carries the same (batch, d) signal
    flat = b.reshape(6, -1, model.width) if arch != "resnet" else b.flatten(2).transpose(1, 2)
    assert torch.equal(flat, a.unsqueeze(1).expand_as(flat))


@pytest.mark.parametrize("arch", arch_names())
def test_parameter_groups_partition_the_model(arch):
    model = _model(arch)
    groups = [model.embed_parameters(), model.head_parameters()] + \
             [model.block_parameters(l) for l in range(model.num_blocks)]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="block index"):
        model.block_parameters(model.num_blocks)


@pytest.mark.parametrize("arch", arch_names())
def test_shallow_model_has_no_blocks(arch):
    model = _model(arch, num_blocks=0).eval()
    logits, hiddens = model(_x(), return_hidden=True)
    assert model.num_blocks == 0 and len(hiddens) == 1 and logits.shape == (6, CLASSES)


def test_build_model_defaults_and_bad_names():
    assert set(arch_names()) == set(CLASSES_OF) and set(audit_archs()) == {"resmlp", "vit", "resnet"}
    for arch, cls in CLASSES_OF.items():
        m = build_model(arch)
        assert isinstance(m, cls)
        assert (m.width, m.num_blocks) == (DEFAULTS[arch]["d"], DEFAULTS[arch]["num_blocks"])
        assert m.arch == arch
    assert (DEFAULTS["resmlp"]["d"], DEFAULTS["vit"]["d"], DEFAULTS["resnet"]["d"]) == (256, 128, 64)
    with pytest.raises(ValueError, match="'resmlp', 'vit', 'resnet', 'mlp', 'matrix_mlp', 'resmlp_d512_L2'"):
        build_model("mlp-mixer")
    with pytest.raises(ValueError, match="num_blocks"):
        build_model("resmlp", num_blocks=-1)
    with pytest.raises(ValueError, match="activation"):
        build_model("resmlp", activation="tanh")
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model("vit", d=10, heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit", input_shape=(3, 30, 30))
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", activation="softplus")
    with pytest.raises(ValueError, match="activation"):
        build_model("matrix_mlp", activation="gelu")  # RA's activations only
    with pytest.raises(ValueError, match="ln"):
        build_model("matrix_mlp", ln="yes")
    with pytest.raises(ValueError, match="num_blocks"):
        build_model("matrix_mlp", num_blocks=-1)


def test_resmlp_block_is_the_reference_formula():
    model = _model("resmlp").eval()
    x = _x()
    h = model.embed_linear(x.reshape(6, -1))
    for blk in model.blocks:
        z = F.layer_norm(h, (16,), blk.ln.weight, blk.ln.bias)
        h = h + F.linear(F.gelu(F.linear(z, blk.w1.weight, blk.w1.bias)), blk.w2.weight, blk.w2.bias)
    expected = F.linear(F.layer_norm(h, (16,), model.out_ln.weight, model.out_ln.bias),
                        model.out_head.weight, model.out_head.bias)
    torch.testing.assert_close(model(x), expected)


def test_resmlp_small_second_linear_and_options():
    torch.manual_seed(0)
    model = ResidualMLP(SHAPE, CLASSES, d=128, num_blocks=2)
    w2 = torch.cat([b.w2.weight.flatten() for b in model.blocks])
    assert abs(w2.std().item() - 0.01) < 0.001
    assert all(torch.count_nonzero(b.w2.bias) == 0 for b in model.blocks)
    plain = _model("resmlp", residual=False).eval()
    h = plain.embed(_x())
    assert torch.equal(plain.step(0, h), plain.branch(0, h))  # no skip
    linear = _model("resmlp", activation="identity", block_norm=False, final_norm=False).eval()
    x1, x2 = _x(seed=1), _x(seed=2)
    # a linear model (up to the biases): f(x1 + x2) = f(x1) + f(x2) - f(0)
    zero = torch.zeros_like(x1)
    torch.testing.assert_close(linear(x1 + x2), linear(x1) + linear(x2) - linear(zero), atol=1e-5, rtol=0)


def test_vit_block_is_the_reference_formula():
    model = _model("vit").eval()
    x = _x()
    p = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(6, -1, -1), p], dim=1) + model.pos_embed
    for blk in model.blocks:
        z = blk.ln1(h)
        h = h + blk.attn(z, z, z, need_weights=False)[0]  # x = x + attn(LN1 x)
        h = h + blk.mlp(blk.ln2(h))  # x = x + mlp(LN2 x)
    expected = model.out_head(model.out_ln(h[:, 0]))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_resnet_block_is_the_reference_formula():
    model = _model("resnet")
    model.train()
    x = _x()
    h = F.relu(F.batch_norm(F.conv2d(x, model.stem_conv.weight, padding=1), None, None,
                            model.stem_bn.weight, model.stem_bn.bias, training=True))
    for blk in model.blocks:
        out = F.relu(F.batch_norm(F.conv2d(h, blk.conv1.weight, padding=1), None, None,
                                  blk.bn1.weight, blk.bn1.bias, training=True))
        out = F.batch_norm(F.conv2d(out, blk.conv2.weight, padding=1), None, None,
                           blk.bn2.weight, blk.bn2.bias, training=True)
        h = F.relu(h + out)
    expected = model.out_head(h.mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(model.blocks[0].bn1, nn.BatchNorm2d)


# ---------------------------------------------------------------------------- MNIST shape, flat inputs

@pytest.mark.parametrize("arch", arch_names())
def test_every_architecture_takes_mnist_images_and_flat_inputs(arch):
    torch.manual_seed(0)
    sizes = dict(SIZES.get(arch, dict(d=16, num_blocks=2)))  # a new architecture: small defaults
    model = build_model(arch, input_shape=(1, 28, 28), num_classes=10, **sizes).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits, hiddens = model(x, return_hidden=True)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert torch.equal(model(x.reshape(3, 784)), logits)
    if arch == "vit":  # 4x4 patches of a 28x28 image: 49 patches and the cls token
        assert hiddens[0].shape == (3, 50, 16)
    with pytest.raises(ValueError, match="expects inputs shaped"):
        model(torch.randn(3, 3, 28, 28))


# ---------------------------------------------------------------------------- MLP and MatrixMLP

def test_mlp_is_the_reference_formula():
    model = _model("mlp", activation="tanh").eval()
    x = _x()
    h = torch.tanh(F.linear(x.reshape(6, -1), model.embed_layer.linear.weight, model.embed_layer.linear.bias))
    for blk in model.blocks:
        h = torch.tanh(F.linear(h, blk.linear.weight, blk.linear.bias))  # no skip
    expected = F.linear(h, model.out_head.weight, model.out_head.bias)
    torch.testing.assert_close(model(x), expected)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == model.num_blocks + 2  # embed, blocks, head: the layer rules convert them all


@pytest.mark.parametrize("activation", ra.ACTIVATIONS)
@pytest.mark.parametrize("ln", [True, False])
def test_matrix_mlp_is_ra_forward_of_its_matrices(activation, ln):
    """MatrixMLP's hidden states are ra.forward's hidden activations and its logits ra.forward's,
    given the same matrices: the rules' explicit formulas and the model are one network."""
    model = _model("matrix_mlp", activation=activation, ln=ln).eval()
    x = _x()
    W = [w.detach() for w in model.matrices()]
    assert [tuple(w.shape) for w in W] == [(16, 192), (16, 16), (16, 16), (CLASSES, 16)]
    assert model.dims == [192, 16, 16, 16, CLASSES] == ra.make_dims(192, 16, 4, CLASSES)
    acts, _ = ra.forward(x.reshape(6, -1), W, activation, ln)
    logits, hiddens = model(x, return_hidden=True)
    assert len(hiddens) == len(acts) - 2  # acts = [x, h_0 .. h_L, logits]
    for h, a in zip(hiddens, acts[1:-1]):
        torch.testing.assert_close(h, a)
    torch.testing.assert_close(logits, acts[-1])
    assert [n for n, _ in model.named_parameters()] == ["embed_layer.weight", "blocks.0.weight",
                                                         "blocks.1.weight", "out_head.weight"]  # no biases


@pytest.mark.parametrize("activation", sorted(set(MLP_ACTIVATIONS) | set(MATRIX_ACTIVATIONS)))
def test_activation_derivative_is_autograds(activation):
    """models.mlp's one table of activations: each derivative (RA's backward uses them) equals
    autograd's of the activation itself, at points on both sides of 0."""
    z = torch.linspace(-3, 3, 25, dtype=torch.float64).requires_grad_()
    (auto,) = torch.autograd.grad(activate(z, activation).sum(), z)
    torch.testing.assert_close(act_deriv(z.detach(), activation), auto)


@pytest.mark.parametrize("activation,gain", [("linear", 1.0), ("relu", math.sqrt(2.0))])
def test_matrix_mlp_init_scale_is_gain_over_sqrt_fan_in(activation, gain):
    torch.manual_seed(0)
    model = MatrixMLP((1, 20, 20), 10, 300, 1, activation=activation)
    assert model.gain == gain == ra.init_gain(activation)
    for w in model.matrices():
        assert w.std().item() == pytest.approx(gain / math.sqrt(w.shape[1]), rel=0.05)


# ---------------------------------------------------------------------------- named variants

def test_named_variants_resolve_build_and_display():
    assert VARIANTS == {"resmlp_d512_L2": ("resmlp", 512, 2)}
    assert set(model_names()) == set(arch_names()) | set(VARIANTS)
    assert resolve("resmlp_d512_L2") == ("resmlp", 512, 2)
    assert resolve("resmlp") == ("resmlp", None, None) and resolve("vit", 32, 3) == ("vit", 32, 3)
    with pytest.raises(ValueError, match="model.*'resmlp_d512_L2'"):
        resolve("resmlp_d1024")
    model = build_model("resmlp_d512_L2", input_shape=SHAPE, num_classes=CLASSES)
    assert isinstance(model, ResidualMLP)
    assert (model.arch, model.width, model.num_blocks) == ("resmlp", 512, 2)
    assert display_name("resmlp", 512, 2) == "resmlp_d512_L2"
    assert display_name(model.arch, model.width, model.num_blocks) == "resmlp_d512_L2"
    assert display_name("resmlp", 256, 4) == "resmlp" and display_name("vit", 512, 2) == "vit"
    assert display_name("resmlp", None, None) == "resmlp"


def test_an_architecture_registered_after_import_is_built_and_run_like_the_packages(monkeypatch):
    """register_arch after import (as a notebook does) reaches everything that lists the models:
    build_model, ModelSpec, the rule table, the audit's rules and its panel's choices (each
    reads the registry when asked; a tuple bound at import went stale); the registry is
    restored afterwards."""
    from fa_study import models
    from fa_study.experiments.audit import AuditStudy, audit_rules
    from fa_study.rules import rule_table
    from fa_study.runs import ModelSpec

    monkeypatch.setitem(models.ARCHITECTURES, "mlp_wide", None)  # recorded as absent: removed after
    monkeypatch.setitem(models.DEFAULTS, "mlp_wide", None)
    models.register_arch("mlp_wide", MLP, d=48, num_blocks=2, audited=True)
    assert "mlp_wide" in models.arch_names() and "mlp_wide" in models.model_names()
    m = models.build_model("mlp_wide", input_shape=(1, 8, 8), num_classes=3)
    assert isinstance(m, MLP) and (m.width, m.num_blocks) == (48, 2)
    spec = ModelSpec("mlp_wide")
    assert (spec.d, spec.num_blocks) == (48, 2)
    assert "mlp_wide" in rule_table().columns and "mlp_wide" in AuditStudy.CONTROLS["archs"]()
    before = audit_rules()  # the rules that train every audited model
    monkeypatch.setitem(models.ARCHITECTURES, "matrix_audited", None)
    monkeypatch.setitem(models.DEFAULTS, "matrix_audited", None)
    models.register_arch("matrix_audited", MatrixMLP, d=16, num_blocks=1, audited=True)
    assert "layer_fa" in before and "layer_fa" not in audit_rules() and set(audit_rules()) < set(before)


def test_a_misspelt_embedding_name_is_refused_not_left_untrained():
    """embed_modules names attributes; one the model does not have is an error naming it (it
    was skipped, so its parameters silently fell out of the rule's parameter groups)."""
    class Typo(ResidualMLP):
        embed_modules = ("embed_lineer",)

    model = Typo((1, 4, 4), 3, 8, 1)
    with pytest.raises(ValueError, match="Typo has no attribute 'embed_lineer'.*embed_linear"):
        model.embed_parameters()
    assert len(ResidualMLP((1, 4, 4), 3, 8, 1).embed_parameters()) == 2  # weight and bias
