"""fa_study.diagnostics on networks the package did not build, written here as a user writes them
(modelled on reference 003's ResidualMLP, ViTMini and SmallResNet), on torchvision's resnet18 and
VisionTransformer, on a plain CNN whose hidden states the user names, and on networks holding
another library's feedback-alignment layers (an ``nn.Linear`` subclass whose forward calls its
own ``autograd.Function``).

Every value fa_study reports is compared with a computation written in this file: autograd
through the model's own forward with ``retain_grad`` on tensors the test gets itself (the
reference layout's ``forward(x, return_hidden=True)``, torchvision's modules called one by one),
the FA update and credit written out by hand, and 003's defective chain rebuild.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fa_study.diagnostics import (
    audit,
    bp_reference,
    bp_twin,
    direction_quality,
    feedback_angles,
    find_hidden_states,
    read_direction_quality,
    update_alignment,
)

CLASSES = 5
RTOL = 1e-6  # float64: fa_study against the independent autograd computation


# =============================================================================================
# Models as a user writes them
# =============================================================================================

class ResidualBlock(nn.Module):
    """003's block: returns the branch f(h) = W2 GELU(W1 LN(h)), NOT h + f(h)."""

    def __init__(self, d, w2_std=0.01):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)
        nn.init.normal_(self.w2.weight, std=w2_std)
        nn.init.zeros_(self.w2.bias)

    def forward(self, h):
        return self.w2(F.gelu(self.w1(self.ln(h))))


class ResidualMLP(nn.Module):
    """003's layout: embed -> blocks (the model adds the skip) -> out_ln -> out_head."""

    def __init__(self, input_dim, d, num_classes, num_blocks, residual_add=True, w2_std=0.01):
        super().__init__()
        self.embed = nn.Linear(input_dim, d)
        self.blocks = nn.ModuleList([ResidualBlock(d, w2_std) for _ in range(num_blocks)])
        self.out_ln = nn.LayerNorm(d)
        self.out_head = nn.Linear(d, num_classes)
        self.residual_add = residual_add

    def forward(self, x, return_hidden=False):
        h = self.embed(x.flatten(1))
        hiddens = [h]
        for block in self.blocks:
            f = block(h)
            h = h + f if self.residual_add else f
            hiddens.append(h)
        logits = self.out_head(self.out_ln(h))
        return (logits, hiddens) if return_hidden else logits


class TransformerBlock(nn.Module):
    """003's pre-LN block, skip inside: x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    def __init__(self, d, heads, mlp_ratio=2.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x):
        z = self.ln1(x)
        a, _ = self.attn(z, z, z, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class ViTMini(nn.Module):
    """003's ViTMini at toy sizes: patch conv, cls token, blocks, out_ln on the cls token, head."""

    def __init__(self, image_size=8, patch_size=4, d=16, heads=2, num_blocks=2, num_classes=CLASSES):
        super().__init__()
        self.image_size = image_size
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, d, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(d, heads) for _ in range(num_blocks)])
        self.out_ln = nn.LayerNorm(d)
        self.out_head = nn.Linear(d, num_classes)

    def embed(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.size(0), -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward(self, x, return_hidden=False):
        h = self.embed(x)
        hiddens = [h]
        for block in self.blocks:
            h = block(h)
            hiddens.append(h)
        logits = self.out_head(self.out_ln(h[:, 0]))
        return (logits, hiddens) if return_hidden else logits


class BasicBlock(nn.Module):
    """003's post-activation BasicBlock, skip inside: relu(x + BN(W2 relu(BN(W1 x))))."""

    def __init__(self, d):
        super().__init__()
        self.conv1 = nn.Conv2d(d, d, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(d)
        self.conv2 = nn.Conv2d(d, d, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(d)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class SmallResNet(nn.Module):
    """003's SmallResNet at toy sizes: conv stem + BN + ReLU, blocks, global average pool, head."""

    def __init__(self, d=6, num_blocks=2, num_classes=CLASSES):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, d, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(d)
        self.blocks = nn.ModuleList([BasicBlock(d) for _ in range(num_blocks)])
        self.out_head = nn.Linear(d, num_classes)

    def forward(self, x, return_hidden=False):
        h = F.relu(self.stem_bn(self.stem_conv(x)))
        hiddens = [h]
        for block in self.blocks:
            h = block(h)
            hiddens.append(h)
        logits = self.out_head(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return (logits, hiddens) if return_hidden else logits


class PlainCNN(nn.Module):
    """conv-pool-conv-pool-fc-fc: no block structure, so the user names the hidden states."""

    def __init__(self, num_classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        h = self.pool1(F.relu(self.conv1(x)))
        h = self.pool2(F.relu(self.conv2(h)))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


CNN_HIDDEN = ["pool1", "pool2", "fc1"]


class FAFn(torch.autograd.Function):
    """Feedback alignment as other libraries write it: W forward, the fixed B backward."""

    @staticmethod
    def forward(ctx, x, w, b, B):
        ctx.save_for_backward(x, B)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        return g @ B, g.t() @ x, g.sum(0), None


class FALinear(nn.Linear):
    """A foreign FA layer (biotorch style): buffer ``weight_backward``, forward through FAFn."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.register_buffer("weight_backward", torch.randn(o, i) / i ** 0.5)

    def forward(self, x):
        return FAFn.apply(x, self.weight, self.bias, self.weight_backward)


class FAConvFn(torch.autograd.Function):
    """FA for a convolution: W forward, B in both backward products."""

    @staticmethod
    def forward(ctx, x, w, b, B, padding):
        ctx.save_for_backward(x, B)
        ctx.padding = padding
        return F.conv2d(x, w, b, 1, padding)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(x.shape, B, g, 1, ctx.padding)
        gw = torch.nn.grad.conv2d_weight(x, B.shape, g, 1, ctx.padding)
        return gx, gw, g.sum((0, 2, 3)), None, None


class FAConv2d(nn.Conv2d):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("weight_backward", torch.randn_like(self.weight) * 0.3)

    def forward(self, x):
        return FAConvFn.apply(x, self.weight, self.bias, self.weight_backward, self.padding)


class FANet(nn.Module):
    """Every layer a foreign FA layer, the output layer included."""

    def __init__(self, i=12, d=10, num_classes=CLASSES):
        super().__init__()
        self.fc1 = FALinear(i, d)
        self.fc2 = FALinear(d, d)
        self.out = FALinear(d, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


FA_HIDDEN = ["fc1", "fc2"]


class StraightThroughFn(torch.autograd.Function):
    """A custom backward that is not a layer: sign forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class SignAct(nn.Module):
    def forward(self, x):
        return StraightThroughFn.apply(x)


class SignNet(nn.Module):
    def __init__(self, i=12, d=10, num_classes=CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(i, d)
        self.act = SignAct()
        self.fc2 = nn.Linear(d, num_classes)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def tv_resnet18():
    return torchvision.models.resnet18(weights=None, num_classes=CLASSES)


def tv_vit(image_size=16):
    vit = torchvision.models.VisionTransformer(image_size=image_size, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=CLASSES)
    nn.init.normal_(vit.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
    return vit


# =============================================================================================
# The independent computations: the hidden states the test gets itself, step by step
# =============================================================================================

def _states_from_forward(model, x):
    """The reference layout: ``forward(x, return_hidden=True)``."""
    return model(x, return_hidden=True)


def _states_resnet18(m, x):
    h0 = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    h1 = m.layer1(h0)
    h2 = m.layer2(h1)
    h3 = m.layer3(h2)
    h4 = m.layer4(h3)
    return m.fc(torch.flatten(m.avgpool(h4), 1)), [h0, h1, h2, h3, h4]


def _states_tv_vit(m, x):
    n = x.shape[0]
    tokens = m.conv_proj(x).reshape(n, m.hidden_dim, -1).permute(0, 2, 1)
    tokens = torch.cat([m.class_token.expand(n, -1, -1), tokens], dim=1)
    h = m.encoder.dropout(tokens + m.encoder.pos_embedding)
    hs = [h]
    for block in m.encoder.layers:
        hs.append(block(hs[-1]))
    return m.heads(m.encoder.ln(hs[-1])[:, 0]), hs


def _states_cnn(m, x):
    h0 = m.pool1(F.relu(m.conv1(x)))
    h1 = m.pool2(F.relu(m.conv2(h0)))
    h2 = m.fc1(h1.flatten(1))
    return m.fc2(F.relu(h2)), [h0, h1, h2]


def _plain_copy_fanet(net):
    """The FA net with every layer a plain nn.Linear holding a copy of its weights: plain BP."""
    plain = nn.Sequential()
    for name in ("fc1", "fc2", "out"):
        src = getattr(net, name)
        lin = nn.Linear(src.in_features, src.out_features).to(src.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(src.weight)
            lin.bias.copy_(src.bias)
        plain.add_module(name, lin)
    return plain


def _states_fanet_bp(net, x):
    """Plain BP's states of the FA net, on a plain copy (never through FAFn)."""
    p = _plain_copy_fanet(net)
    h0 = p.fc1(x.flatten(1))
    h1 = p.fc2(torch.relu(h0))
    return p.out(torch.relu(h1)), [h0, h1]


def _states_fanet_own(net, x):
    """The FA net's own forward, layer by layer: its backward is FA's."""
    h0 = net.fc1(x.flatten(1))
    h1 = net.fc2(torch.relu(h0))
    return net.out(torch.relu(h1)), [h0, h1]


def independent(states_fn, model, x, y):
    """``([h_l], [dCE/dh_l], logits)``: backward of the test's own forward, read by retain_grad."""
    with torch.enable_grad():
        logits, hs = states_fn(model, x.detach().requires_grad_(True))
        for h in hs:
            h.retain_grad()
        F.cross_entropy(logits, y).backward()
    grads = [h.grad.detach().clone() for h in hs]
    model.zero_grad(set_to_none=True)
    return [h.detach() for h in hs], grads, logits.detach()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# =============================================================================================
# The cases
# =============================================================================================

def _blocks(prefix, n):
    return [f"input of {prefix}0"] + [f"output of {prefix}{l}" for l in range(n)]


CASES = {
    # name: (build, input shape, batch, states_fn, hidden=, pool: "cls" | "mean" | "flat", hidden_read)
    "resmlp_add": (lambda: ResidualMLP(48, 16, CLASSES, 3, residual_add=True), (3, 4, 4), 12,
                   _states_from_forward, None, "flat",
                   ["input of blocks.0", "input of blocks.1", "input of blocks.2", "input of out_ln"]),
    "resmlp_noadd": (lambda: ResidualMLP(48, 16, CLASSES, 3, residual_add=False, w2_std=0.3),
                     (3, 4, 4), 12, _states_from_forward, None, "flat", _blocks("blocks.", 3)),
    "vitmini": (lambda: ViTMini(), (3, 8, 8), 8, _states_from_forward, None, "cls",
                _blocks("blocks.", 2)),
    "smallresnet": (lambda: SmallResNet(), (3, 8, 8), 8, _states_from_forward, None, "mean",
                    _blocks("blocks.", 2)),
    "resnet18": (tv_resnet18, (3, 32, 32), 4, _states_resnet18, None, "mean",
                 ["input of layer1"] + [f"output of layer{i}" for i in range(1, 5)]),
    "tv_vit": (tv_vit, (3, 16, 16), 6, _states_tv_vit, None, "cls",
               _blocks("encoder.layers.encoder_layer_", 2)),
    "plain_cnn": (PlainCNN, (3, 8, 8), 8, _states_cnn, CNN_HIDDEN, "mean",
                  ["output of pool1", "output of pool2", "output of fc1"]),
    # g_l is plain BP's: the independent computation runs on a plain-Linear copy
    "foreign_fa": (FANet, (12,), 16, _states_fanet_bp, FA_HIDDEN, "flat",
                   ["output of fc1", "output of fc2"]),
}


def make(case, seed=0, dtype=torch.float64):
    build, shape, n, *_ = CASES[case]
    torch.manual_seed(seed)
    model = build().to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, *shape, generator=g).to(dtype)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return model, x, y


def _pooled(t, pool):
    if pool == "cls":
        return t[:, 0]
    if pool == "mean" and t.dim() == 4:
        return t.mean(dim=(2, 3))
    return t.reshape(t.shape[0], -1)


def _median_norms(ts, pool):
    return [float(_pooled(t, pool).norm(dim=-1).median()) for t in ts]


# =============================================================================================
# The BP reference and the hidden states read, against the independent computation
# =============================================================================================

@pytest.mark.parametrize("case", list(CASES))
def test_bp_reference_equals_independent_autograd_in_float64(case):
    model, x, y = make(case)
    model.eval()
    _, _, _, states_fn, hidden, _, _ = CASES[case]
    hs, gs, logits = bp_reference(model, x, y, hidden=hidden)
    ref_h, ref_g, ref_logits = independent(states_fn, model, x, y)
    assert len(hs) == len(ref_h) and len(gs) == len(ref_g)
    assert _rel(logits, ref_logits) < RTOL
    for l, (h, g, rh, rg) in enumerate(zip(hs, gs, ref_h, ref_g)):
        assert h.shape == rh.shape and g.shape == rg.shape, l
        assert _rel(h, rh) < RTOL, f"h_{l}"
        assert float(rg.norm()) > 0, f"g_{l} of the independent computation is zero"
        assert _rel(g, rg) < RTOL, f"g_{l}: {_rel(g, rg):.2e}"


@pytest.mark.parametrize("case", ["smallresnet", "resnet18"])
def test_bp_reference_in_train_mode_uses_batch_statistics_and_restores_buffers(case):
    model, x, y = make(case)
    model.train()
    _, _, _, states_fn, hidden, _, _ = CASES[case]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hs, gs, _ = bp_reference(model, x, y, hidden=hidden)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert all(m.training for m in model.modules())
    ref_h, ref_g, _ = independent(states_fn, model, x, y)  # batch statistics, as bp_reference
    for l, (h, g, rh, rg) in enumerate(zip(hs, gs, ref_h, ref_g)):
        assert _rel(h, rh) < RTOL and _rel(g, rg) < RTOL, l
    model.eval()  # and the eval-mode reading differs: the two modes are not confused
    _, gs_eval, _ = bp_reference(model, x, y, hidden=hidden)
    assert _rel(gs_eval[0], gs[0]) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_audit_reads_the_documented_states_and_their_norms(case):
    model, x, y = make(case)
    _, _, _, states_fn, hidden, pool, expected = CASES[case]
    report = audit(model, x, y, hidden=hidden)
    assert list(report.hidden_read) == expected
    assert ("named by the user" in report.hidden_how) == (hidden is not None)
    model.eval()
    ref_h, ref_g, ref_logits = independent(states_fn, model, x, y)
    assert report.hidden_norms == pytest.approx(_median_norms(ref_h, pool), rel=RTOL)
    assert report.grad_norms == pytest.approx(_median_norms(ref_g, pool), rel=RTOL)
    assert report.test_acc == pytest.approx(float((ref_logits.argmax(-1) == y).double().mean()))
    assert report.unvouched == ()


def test_reference_layout_model_adding_the_skip_is_not_read_at_the_block_outputs():
    """With the skip added by the model, a block's output is the branch f(h), not h_{l+1}:
    reading it would give a different ||h|| (the branch is 100x smaller at w2_std=0.01)."""
    model, x, y = make("resmlp_add")
    model.eval()
    report = audit(model, x, y)
    branch = audit(model, x, y, hidden=["blocks.0:input", "blocks.0", "blocks.1", "blocks.2"])
    assert report.hidden_norms[1] > 20 * branch.hidden_norms[1]
    assert report.hidden_norms[0] == pytest.approx(branch.hidden_norms[0], rel=RTOL)


def test_audit_in_float32_agrees_with_float64():
    model64, x64, y = make("resnet18")
    model32 = copy.deepcopy(model64).float()
    r64, r32 = audit(model64, x64, y), audit(model32, x64.float(), y)
    assert r32.grad_norms == pytest.approx(r64.grad_norms, rel=1e-3)
    assert r32.hidden_norms == pytest.approx(r64.hidden_norms, rel=1e-4)


# =============================================================================================
# Foreign feedback-alignment layers
# =============================================================================================

def _fa_by_hand(net, x, y):
    """The FA net's updates and credit written out: delta_3 = (softmax - onehot) / N,
    delta_2 = relu'(z2) * (delta_3 B_out), delta_1 = relu'(z1) * (delta_2 B_2)."""
    W1, b1, W2, b2, W3, b3 = (t.detach() for t in (net.fc1.weight, net.fc1.bias, net.fc2.weight,
                                                   net.fc2.bias, net.out.weight, net.out.bias))
    xf = x.flatten(1)
    z1 = xf @ W1.t() + b1
    a1 = z1.clamp_min(0)
    z2 = a1 @ W2.t() + b2
    a2 = z2.clamp_min(0)
    logits = a2 @ W3.t() + b3
    d3 = (logits.softmax(-1) - F.one_hot(y, CLASSES).to(logits.dtype)) / x.shape[0]
    d2 = (d3 @ net.out.weight_backward) * (z2 > 0)
    d1 = (d2 @ net.fc2.weight_backward) * (z1 > 0)
    updates = {"fc1.weight": d1.t() @ xf, "fc2.weight": d2.t() @ a1, "out.weight": d3.t() @ a2}
    return updates, [d1, d2]


def _bp_weight_grads(net, x, y):
    p = _plain_copy_fanet(net)
    logits = p.out(torch.relu(p.fc2(torch.relu(p.fc1(x.flatten(1))))))
    grads = torch.autograd.grad(F.cross_entropy(logits, y), [p.fc1.weight, p.fc2.weight, p.out.weight])
    return dict(zip(["fc1.weight", "fc2.weight", "out.weight"], grads))


def _cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_foreign_fa_update_alignment_equals_the_hand_computation():
    net, x, y = make("foreign_fa")
    table = update_alignment(net, x, y).set_index("param")
    assert list(table.index) == ["fc1.weight", "fc2.weight", "out.weight"]
    updates, _ = _fa_by_hand(net, x, y)
    bp = _bp_weight_grads(net, x, y)
    for name in table.index:
        assert table.loc[name, "cos_update_bp"] == pytest.approx(_cos(updates[name], bp[name]), abs=1e-9)
        assert table.loc[name, "update_norm"] == pytest.approx(float(updates[name].norm()), rel=1e-9)
        assert table.loc[name, "bp_grad_norm"] == pytest.approx(float(bp[name].norm()), rel=1e-9)
    # the output layer's update needs no feedback; the hidden layers' do, and B is random
    assert table.loc["out.weight", "cos_update_bp"] == pytest.approx(1.0, abs=1e-9)
    for name in ("fc1.weight", "fc2.weight"):
        assert table.loc[name, "cos_update_bp"] < 0.95
    assert net.fc1.weight.grad is None  # the model's .grad untouched


def test_foreign_fa_feedback_angles_equal_the_hand_computation():
    net, _, _ = make("foreign_fa")
    table = feedback_angles(net).set_index("layer")
    assert list(table.index) == ["fc1", "fc2", "out"]
    assert set(table["feedback"]) == {"weight_backward"}
    for name in table.index:
        layer = getattr(net, name)
        W, B = layer.weight.detach(), layer.weight_backward
        angle = math.degrees(math.acos(_cos(B, W)))
        assert table.loc[name, "angle_BW_deg"] == pytest.approx(angle, abs=1e-9)
        assert table.loc[name, "norm_ratio_BW"] == pytest.approx(float(B.norm() / W.norm()), rel=1e-9)
    # and update_alignment carries the same angles
    ua = update_alignment(net, *make("foreign_fa")[1:]).set_index("param")
    assert ua.loc["fc1.weight", "angle_BW_deg"] == pytest.approx(table.loc["fc1", "angle_BW_deg"])


def test_bp_twin_of_foreign_layers_shares_the_parameters_and_is_plain():
    net, x, _ = make("foreign_fa")
    tw = bp_twin(net, x)
    assert tw.model is not net
    for name in ("fc1", "fc2", "out"):
        layer, plain = getattr(net, name), tw.model.get_submodule(name)
        assert type(plain) is nn.Linear
        assert plain.weight is layer.weight and plain.bias is layer.bias
    assert isinstance(net.fc1, FALinear)  # the model itself is left as it was
    assert tw.replaced == ("fc1 (FALinear)", "fc2 (FALinear)", "out (FALinear)")
    assert tw.unvouched == ()
    # a step on the model's weights is seen by the twin (shared, not copied)
    with torch.no_grad():
        net.fc1.weight.add_(1.0)
    assert torch.equal(tw.model.fc1.weight, net.fc1.weight)


def test_foreign_fa_direction_quality_equals_cosines_of_the_foreign_backward():
    net, x, y = make("foreign_fa")
    table = direction_quality(net, x, y, hidden=FA_HIDDEN)
    assert list(table["module"]) == ["output of fc1", "output of fc2"]
    _, own, _ = independent(_states_fanet_own, net, x, y)  # the foreign backward, through FAFn
    _, bp, _ = independent(_states_fanet_bp, net, x, y)  # plain BP on a plain copy
    _, by_hand = _fa_by_hand(net, x, y)
    for a, d in zip(own, by_hand):  # the foreign backward is FA: check it independently too
        assert _rel(a, d) < RTOL
    for l, (a, g) in enumerate(zip(own, bp)):
        cos = F.cosine_similarity(a, g, dim=1, eps=1e-300)
        row = table.iloc[l]
        assert row["cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-9)
        assert row["cos_median"] == pytest.approx(float(cos.median()), abs=1e-9)
        assert row["g_norm_median"] == pytest.approx(float(g.norm(dim=1).median()), rel=1e-9)
        assert row["a_norm_median"] == pytest.approx(float(a.norm(dim=1).median()), rel=1e-9)
        assert abs(row["cos_mean"]) < 0.95  # FA's credit at a hidden state is not BP's


def test_foreign_fa_conv_layer_is_put_on_plain_bp_and_its_update_read():
    cnn, x, y = make("plain_cnn")
    fa = copy.deepcopy(cnn)
    fa.conv2 = FAConv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():
        fa.conv2.weight.copy_(cnn.conv2.weight)
        fa.conv2.bias.copy_(cnn.conv2.bias)
    tw = bp_twin(fa, x)
    assert type(tw.model.conv2) is nn.Conv2d and tw.model.conv2.weight is fa.conv2.weight
    assert tw.replaced == ("conv2 (FAConv2d)",) and tw.unvouched == ()
    # g_l: plain BP's, i.e. autograd of the plain CNN with the same weights
    _, gs, _ = bp_reference(fa, x, y, hidden=CNN_HIDDEN)
    _, ref_g, _ = independent(_states_cnn, cnn, x, y)
    for g, rg in zip(gs, ref_g):
        assert _rel(g, rg) < RTOL
    # conv1's update: the FA net's own backward (run here) against the plain CNN's gradient
    own = copy.deepcopy(fa)
    F.cross_entropy(own(x), y).backward()
    bp = torch.autograd.grad(F.cross_entropy(cnn(x), y), cnn.conv1.weight)[0]
    table = update_alignment(fa, x, y).set_index("param")
    by_hand = _cos(own.conv1.weight.grad, bp)
    assert table.loc["conv1.weight", "cos_update_bp"] == pytest.approx(by_hand, abs=1e-9)
    assert table.loc["conv1.weight", "cos_update_bp"] < 0.95
    for name in ("conv2.weight", "fc1.weight", "fc2.weight"):  # no feedback above them
        assert table.loc[name, "cos_update_bp"] == pytest.approx(1.0, abs=1e-9)
    angle = math.degrees(math.acos(_cos(fa.conv2.weight_backward, fa.conv2.weight.detach())))
    assert table.loc["conv2.weight", "angle_BW_deg"] == pytest.approx(angle, abs=1e-9)


def test_audit_growth_since_initialisation_on_a_user_model():
    trained, x, y = make("resmlp_add", seed=0)
    initial, _, _ = make("resmlp_add", seed=1)
    with torch.no_grad():  # "training" grew the embedding 7x
        trained.embed.weight.mul_(7.0)
    trained.eval()
    initial.eval()
    report = audit(trained, x, y, initial=initial)
    now = _median_norms(independent(_states_from_forward, trained, x, y)[0], "flat")
    then = _median_norms(independent(_states_from_forward, initial, x, y)[0], "flat")
    assert report.init_ratio == pytest.approx([a / b for a, b in zip(now, then)], rel=RTOL)
    assert report.init_ratio[0] > 3 and not report.d1  # growth D1 cannot see: it is in h_0


def _fa_resmlp():
    """The reference layout with every block's w1, w2 a foreign FA layer (same weights as the
    plain model beside it)."""
    plain, x, y = make("resmlp_add")
    fa = copy.deepcopy(plain)
    torch.manual_seed(7)
    for block in fa.blocks:
        for name in ("w1", "w2"):
            old = getattr(block, name)
            new = FALinear(old.in_features, old.out_features).double()
            new.weight, new.bias = old.weight, old.bias
            setattr(block, name, new)
    return plain.eval(), fa.eval(), x, y


def test_foreign_fa_in_the_reference_layout_is_found_and_read_without_hidden():
    plain, fa, x, y = _fa_resmlp()
    report = audit(fa, x, y)
    assert list(report.hidden_read) == CASES["resmlp_add"][-1]
    assert "6 layer(s) on plain BP" in report.twin
    _, gs, _ = bp_reference(fa, x, y)
    _, bp, _ = independent(_states_from_forward, plain, x, y)  # plain BP, same weights
    for g, rg in zip(gs, bp):
        assert _rel(g, rg) < RTOL
    # the credit: the FA model's own backward at the states its own forward returns
    _, own, _ = independent(_states_from_forward, fa, x, y)
    table = direction_quality(fa, x, y)
    for l, (a, g) in enumerate(zip(own, bp)):
        cos = F.cosine_similarity(a, g, dim=1, eps=1e-300)
        assert table.loc[l, "cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-9)
        assert table.loc[l, "a_norm_median"] == pytest.approx(float(a.norm(dim=1).median()), rel=1e-9)
    # FA changes the credit below the top block only (the head is plain)
    assert table.loc[3, "cos_mean"] == pytest.approx(1.0, abs=1e-9)
    assert table.loc[0, "cos_mean"] < 0.9  # B ~ 1 per row against W2 ~ 0.01: the branch dominates


def test_custom_function_outside_a_layer_is_unvouched_and_reported():
    torch.manual_seed(0)
    net = SignNet().double()
    x = torch.randn(8, 12, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (8,))
    tw = bp_twin(net, x)
    assert tw.model is net and tw.replaced == ()
    assert tw.unvouched == ("act (StraightThroughFnBackward)",)
    report = audit(net, x, y, hidden=["fc1", "act"])
    assert report.unvouched == ("act (StraightThroughFnBackward)",)
    assert "NOT vouched for" in report.summary() and "act (StraightThroughFnBackward)" in report.summary()
    # a plain model has nothing unvouched
    assert bp_twin(nn.Sequential(nn.Linear(12, 5)).double(), x).unvouched == ()


# =============================================================================================
# 003's defect: rebuilding h_{l+1} = h_l + block(h_l) for blocks that add the skip themselves
# =============================================================================================

def reference_bp_grad_norms(model, x, y):
    """003's ``FAProtocol._compute_bp_grad_norms`` (its ``_block_has_internal_skip`` returns
    False, so every shape-preserving block gets the skip added once more), for comparison."""
    with torch.no_grad():
        _, hiddens = model(x, return_hidden=True)
    hs = [hiddens[0].detach().clone().requires_grad_(True)]
    with torch.enable_grad():
        for block in model.blocks:
            h_next = block(hs[-1])
            if h_next.shape == hs[-1].shape:
                h_next = hs[-1] + h_next
            hs.append(h_next)
        h = hs[-1]
        h = F.adaptive_avg_pool2d(h, 1).flatten(1) if h.dim() == 4 else h[:, 0] if h.dim() == 3 else h
        if hasattr(model, "out_ln"):
            h = model.out_ln(h)
        grads = torch.autograd.grad(F.cross_entropy(model.out_head(h), y), hs)
    pooled = [F.adaptive_avg_pool2d(g, 1).flatten(1) if g.dim() == 4 else g[:, 0] if g.dim() == 3
              else g for g in grads]
    return [float(g.norm(dim=-1).median()) for g in pooled]


def test_reference_method_is_right_where_the_model_adds_the_skip():
    """On its own layout (the model adds the skip) 003's rebuild is the true chain."""
    model, x, y = make("resmlp_add")
    model.eval()
    assert reference_bp_grad_norms(model, x, y) == pytest.approx(audit(model, x, y).grad_norms, rel=RTOL)


DEFECT_MODELS = {"vitmini": lambda: ViTMini(num_blocks=4), "smallresnet": lambda: SmallResNet(num_blocks=4)}


@pytest.mark.parametrize("case", list(DEFECT_MODELS))
def test_reference_defect_changes_the_gradient_norm_on_blocks_with_an_internal_skip(case):
    """003's depth (4 blocks) at toy width. Measured at seeds 0..3: on ViTMini the terminal
    LayerNorm undoes the doubled stream's scale, so ||g_0|| is about right (ratio 0.5..2) but
    ||g_L||, D2's statistic, is 0.20..0.30 of the true one; on SmallResNet ||g_L|| is right
    (1.0..1.2) and ||g_0|| 18..21 times too large (each doubled skip doubles the chain)."""
    _, x, y = make(case)
    torch.manual_seed(0)
    model = DEFECT_MODELS[case]().double().eval()
    ours = audit(model, x, y).grad_norms
    _, ref_g, _ = independent(_states_from_forward, model, x, y)
    assert ours == pytest.approx(_median_norms(ref_g, CASES[case][5]), rel=RTOL)
    ratios = [t / o for t, o in zip(reference_bp_grad_norms(model, x, y), ours)]
    if case == "vitmini":
        assert ratios[-1] < 1 / 2.5, ratios  # D2 reads a g_L 2.5+ times too small
    else:
        assert ratios[0] > 10 and ratios[-1] == pytest.approx(1.0, abs=0.3), ratios


# =============================================================================================
# Error messages
# =============================================================================================

class NoStructure(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwiceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, CLASSES)

    def forward(self, x):
        return self.fc2(self.fc1(torch.relu(self.fc1(x))))


class TwiceBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12), nn.Linear(12, 12)])
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x):
        h = self.blocks[0](x)
        h = self.blocks[1](self.blocks[1](h))
        return self.head(h)


class TupleNet(NoStructure):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h)), h


class AddOne(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1.0


class AddOneNet(NoStructure):
    def __init__(self):
        super().__init__()
        self.fc1 = AddOne(12, 8)


def _xy(n=6):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 12, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def test_error_no_structure_lists_candidate_modules_and_shows_hidden():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"no hidden states in NoStructure") as info:
        audit(NoStructure(), x, y)
    text = str(info.value)
    assert "hidden=[" in text and "fc1 (Linear)" in text and "fc2 (Linear)" in text


def test_error_unknown_module_is_named():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"no module 'fc9'.*fc1 \(Linear\)"):
        audit(NoStructure(), x, y, hidden=["fc1", "fc9"])


def test_error_module_that_runs_twice():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"'fc1' ran 2 times"):
        audit(TwiceNet(), x, y, hidden=["fc1", "fc2"])
    with pytest.raises(ValueError, match=r"block 'blocks.1' ran 2 times.*hidden=\["):
        audit(TwiceBlocks(), x, y)


@pytest.mark.parametrize("reading", ["audit", "bp_reference", "direction_quality", "update_alignment"])
def test_error_forward_returning_a_tuple(reading):
    x, y = _xy()
    kw = {} if reading == "update_alignment" else {"hidden": ["fc1", "fc2"]}
    fn = {"audit": audit, "bp_reference": bp_reference, "direction_quality": direction_quality,
          "update_alignment": update_alignment}[reading]
    with pytest.raises(ValueError, match=r"TupleNet must map a batch to logits.*returned tuple"):
        fn(TupleNet(), x, y, **kw)


def test_error_bogus_pool():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"pool must be one of auto, cls, mean, flat.*'bogus'"):
        audit(NoStructure(), x, y, hidden=["fc1", "fc2"], pool="bogus")
    with pytest.raises(ValueError, match=r"pool must be one of"):
        audit(make("resmlp_add")[0], *make("resmlp_add")[1:], pool="bogus")


def test_error_hidden_given_as_a_string():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"list of module names.*string 'fc1'.*hidden=\['fc1'"):
        audit(NoStructure(), x, y, hidden="fc1")


def test_error_feedback_angles_without_a_feedback_matrix():
    with pytest.raises(ValueError, match=r"no layer of ResNet holds a feedback matrix"):
        feedback_angles(tv_resnet18())


def test_error_update_alignment_with_nothing_readable():
    x, y = _xy()
    net = NoStructure()
    net.requires_grad_(False)
    net.fc2.bias.requires_grad_(True)  # something trains, but no matrix
    with pytest.raises(ValueError, match=r"NoStructure has no trainable weight.*nothing to compare"):
        update_alignment(net, x, y)


def test_error_twin_whose_replaced_layer_is_not_the_plain_layer():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"other logits than the model.*fc1 \(AddOne\).*twin="):
        audit(AddOneNet(), x, y, hidden=["fc1", "fc2"])
    with pytest.raises(ValueError, match=r"fc1 \(AddOne\)"):
        bp_twin(AddOneNet(), x)


def test_named_hidden_states_freeze_every_module_that_runs_between_h0_and_hL():
    """D3's frozen-hidden-modules baseline on a flat CNN named pool1/pool2/fc1: conv2 runs between
    h_0 (pool1's output) and h_1, so it is frozen with fc1; conv1 (before h_0) and fc2 (after
    h_L) train. Without an example batch only the named modules are known."""
    from fa_study.data import Dataset
    from fa_study.train import TrainConfig, frozen_baseline

    model = PlainCNN()
    x = torch.randn(4, 3, 8, 8)
    states = find_hidden_states(model, x, hidden=CNN_HIDDEN)
    assert states.blocks == ["conv2", "fc1"]
    assert find_hidden_states(model, None, hidden=CNN_HIDDEN).blocks == ["pool2", "fc1"]
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (40,), generator=g)
    ds = Dataset("toy", "train", xs, ys, "synthetic", CLASSES, (0.0,) * 3, (1.0,) * 3)
    before = copy.deepcopy(model.state_dict())
    acc = frozen_baseline(model, ds, ds, TrainConfig(epochs=1, batch_size=8, eval_batch=8),
                          hidden=CNN_HIDDEN)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy trained


def test_a_backward_compared_with_itself_is_marked_by_construction():
    """A plain network read through its own backward: the twin is the network itself, so its
    cosines of 1 are no finding, and both tables say so; a foreign FA network's are measured, and
    so is a package rule's fill_grads."""
    from fa_study.rules import build_rule

    plain, x, y = make("plain_cnn")
    assert update_alignment(plain, x, y)["by_construction"].all()
    dq = direction_quality(plain, x, y, hidden=CNN_HIDDEN)
    assert dq["by_construction"].all() and (dq["cos_mean"] > 1 - 1e-9).all()
    assert (dq["reading"] == "by construction").all()  # never "reasonable": nothing was measured
    assert "NO FINDING" in read_direction_quality(dq)
    bp = build_rule("bp")
    bp.setup(plain, CLASSES, torch.Generator().manual_seed(0))
    assert not update_alignment(plain, x, y, bp)["by_construction"].any()
    fa, xf, yf = make("foreign_fa")
    assert not update_alignment(fa, xf, yf)["by_construction"].any()
    dq_fa = direction_quality(fa, xf, yf, hidden=FA_HIDDEN)
    assert not dq_fa["by_construction"].any() and "by construction" not in set(dq_fa["reading"])
    assert "NO FINDING" not in read_direction_quality(dq_fa)


def test_position_sum_and_pooling_of_hooked_states_match_the_formulas():
    """Tokens (batch, T, d) are summed over T (not over d), spatial maps over H and W; pooling
    takes the class token or the mean over tokens / pixels."""
    from fa_study.diagnostics.taps import pool_by_rank, sum_positions

    tokens, maps, rows = torch.randn(2, 5, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 6)
    assert torch.equal(sum_positions(rows), rows)
    assert torch.allclose(sum_positions(tokens), torch.stack([t.sum(0) for t in tokens]))
    assert torch.allclose(sum_positions(maps), maps.sum(dim=(2, 3))) and sum_positions(maps).shape == (2, 4)
    assert torch.equal(pool_by_rank(tokens, "cls"), tokens[:, 0])
    assert torch.allclose(pool_by_rank(tokens, "mean"), tokens.mean(1))
    assert torch.allclose(pool_by_rank(maps, "mean"), maps.mean(dim=(2, 3)))
