"""Per-weight readings on converted models: B-W angles (feedback_angles) and the cosine of the
applied update with BP's gradient (update_alignment), against hand-run steps and formulas."""
import copy
import math

import pytest
import torch
from torch import nn

from fa_study.diagnostics import bp_twin, feedback_angles, update_alignment
from fa_study.feedback import LocalLinear, capture_output_error, feedback_step, local_layers
from fa_study.rules import LAYER_RULES, convert


def _mlp(dropout=0.0):
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 16),
                         nn.Tanh(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


CE = nn.functional.cross_entropy


def test_bp_and_fa_with_b_equal_w_apply_bp_updates():
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(dropout=0.3), "layer_fa")
    for m in model:
        if isinstance(m, LocalLinear):
            m.set_feedback(m.weight)
    table = update_alignment(model, x, y)  # the same dropout mask in both passes
    assert list(table["param"]) == ["0.weight", "3.weight", "5.weight"]
    assert table["cos_update_bp"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert table["angle_BW_deg"].tolist() == pytest.approx([0.0] * 3, abs=0.1)
    assert table["norm_ratio_BW"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    torch.testing.assert_close(torch.tensor(table["update_norm"].values),
                               torch.tensor(table["bp_grad_norm"].values))


def test_random_fa_is_exact_only_at_the_output_layer():
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(), "layer_fa", generator=torch.Generator().manual_seed(1))
    table = update_alignment(model, x, y).set_index("param")
    # the last layer's gradient needs no feedback matrix, so it is BP's exactly
    assert table.loc["5.weight", "cos_update_bp"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["0.weight", "cos_update_bp"] < 0.9 and table.loc["3.weight", "cos_update_bp"] < 0.9
    # an independent random B is nearly orthogonal to W
    assert (table["angle_BW_deg"] > 60).all()


def test_readout_leaves_the_model_and_the_rng_untouched():
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(dropout=0.2), "weight_mirror")
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    table = update_alignment(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert table["cos_update_bp"].notna().all()


@pytest.mark.parametrize("gated", [True, False])
def test_dfa_readout_captures_the_output_error(gated):
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(), "layer_dfa", gated=gated, num_classes=3)
    table = update_alignment(model, x, y).set_index("param")
    # gated: the output layer's grad_out is e itself; ungated: B_dfa = I there
    assert table.loc["5.weight", "cos_update_bp"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["0.weight", "cos_update_bp"] < 0.99  # random direct projections differ from BP
    assert table["angle_BW_deg"].isna().all()  # direct feedback has no W-shaped B
    assert table["norm_ratio_BW"].isna().all()
    # the readout's rule pass is the training step: same update as a hand-run step on a copy
    rule = copy.deepcopy(model)
    out = rule(x)
    capture_output_error(rule, out)
    CE(out, y).backward()
    feedback_step(rule)
    cos0 = nn.functional.cosine_similarity(rule[0].weight.grad.flatten(),
                                           _bp_grad(model, x, y, 0), dim=0)
    assert table.loc["0.weight", "cos_update_bp"] == pytest.approx(float(cos0), abs=1e-6)


def _bp_grad(model, x, y, i):
    twin = bp_twin(model).model
    CE(twin(x), y).backward()
    return twin[i].weight.grad.flatten()


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.width = 8  # the blocks' width, read by layer_dfa_block
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh())])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.blocks[0](h))


@pytest.mark.parametrize("method, options",
                         [(c.name, {}) for c in LAYER_RULES] + [("layer_dfa", {"gated": False})])
def test_readouts_work_for_every_rule(method, options):
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(Blocks(), method, generator=torch.Generator().manual_seed(1), num_classes=3, **options)
    state = copy.deepcopy(model.state_dict())
    table = update_alignment(model, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # brsf's redraw and GrAPE ran on the copy
    assert list(table["param"]) == ["embed.weight", "blocks.0.0.weight", "head.weight"]
    assert table["cos_update_bp"].notna().all() and (table["update_norm"] > 0).all()
    direct = method in ("layer_dfa", "layer_dfa_block")
    assert table["angle_BW_deg"].isna().all() == direct
    assert table["angle_BW_deg"].notna().all() == (not direct)
    # the BP twin is BP for every rule: the same outputs, BP's gradients
    twin = bp_twin(model, x).model
    assert not local_layers(twin) and twin is not model  # every local layer back on plain BP
    assert all(layer.method == method for _, layer in local_layers(model))
    torch.testing.assert_close(twin(x), model(x))
    ref = Blocks()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k in ref.state_dict()})
    CE(twin(x), y).backward()
    CE(ref(x), y).backward()
    torch.testing.assert_close(twin.embed.weight.grad, ref.embed.weight.grad)


def test_feedback_alignment_for_sign_sym_matches_formula():
    torch.manual_seed(0)
    model, _ = convert(_mlp(), "sign_sym")
    table = feedback_angles(model)
    W = model[0].weight.detach().double()
    cos = (W.abs().sum() / (W.norm() * math.sqrt(W.numel()))).item()  # <sign(W), W> / norms
    assert table.loc[0, "angle_BW_deg"] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-6)
    assert table.loc[0, "norm_ratio_BW"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("method", ["frsf", "brsf"])
def test_feedback_alignment_for_sign_concordant_matches_formula(method):
    torch.manual_seed(0)
    model, _ = convert(_mlp(), method)
    table = feedback_angles(model)
    W = model[3].weight.detach().double()
    B = model[3].B_abs.double() * torch.sign(W)
    cos = float((B * W).sum() / (B.norm() * W.norm()))
    assert cos > 0.5  # sign-concordant feedback points W's way
    assert table.loc[1, "angle_BW_deg"] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-6)
    assert table.loc[1, "norm_ratio_BW"] == pytest.approx(float(B.norm() / W.norm()), abs=1e-6)


def test_bp_twin_is_bp():
    torch.manual_seed(0)
    model, _ = convert(_mlp(), "layer_fa")
    twin = bp_twin(model).model
    assert all(type(m) is nn.Linear for m in twin if isinstance(m, nn.Linear))
    assert all(m.method == "layer_fa" for m in model if isinstance(m, LocalLinear))
    x, _ = _data()
    assert torch.equal(twin(x), model(x))


def test_dfa_block_readout_with_taps_in_a_copy():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.width = 6
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Tanh())])
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(x + self.blocks[0](x))

    x, y = _data()
    model, _ = convert(Net(), "layer_dfa_block")
    table = update_alignment(model, x, y).set_index("param")
    assert table.loc["head.weight", "cos_update_bp"] == pytest.approx(1.0, abs=1e-6)
    assert not math.isnan(table.loc["blocks.0.0.weight", "cos_update_bp"])
    # the readout ran on copies: the original's tap recorded nothing, and a copy has its own
    # tap, shared by its block hook and its layer
    tap = next(iter(model.blocks[0]._forward_hooks.values()))
    assert tap.error is None and model.blocks[0][0]._block_tap is tap
    twin = copy.deepcopy(model)
    twin_tap = next(iter(twin.blocks[0]._forward_hooks.values()))
    assert twin_tap is not tap and twin.blocks[0][0]._block_tap is twin_tap
