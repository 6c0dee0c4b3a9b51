"""train() on networks the package did not build: a plain CNN and the reference's layout (embed /
blocks returning the branch / out_ln / out_head), with BP and the layer rules; the refusal of the
rules that need the block interface; the per-layer columns (found, named, or left out with a
warning and a note); data checks without num_classes; and frozen_baseline, D3's baseline for
any network."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study import feedback
from fa_study import train as train_module
from fa_study.config import seed_everything
from fa_study.data import Dataset
from fa_study.diagnostics import audit
from fa_study.models import build_model
from fa_study.rules import RULES, build_rule, convert
from fa_study.train import TrainConfig, frozen_baseline, train

SHAPE = (3, 8, 8)
CLASSES = 3
HIDDEN = ["conv1", "conv2", "fc1"]  # the CNN's stages: h_0, h_1, h_2
CFG = TrainConfig(epochs=3, batch_size=32, lr=1e-2, eval_batch=32, seed=3, log_every=2)
ANY_MODEL_RULES = ("bp", "frozen", "layer_fa", "sign_sym", "frsf", "brsf", "layer_grape",
                   "kolen_pollack", "weight_mirror", "layer_dfa")
# what each rule that needs the block interface says the plain CNN lacks
LACKS = {"fa": "embed / step / readout) of fa_study.models.BlockModel",
         "dfa": "embed / step / readout) of fa_study.models.BlockModel",
         "oracle": "embed / step / readout) of fa_study.models.BlockModel",
         "grape_fa": "embed / step / readout) of fa_study.models.BlockModel",
         "stiefel_dfa": "embed / step / readout) of fa_study.models.BlockModel",
         "ra_fa": "MatrixMLP", "ra_rev": "MatrixMLP", "ra_recon": "MatrixMLP", "ra_comb": "MatrixMLP",
         "layer_dfa_block": "blocks with a width d", "shallow": "num_blocks=0"}


def _toy(n: int, split: str, seed: int, classes: int = CLASSES) -> Dataset:
    """Labels of a fixed random linear teacher (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(classes, math.prod(SHAPE), generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x.reshape(n, -1) @ teacher.t()).argmax(-1)
    return Dataset("toy", split, x, y, "toy-teacher", classes, (0.0,) * 3, (1.0,) * 3)


TRAIN, TEST = _toy(128, "train", 1), _toy(48, "test", 2)


class PlainCNN(nn.Module):
    """conv-pool-conv-pool-fc-fc, as a user writes it (no num_classes, no block interface)."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.MaxPool2d(2))
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU())
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv2(self.conv1(x))))


class Branch(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return self.fc2(F.gelu(self.fc1(self.ln(h))))


class ReferenceNet(nn.Module):
    """The reference's layout: blocks return the branch f(h); the model adds the skip."""

    def __init__(self, d: int = 12, num_blocks: int = 2, classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Linear(math.prod(SHAPE), d)
        self.blocks = nn.ModuleList(Branch(d) for _ in range(num_blocks))
        self.out_ln = nn.LayerNorm(d)
        self.out_head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out_head(self.out_ln(h))


def _cnn(seed: int = 0) -> PlainCNN:
    seed_everything(seed)
    return PlainCNN()


def _cols(history, prefix: str) -> list[str]:
    return [c for c in history.columns if c.startswith(prefix)]


# --------------------------------------------------------------------------------------------
# A plain CNN with BP and the layer rules
# --------------------------------------------------------------------------------------------

def test_plain_cnn_trains_with_bp_and_its_credit_is_bp():
    hist = train(_cnn(), build_rule("bp"), TRAIN, TEST, CFG, hidden=HIDDEN)
    assert (hist["status"] == "ok").all() and list(hist["epoch"]) == [0, 1, 2, 3]
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0] - 0.1
    assert hist["test_acc"].between(0, 1).all()
    assert _cols(hist, "cos_") == ["cos_0", "cos_1", "cos_2"]
    assert _cols(hist, "h_norm_") == ["h_norm_0", "h_norm_1", "h_norm_2"]
    cos = hist[_cols(hist, "cos_")].to_numpy()
    assert abs(cos - 1).max() < 1e-5
    assert hist.attrs["notes"] == [] and hist.attrs["hidden_states"][0] == "output of conv1"
    assert (hist["arch"] == "PlainCNN").all()


@pytest.mark.parametrize("name", ["layer_fa", "layer_dfa"])
def test_plain_cnn_trains_with_layer_rules_whose_update_is_not_bps(name):
    model, reference = _cnn(), _cnn()
    hist = train(model, build_rule(name), TRAIN, TEST, CFG, hidden=HIDDEN)
    train(reference, build_rule("bp"), TRAIN, TEST, CFG, hidden=HIDDEN)
    assert (hist["status"] == "ok").all() and hist["train_loss"].map(math.isfinite).all()
    assert len(feedback.local_layers(model)) == 4  # both convolutions and both linears converted
    # the credit at the lowest state goes through the rule's feedback, not W^T
    assert (hist["cos_0"] < 0.99).all(), list(hist["cos_0"])
    # same initialisation, same batches: a different update
    assert not torch.equal(model.conv1[0].weight, reference.conv1[0].weight)


def test_layer_dfa_on_a_plain_cnn_is_set_up_for_the_datasets_classes():
    five = _toy(64, "train", 1, classes=5), _toy(16, "test", 2, classes=5)
    seed_everything(0)
    model = PlainCNN(classes=5)
    train(model, build_rule("layer_dfa"), *five, TrainConfig(epochs=0, eval_batch=8), hidden=HIDDEN)
    layers = feedback.local_layers(model)
    drawn = [layer.B_dfa for _, layer in layers if layer.B_dfa is not None]
    assert drawn and all(b.shape[0] == 5 for b in drawn)


@pytest.mark.parametrize("name", ANY_MODEL_RULES)
def test_every_rule_that_needs_no_blocks_trains_a_plain_cnn(name):
    assert not RULES[name].needs_blocks and RULES[name].fits(PlainCNN())
    hist = train(_cnn(), build_rule(name), TRAIN, TEST, TrainConfig(epochs=1, batch_size=32, eval_batch=16),
                 hidden=HIDDEN)
    assert list(hist["status"]) == ["ok", "ok"] and hist["train_loss"].map(math.isfinite).all()
    assert hist[_cols(hist, "cos_")].notna().all().all()


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

def test_the_class_attribute_marks_exactly_the_rules_that_need_blocks():
    package = set(ANY_MODEL_RULES) | set(LACKS)
    assert {n for n in package if RULES[n].needs_blocks} == set(LACKS)


@pytest.mark.parametrize("name", sorted(LACKS))
def test_rules_that_need_blocks_refuse_a_plain_cnn_at_setup(name):
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        train(model, build_rule(name), TRAIN, TEST, CFG, hidden=HIDDEN)
    text = str(err.value)
    assert f"rule {name!r} cannot train PlainCNN" in text and LACKS[name] in text
    assert "Rules that train it: bp, frozen, layer_fa" in text
    assert "layer_dfa_block" not in text.split("Rules that train")[1]
    # refused before anything was touched, and by the rule's own setup too
    assert not feedback.local_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=f"rule {name!r} cannot train PlainCNN"):
        build_rule(name).setup(model, CLASSES, torch.Generator().manual_seed(0))


def test_package_models_keep_the_architecture_refusal():
    model = build_model("resnet", input_shape=SHAPE, num_classes=CLASSES, d=4, num_blocks=1)
    with pytest.raises(ValueError, match="rule 'layer_dfa_block' cannot train a 'resnet' model"):
        train(model, build_rule("layer_dfa_block"), TRAIN, TEST, CFG)


# --------------------------------------------------------------------------------------------
# Hidden states: found, or left out with a warning and a note
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bp", "layer_fa"])
def test_without_findable_hidden_states_training_goes_on_and_says_why(name):
    with pytest.warns(UserWarning, match=r"no per-layer columns .* hidden=\[") as record:
        hist = train(_cnn(), build_rule(name), TRAIN, TEST, CFG)
    assert not _cols(hist, "h_norm_") + _cols(hist, "g_norm_") + _cols(hist, "cos_")
    assert (hist["status"] == "ok").all() and hist["test_acc"].between(0, 1).all()
    if name == "bp":
        assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    notes = hist.attrs["notes"]
    assert len(notes) == 1 and "hidden=[" in notes[0] and "PlainCNN" in notes[0]
    assert str(record[0].message) == notes[0] and hist.attrs["hidden_states"] == []


def test_named_hidden_states_that_do_not_exist_are_an_error():
    with pytest.raises(ValueError, match="has no module 'nope'"):
        train(_cnn(), build_rule("bp"), TRAIN, TEST, CFG, hidden=["conv1", "nope"])
    with pytest.raises(ValueError, match="pool must be one of"):
        train(_cnn(), build_rule("bp"), TRAIN, TEST, CFG, hidden=HIDDEN, pool="max")


def test_reference_layout_gets_per_layer_columns_that_match_the_audit():
    seed_everything(0)
    model = ReferenceNet()
    hist = train(model, build_rule("bp"), TRAIN, TEST, CFG)
    assert _cols(hist, "h_norm_") == ["h_norm_0", "h_norm_1", "h_norm_2"]
    assert hist.attrs["hidden_states"][-1] == "input of out_ln" and hist.attrs["notes"] == []
    x, y = TEST.x[:CFG.eval_batch], TEST.y[:CFG.eval_batch]
    report = audit(model, x, y)
    last = hist.iloc[-1]
    assert [last[f"h_norm_{l}"] for l in range(3)] == pytest.approx(report.hidden_norms, rel=1e-6)
    assert [last[f"g_norm_{l}"] for l in range(3)] == pytest.approx(report.grad_norms, rel=1e-6)


def test_reference_layout_with_layer_fa_reads_its_feedback():
    seed_everything(0)
    hist = train(ReferenceNet(), build_rule("layer_fa"), TRAIN, TEST, CFG)
    assert (hist["cos_0"] < 0.99).all() and (hist["status"] == "ok").all()


# --------------------------------------------------------------------------------------------
# Data checks without num_classes
# --------------------------------------------------------------------------------------------

def test_data_checks_for_a_network_without_num_classes():
    four = _toy(32, "train", 1, classes=4), _toy(16, "test", 2, classes=4)
    with pytest.raises(ValueError, match="PlainCNN maps a batch to logits with 3 columns but the data "
                                         "has 4 classes"):
        train(_cnn(), build_rule("bp"), *four, CFG, hidden=HIDDEN)
    with pytest.raises(ValueError, match="test_ds has 4 classes but train_ds has 3"):
        train(_cnn(), build_rule("bp"), TRAIN, four[1], CFG, hidden=HIDDEN)

    class Pair(PlainCNN):
        def forward(self, x):
            return super().forward(x), x

    with pytest.raises(ValueError, match="must map a batch to logits"):
        train(Pair(), build_rule("bp"), TRAIN, TEST, CFG, hidden=HIDDEN)


# --------------------------------------------------------------------------------------------
# frozen_baseline: D3's baseline for any network
# --------------------------------------------------------------------------------------------

def _spy(monkeypatch) -> list:
    """Record the networks frozen_baseline trains (it calls the module's train)."""
    seen, real = [], train_module.train

    def spy(model, *args, **kw):
        seen.append(model)
        return real(model, *args, **kw)

    monkeypatch.setattr(train_module, "train", spy)
    return seen


def test_frozen_baseline_freezes_the_hidden_modules_and_trains_the_rest(monkeypatch):
    init = _cnn()
    at_init = copy.deepcopy(init.state_dict())
    seen = _spy(monkeypatch)
    acc = frozen_baseline(init, TRAIN, TEST, CFG, hidden=HIDDEN)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(v, init.state_dict()[k]) for k, v in at_init.items())  # untouched
    net = seen[0]
    assert net is not init
    after = net.state_dict()
    frozen = [k for k in at_init if k.startswith(("conv2.", "fc1."))]  # between h_0 and h_L
    trained = [k for k in at_init if k.startswith(("conv1.", "fc2.")) and "weight" in k]
    assert frozen and all(torch.equal(at_init[k], after[k]) for k in frozen)  # BN buffers too
    assert trained and all(not torch.equal(at_init[k], after[k]) for k in trained)
    assert not net.conv2[1].training  # BatchNorm pinned to eval even after model.train()
    # the same as training a copy with the frozen rule directly
    direct = train(copy.deepcopy(init), build_rule("frozen"), TRAIN, TEST, CFG, hidden=HIDDEN)
    assert acc == direct["test_acc"].iloc[-1]


def test_frozen_baseline_needs_hidden_states_it_cannot_find():
    with pytest.raises(ValueError, match=r"rule 'frozen' freezes the modules between h_0 and h_L.*hidden=\["):
        frozen_baseline(_cnn(), TRAIN, TEST, CFG)


def test_frozen_baseline_finds_the_blocks_of_the_reference_layout(monkeypatch):
    seed_everything(0)
    init = ReferenceNet()
    seen = _spy(monkeypatch)
    acc = frozen_baseline(init, TRAIN, TEST, CFG)
    net = seen[0]
    assert 0.0 <= acc <= 1.0
    assert all(not p.requires_grad for p in net.blocks.parameters())
    assert all(torch.equal(a, b) for a, b in zip(init.blocks.parameters(), net.blocks.parameters()))
    assert not torch.equal(init.embed.weight, net.embed.weight)


def test_frozen_baseline_on_the_package_resmlp_is_the_frozen_rule():
    seed_everything(0)
    init = build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, d=12, num_blocks=2)
    model = copy.deepcopy(init)
    seed_everything(1)
    acc = frozen_baseline(init, TRAIN, TEST, CFG)
    seed_everything(1)
    hist = train(model, build_rule("frozen"), TRAIN, TEST, CFG)
    assert acc == hist["test_acc"].iloc[-1] and 0.0 <= acc <= 1.0


def test_frozen_baseline_trains_a_converted_network_by_bp(monkeypatch):
    """A network already converted to a layer rule: its BP twin is trained, so the baseline is
    the unconverted network's (the same trained weights, not FA's)."""
    init = _cnn()
    converted = copy.deepcopy(init)
    convert(converted, "layer_fa", generator=torch.Generator().manual_seed(0))
    seen = _spy(monkeypatch)
    seed_everything(1)
    plain = frozen_baseline(init, TRAIN, TEST, CFG, hidden=HIDDEN)
    seed_everything(1)
    assert frozen_baseline(converted, TRAIN, TEST, CFG, hidden=HIDDEN) == plain
    assert not feedback.local_layers(seen[1]) and feedback.local_layers(converted)
    assert torch.equal(seen[0].conv1[0].weight, seen[1].conv1[0].weight)
