"""The block models: every architecture honours the block interface, and each block computes the
reference's formula."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study.models import ARCHS, DEFAULTS, BlockModel, ResidualMLP, SmallResNet, ViTMini, build_model

SHAPE = (3, 8, 8)
CLASSES = 5
SIZES = {"resmlp": dict(d=16, num_blocks=3), "vit": dict(d=16, num_blocks=2, heads=2),
         "resnet": dict(d=6, num_blocks=2)}


def _model(arch: str, seed: int = 0, **kw) -> BlockModel:
    torch.manual_seed(seed)
    sizes = dict(SIZES[arch])
    sizes.update(kw)
    return build_model(arch, input_shape=SHAPE, num_classes=CLASSES, **sizes)


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


HIDDEN_SHAPES = {"resmlp": (16,), "vit": (1 + 4, 16), "resnet": (6, 8, 8)}


@pytest.mark.parametrize("arch", ARCHS)
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


@pytest.mark.parametrize("arch", ARCHS)
def test_flat_and_image_inputs_agree(arch):
    model = _model(arch).eval()
    x = _x()
    assert torch.equal(model(x), model(x.reshape(6, -1)))
    with pytest.raises(ValueError, match="expects inputs shaped"):
        model(torch.randn(6, 7))


@pytest.mark.parametrize("arch", ARCHS)
def test_step_is_input_plus_branch(arch):
    model = _model(arch).eval()
    h = model.embed(_x())
    for l in range(model.num_blocks):
        h_next, f = model.step_and_branch(l, h)
        assert torch.equal(h_next, model.step(l, h))
        assert torch.equal(f, model.branch(l, h))
        torch.testing.assert_close(h + f, h_next, rtol=0, atol=1e-6)
        h = h_next


@pytest.mark.parametrize("arch", ARCHS)
def test_pool_and_broadcast(arch):
    model = _model(arch).eval()
    h = model.embed(_x())
    pooled = model.pool(h)
    assert pooled.shape == (6, 16 if arch != "resnet" else 6)
    if arch == "resmlp":
        assert torch.equal(pooled, h)
    elif arch == "vit":
        assert torch.equal(pooled, h[:, 0])  # the cls token
    else:
        torch.testing.assert_close(pooled, h.mean(dim=(2, 3)))
    a = torch.randn_like(pooled)
    b = model.broadcast(a, h)
    assert b.shape == h.shape
    assert model.positions(h) == {"resmlp": 1, "vit": 5, "resnet": 64}[arch]
    # every position carries the same (batch, d) signal
    flat = b.reshape(6, -1, model.width) if arch != "resnet" else b.flatten(2).transpose(1, 2)
    assert torch.equal(flat, a.unsqueeze(1).expand_as(flat))


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_groups_partition_the_model(arch):
    model = _model(arch)
    groups = [model.embed_parameters(), model.head_parameters()] + \
             [model.block_parameters(l) for l in range(model.num_blocks)]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="block index"):
        model.block_parameters(model.num_blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_shallow_model_has_no_blocks(arch):
    model = _model(arch, num_blocks=0).eval()
    logits, hiddens = model(_x(), return_hidden=True)
    assert model.num_blocks == 0 and len(hiddens) == 1 and logits.shape == (6, CLASSES)


def test_build_model_defaults_and_bad_names():
    for arch, cls in (("resmlp", ResidualMLP), ("vit", ViTMini), ("resnet", SmallResNet)):
        m = build_model(arch)
        assert isinstance(m, cls)
        assert (m.width, m.num_blocks) == (DEFAULTS[arch]["d"], DEFAULTS[arch]["num_blocks"])
        assert m.arch == arch
    assert (DEFAULTS["resmlp"]["d"], DEFAULTS["vit"]["d"], DEFAULTS["resnet"]["d"]) == (256, 128, 64)
    with pytest.raises(ValueError, match="'resmlp', 'vit', 'resnet'"):
        build_model("mlp-mixer")
    with pytest.raises(ValueError, match="num_blocks"):
        build_model("resmlp", num_blocks=-1)
    with pytest.raises(ValueError, match="activation"):
        build_model("resmlp", activation="tanh")
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model("vit", d=10, heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit", input_shape=(3, 30, 30))


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
