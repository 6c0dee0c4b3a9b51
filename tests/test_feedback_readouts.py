"""Alignment read-outs: B-W angles and the cosine of the applied update with BP's gradient."""
import copy
import math

import pytest
import torch
from torch import nn

from fa_study.feedback import (
    LocalLinear, bp_twin, convert, feedback_alignment, update_alignment,
)


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
    model, _ = convert(_mlp(dropout=0.3), "fa")
    for m in model:
        if isinstance(m, LocalLinear):
            m.set_feedback(m.weight)
    table = update_alignment(model, CE, x, y)  # the same dropout mask in both passes
    assert list(table["layer"]) == ["0", "3", "5"]
    assert table["cos_update_bp"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert table["angle_BW_deg"].tolist() == pytest.approx([0.0] * 3, abs=0.1)
    assert table["norm_ratio_BW"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    torch.testing.assert_close(torch.tensor(table["update_norm"].values),
                               torch.tensor(table["bp_grad_norm"].values))


def test_random_fa_is_exact_only_at_the_output_layer():
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(), "fa", generator=torch.Generator().manual_seed(1))
    table = update_alignment(model, CE, x, y).set_index("layer")
    # the last layer's gradient needs no feedback matrix, so it is BP's exactly
    assert table.loc["5", "cos_update_bp"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["0", "cos_update_bp"] < 0.9 and table.loc["3", "cos_update_bp"] < 0.9
    # an independent random B is nearly orthogonal to W
    assert (table["angle_BW_deg"] > 60).all()


def test_readout_leaves_the_model_and_the_rng_untouched():
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(dropout=0.2), "weight_mirror")
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    table = update_alignment(model, CE, x, y, lr_b=0.5)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert table["cos_update_bp"].notna().all()


def test_dfa_readout_uses_the_overwritten_gradient():
    torch.manual_seed(0)
    x, y = _data()
    model, _ = convert(_mlp(), "dfa", dfa_target_dim=3)
    table = update_alignment(model, CE, x, y).set_index("layer")
    assert table.loc["5", "cos_update_bp"] == pytest.approx(1.0, abs=1e-6)  # B_dfa = I there
    assert table.loc["0", "cos_update_bp"] < 0.99  # random direct projections differ from BP
    assert table["angle_BW_deg"].isna().all()  # direct feedback has no W-shaped B


def test_feedback_alignment_for_sign_sym_matches_formula():
    torch.manual_seed(0)
    model, _ = convert(_mlp(), "sign_sym")
    table = feedback_alignment(model)
    W = model[0].weight.detach().double()
    cos = (W.abs().sum() / (W.norm() * math.sqrt(W.numel()))).item()  # <sign(W), W> / norms
    assert table.loc[0, "angle_BW_deg"] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-6)
    assert table.loc[0, "norm_ratio_BW"] == pytest.approx(1.0, abs=1e-6)


def test_bp_twin_is_bp():
    torch.manual_seed(0)
    model, _ = convert(_mlp(), "fa")
    twin = bp_twin(model)
    assert all(m.method == "bp" for m in twin if isinstance(m, LocalLinear))
    assert all(m.method == "fa" for m in model if isinstance(m, LocalLinear))
    x, _ = _data()
    assert torch.equal(twin(x), model(x))


def test_dfa_block_readout_with_taps_in_a_copy():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Tanh())])
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(x + self.blocks[0](x))

    x, y = _data()
    model, _ = convert(Net(), "dfa_block", dfa_block_dim=6)
    table = update_alignment(model, CE, x, y).set_index("layer")
    assert table.loc["head", "cos_update_bp"] == pytest.approx(1.0, abs=1e-6)
    assert not math.isnan(table.loc["blocks.0.0", "cos_update_bp"])
    # the readout ran on copies: the original's tap recorded nothing, and a copy has its own
    # tap, shared by its block hook and its layer
    tap = next(iter(model.blocks[0]._forward_hooks.values()))
    assert tap.error is None and model.blocks[0][0]._block_tap is tap
    twin = copy.deepcopy(model)
    twin_tap = next(iter(twin.blocks[0]._forward_hooks.values()))
    assert twin_tap is not tap and twin.blocks[0][0]._block_tap is twin_tap
