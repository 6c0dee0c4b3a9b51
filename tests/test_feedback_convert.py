"""convert(): the right layers are replaced, outputs are unchanged, every rule trains."""
import copy

import pandas as pd
import pytest
import torch
from torch import nn

from fa_study.feedback import (
    LocalConv2d, LocalLinear, capture_output_error, feedback_step, needs_output_error,
)
from fa_study.rules import LAYER_RULES, build_rule, convert

# every layer rule with its default options, and ungated DFA (seed 000's form)
RULE_CASES = [(cls.name, {}) for cls in LAYER_RULES] + [("layer_dfa", {"gated": False})]


def _id(case):
    return case if isinstance(case, str) else ",".join(f"{k}={v}" for k, v in case.items()) or "default"


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(self.ln(torch.relu(self.fc(h))))


def test_convert_replaces_linear_and_conv_and_keeps_outputs():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(2, 3, 6, 6)
    ref = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    model, report = convert(model, "layer_fa", generator=torch.Generator().manual_seed(0))
    assert isinstance(model.conv, LocalConv2d) and model.conv.method == "layer_fa"
    assert isinstance(model.fc, LocalLinear) and isinstance(model.head, LocalLinear)
    assert type(model.bn) is nn.BatchNorm2d and type(model.ln) is nn.LayerNorm
    # the same Parameter objects: outputs, tying and an existing optimizer are unaffected
    for n, p in model.named_parameters():
        assert p is params_before[n]
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(ref, mode)()
        assert torch.equal(model(x), ref(x))
    assert isinstance(report, pd.DataFrame)
    assert list(report.columns) == ["name", "type", "action", "method", "reason"]
    actions = dict(zip(report["name"], report["action"]))
    assert actions == {"conv": "converted", "bn": "kept_bp", "fc": "converted", "ln": "kept_bp",
                       "head": "converted"}
    methods = dict(zip(report["name"], report["method"]))
    assert methods["conv"] == methods["fc"] == methods["head"] == "layer_fa" and pd.isna(methods["bn"])
    # converting again changes nothing
    _, again = convert(model, "layer_fa")
    assert set(again.loc[again.action == "skipped", "name"]) == {"conv", "fc", "head"}


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.mlp(h).mean(1))


def test_multihead_attention_is_left_on_bp_and_reported():
    torch.manual_seed(0)
    model = WithAttention()
    tokens = torch.randint(0, 10, (2, 5))
    ref = copy.deepcopy(model)
    model, report = convert(model, "sign_sym")
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.mlp, LocalLinear)
    assert torch.equal(model(tokens), ref(tokens))
    rows = report.set_index("name")
    assert rows.loc["attn", "action"] == "skipped" and "MultiheadAttention" in rows.loc["attn", "reason"]
    assert rows.loc["attn.out_proj", "action"] == "skipped"
    assert rows.loc["emb", "action"] == "kept_bp"
    # the input gradient of the converted layer is the sign-symmetric one
    out = model(tokens)
    out.sum().backward()
    assert model.attn.in_proj_weight.grad is not None


def test_ungated_dfa_needs_an_explicit_conv_rule():
    torch.manual_seed(0)
    model = Mixed()
    with pytest.raises(ValueError, match=r"has no Conv2d form.*'Mixed' model has Conv2d layers \(conv\).*"
                                         "conv_rule='bp'"):
        convert(model, "layer_dfa", gated=False, num_classes=5)
    assert type(model.fc) is nn.Linear  # a refused call changes nothing
    model, report = convert(model, "layer_dfa", gated=False, conv_rule="bp", num_classes=5)
    assert type(model.conv) is nn.Conv2d and model.fc.method == "layer_dfa"
    rows = report.set_index("name")
    assert rows.loc["conv", "action"] == "kept_bp" and rows.loc["fc", "action"] == "converted"
    assert model.fc.B_dfa.shape == (16, 5)
    torch.testing.assert_close(model.head.B_dfa, torch.eye(5))  # the output layer receives e itself
    assert model.fc.has_random_feedback and not model.head.has_random_feedback


class ConvBlocks(nn.Module):
    """A conv stem, two residual blocks of width 8 and a head: what layer_dfa_block reads."""

    def __init__(self):
        super().__init__()
        self.width = 8
        self.stem = nn.Conv2d(3, 2, 3, padding=1)
        self.embed = nn.Linear(2 * 4 * 4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(torch.relu(self.stem(x)).flatten(1))
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def test_dfa_block_leaves_convolutions_on_bp_and_needs_blocks():
    with pytest.raises(ValueError, match="'layer_dfa_block' cannot train Mixed.*blocks with a width"):
        convert(Mixed(), "layer_dfa_block")
    model, report = convert(ConvBlocks(), "layer_dfa_block", generator=torch.Generator().manual_seed(0))
    rows = report.set_index("name")
    assert type(model.stem) is nn.Conv2d and rows.loc["stem", "action"] == "kept_bp"
    assert pd.isna(rows.loc["stem", "method"]) and rows.loc["blocks.0.0", "method"] == "layer_dfa_block"
    assert model.blocks[0][0].B_dfa_block.shape == (8, 8)
    assert model.embed.B_dfa_block is None and model.head.B_dfa_block is None  # outside every block
    with pytest.raises(ValueError, match="conv_rule must be 'bp' or a layer rule with a Conv2d form"):
        convert(ConvBlocks(), "layer_fa", conv_rule="layer_dfa_block")


def test_dfa_converts_convolutions_too():
    torch.manual_seed(0)
    model, report = convert(Mixed(), "layer_dfa", num_classes=5,
                            generator=torch.Generator().manual_seed(0))
    assert model.conv.method == "layer_dfa" and model.fc.method == "layer_dfa"
    assert model.conv.B_dfa.shape == (5, 3, 3, 3)  # (target_dim, C_in, kh, kw)
    assert model.fc.B_dfa.shape == (5, 144) and model.head.B_dfa.shape == (5, 16)
    assert model.conv._output_error is model.fc._output_error is model.head._output_error
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = model(x)
    capture_output_error(model, out)
    nn.functional.cross_entropy(out, torch.tensor([0, 3])).backward()
    assert model.conv.weight.grad.abs().sum() > 0 and torch.isfinite(model.conv.weight.grad).all()
    # the conv layer's input gradient is the projection of e through its B_dfa
    e = (torch.softmax(out.detach(), -1) - nn.functional.one_hot(torch.tensor([0, 3]), 5)) / 2
    E = e[:, :, None, None].expand(2, 5, 6, 6)
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, model.conv.B_dfa, E,
                                                                  padding=1))
    # an explicit conv_rule still wins
    model, _ = convert(Mixed(), "layer_dfa", conv_rule="layer_fa", num_classes=5)
    assert model.conv.method == "layer_fa" and model.fc.method == "layer_dfa"
    assert not hasattr(model.conv, "B_dfa") and model.conv.B.shape == model.conv.weight.shape


def test_options_belong_to_the_rule_that_declares_them():
    model, _ = convert(Mixed(), "layer_grape", lr_b=0.3)
    assert model.conv.rule is model.fc.rule and model.fc.rule.lr_b == 0.3
    model, _ = convert(Mixed(), "layer_grape", conv_rule=build_rule("frsf", init_std=0.1), lr_b=0.3)
    assert model.conv.method == "frsf" and model.conv.rule.init_std == 0.1
    assert model.fc.method == "layer_grape" and model.fc.rule.lr_b == 0.3
    with pytest.raises(ValueError, match="rule 'frsf' has no option 'lr_b'; allowed options: 'init_std'"):
        convert(Mixed(), "frsf", lr_b=0.3)
    with pytest.raises(ValueError, match=r"options \['init'\] go with a rule name, not a built rule"):
        convert(Mixed(), build_rule("layer_fa"), init="sparse")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="'hebb'.*allowed.*'layer_fa'"):
        convert(nn.Linear(2, 2), "hebb")
    with pytest.raises(ValueError, match="'layer_fa' has no option 'lr_bb'; allowed options: 'init'"):
        convert(nn.Linear(2, 2), "layer_fa", lr_bb=0.1)
    with pytest.raises(ValueError, match="unknown init 'xavier'; allowed values: 'gaussian'"):
        convert(nn.Linear(2, 2), "layer_fa", init="xavier")
    with pytest.raises(ValueError, match="lr_b must be a finite number > 0 or None.*got inf"):
        convert(nn.Linear(2, 2), "kolen_pollack", lr_b=float("inf"))
    with pytest.raises(ValueError, match="conv_rule must be 'bp' or a layer rule.*got 'layer_dfa_block'"):
        convert(nn.Linear(2, 2), "layer_fa", conv_rule="layer_dfa_block")
    with pytest.raises(ValueError, match=r"convert\(\) takes a layer rule, one of \['layer_fa'.*got BP\(\)"):
        convert(nn.Linear(2, 2), "bp")
    with pytest.raises(ValueError, match="'layer_dfa' draws feedback matrices sized by the number of "
                                         "classes: pass num_classes="):
        convert(nn.Linear(2, 2), "layer_dfa")
    with pytest.raises(ValueError, match="in_features must be an integer >= 1"):
        convert(nn.Sequential(nn.Linear(0, 2)), "layer_fa")


def test_root_module_shared_modules_and_subclasses():
    lin = nn.Linear(3, 3)
    new, report = convert(lin, "layer_fa")
    assert isinstance(new, LocalLinear) and new.weight is lin.weight
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model, report = convert(model, "kolen_pollack")
    assert model[0] is model[2] and isinstance(model[0], LocalLinear)
    assert "same module as 0" in report.set_index("name").loc["2", "reason"]

    class MyLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    normed = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda *a: None)
    model, report = convert(nn.Sequential(MyLinear(2, 2), normed, hooked, nn.Linear(2, 2)), "layer_fa")
    assert type(model[0]) is MyLinear and model[1] is normed and model[2] is hooked
    assert isinstance(model[3], LocalLinear)
    reasons = report.set_index("name")["reason"]
    assert "subclass" in reasons["0"] and "parametrized" in reasons["1"]
    assert "hooks" in reasons["2"]
    # a model with nothing convertible is refused, not silently left on BP
    with pytest.raises(ValueError, match="'layer_fa' cannot train Sequential"):
        convert(nn.Sequential(MyLinear(2, 2), hooked), "layer_fa")


def test_convert_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    a = Mixed()
    b = copy.deepcopy(a)
    convert(a, "layer_fa", generator=torch.Generator().manual_seed(5), init="sparse")
    convert(b, "layer_fa", generator=torch.Generator().manual_seed(5), init="sparse")
    assert torch.equal(a.fc.B, b.fc.B) and torch.equal(a.conv.B, b.conv.B)


class TinyBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.width = 16  # the blocks' width, which layer_dfa_block reads
        self.embed = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


@pytest.mark.parametrize("rule, options", RULE_CASES, ids=_id)
def test_every_rule_trains_through_one_generic_loop(rule, options):
    # The loop a trainer writes once: forward, backward, feedback_step, optimizer step.
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model, _ = convert(TinyBlocks(), rule, num_classes=2, generator=torch.Generator().manual_seed(0),
                       **options)
    assert needs_output_error(model) == (rule == "layer_dfa")  # ungated: read after the backward
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = model(x)
        capture_output_error(model, out)  # harmless for the rules that do not need it
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        feedback_step(model)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
