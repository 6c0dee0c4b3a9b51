"""The trainer: one loop for every rule, reproducible, divergence-safe, with per-layer diagnostics
that match their definitions; plus the qualitative reproduction of the DFA scale explosion."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study.config import seed_everything
from fa_study.data import Dataset, load_pair
from fa_study.methods import bp_gradients, build_method
from fa_study.models import build_model
from fa_study.train import TrainConfig, clip_block_gradients, evaluate, train

SHAPE = (3, 4, 4)
CLASSES = 4
TINY = {"resmlp": dict(d=12, num_blocks=2), "vit": dict(d=8, num_blocks=2, heads=2, patch_size=2),
        "resnet": dict(d=4, num_blocks=2)}


def _toy(n: int, split: str, seed: int) -> Dataset:
    """A learnable toy problem: labels of a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(CLASSES, math.prod(SHAPE), generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x.reshape(n, -1) @ teacher.t()).argmax(-1)
    return Dataset("toy", split, x, y, "toy-teacher", CLASSES, (0.0,) * 3, (1.0,) * 3)


TRAIN, TEST = _toy(96, "train", 1), _toy(40, "test", 2)
CFG = TrainConfig(epochs=2, batch_size=32, eval_batch=16, seed=5, log_every=2)
RULES = [("bp", {}), ("fa", {}), ("dfa", {}), ("dfa", {"penalty": 0.01}), ("frozen", {}),
         ("shallow", {}), ("layer", {"rule": "fa"}), ("layer", {"rule": "kolen_pollack"}),
         ("layer", {"rule": "weight_mirror"})]


def _run(name, opts, arch="resmlp", cfg=CFG, seed=0, **kw):
    method = build_method(name, **opts)
    seed_everything(seed)
    sizes = dict(TINY[arch])
    sizes.update(method.model_kwargs())
    model = build_model(arch, input_shape=SHAPE, num_classes=CLASSES, **sizes)
    return model, method, train(model, method, TRAIN, TEST, cfg, **kw)


@pytest.mark.parametrize("name,opts", RULES)
def test_same_seed_gives_identical_history(name, opts):
    _, _, first = _run(name, opts)
    _, _, second = _run(name, opts)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert list(first["epoch"]) == [0, 1, 2] and (first["status"] == "ok").all()
    assert first["train_loss"].notna().all() and first["test_acc"].between(0, 1).all()
    # a different seed changes the run (the assertion above is not vacuous)
    _, _, other = _run(name, opts, cfg=TrainConfig(**{**CFG.to_dict(), "seed": 6}))
    assert not other.drop(columns="seed").equals(first.drop(columns="seed"))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_conv_and_token_models_train_with_every_block_rule(arch):
    for name in ("bp", "fa", "dfa", "frozen"):
        _, _, hist = _run(name, {}, arch=arch, cfg=TrainConfig(epochs=1, batch_size=48, eval_batch=8))
        assert (hist["status"] == "ok").all(), (arch, name)
        assert np.isfinite(hist.filter(like="cos_").to_numpy(dtype=float)).all()


def test_history_columns_and_diagnostics_match_their_definitions():
    model, method, hist = _run("dfa", {"penalty": 0.01})
    L = model.num_blocks
    per_layer = [f"{p}_{l}" for l in range(L + 1) for p in ("h_norm", "g_norm", "cos")]
    for col in ["epoch", "train_loss", "train_acc", "test_acc", "status", "diverged_epoch", "method",
                "penalty", "arch", "d", "num_blocks", "data_source", "lr", "weight_decay", "cosine",
                "grad_clip", "batch_size", "epochs", "seed"] + per_layer:
        assert col in hist.columns, col
    assert (hist["data_source"] == "toy-teacher").all() and (hist["penalty"] == 0.01).all()
    assert hist["diverged_epoch"].isna().all()
    last = hist.iloc[-1]
    x, y = TEST.x[:CFG.eval_batch], TEST.y[:CFG.eval_batch]
    model.eval()
    hiddens, grads, _ = bp_gradients(model, x, y)
    credit = method.credit(model, x, y)
    for l in range(L + 1):
        assert last[f"h_norm_{l}"] == pytest.approx(hiddens[l].norm(dim=-1).median().item(), rel=1e-6)
        assert last[f"g_norm_{l}"] == pytest.approx(grads[l].norm(dim=-1).median().item(), rel=1e-6)
        cos = F.cosine_similarity(credit[l].double(), grads[l].double(), dim=-1, eps=1e-30).mean()
        assert last[f"cos_{l}"] == pytest.approx(cos.item(), abs=1e-9)
    assert last["test_acc"] == pytest.approx(evaluate(model, TEST.x, TEST.y)[1])
    # BP's credit is the BP gradient itself
    _, _, bp_hist = _run("bp", {})
    assert np.allclose(bp_hist.filter(like="cos_").to_numpy(dtype=float), 1.0, atol=1e-6)


def test_training_reduces_the_loss():
    _, _, hist = _run("bp", {}, cfg=TrainConfig(epochs=4, batch_size=16, eval_batch=16, lr=3e-3))
    assert hist["train_loss"].iloc[-1] < 0.7 * hist["train_loss"].iloc[0]
    assert hist["train_acc"].iloc[-1] > hist["train_acc"].iloc[0] + 0.3
    assert hist["test_acc"].iloc[-1] > hist["test_acc"].iloc[0]


@pytest.mark.parametrize("name", ["bp", "dfa", "fa"])
def test_diverging_learning_rate_gives_a_diverged_row(name):
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e6, eval_batch=8, log_every=1)
    _, _, hist = _run(name, {}, cfg=cfg)
    assert hist.attrs["status"] == "diverged"
    assert hist["status"].iloc[-1] == "diverged" and (hist["status"].iloc[:-1] == "ok").all()
    ep = int(hist["epoch"].iloc[-1])
    assert 1 <= ep < 4 or len(hist) <= 4  # stopped at the diverged epoch
    assert (hist["diverged_epoch"] == ep).all()
    assert math.isnan(hist["test_acc"].iloc[-1])
    assert not np.isfinite(hist["train_loss"].iloc[-1])
    assert hist["test_acc"].iloc[:-1].notna().all()


def test_frozen_baseline_leaves_blocks_bit_identical():
    seed_everything(0)
    model = build_model("resnet", input_shape=SHAPE, num_classes=CLASSES, **TINY["resnet"])
    before = {k: v.clone() for k, v in model.blocks.state_dict().items()}  # weights and BN buffers
    embed_before = [p.clone() for p in model.embed_parameters()]
    hist = train(model, build_method("frozen"), TRAIN, TEST, TrainConfig(epochs=2, batch_size=16))
    after = model.blocks.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(embed_before, model.embed_parameters()))
    assert (hist["status"] == "ok").all()
    model.train()
    assert all(not m.training for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d))


def test_callback_progress_and_cosine_schedule():
    records = []
    cfg = TrainConfig(epochs=3, batch_size=32, eval_batch=8, lr=1e-2, cosine=True)
    _run("dfa", {}, cfg=cfg, progress=True, callback=lambda step, rec: records.append((step, rec)),
         callback_every=3)
    assert [s for s, _ in records] == [3, 6, 9]  # 3 steps per epoch
    assert all(r["step"] == s for s, r in records)
    assert {"epoch", "train_loss", "train_acc", "lr"} <= set(records[0][1])
    lrs = [r["lr"] for _, r in records]
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    assert lrs == pytest.approx(expected)


def test_clip_block_gradients_clips_each_block_alone():
    blocks = [nn.Linear(3, 3), nn.Linear(3, 3)]
    head = nn.Linear(3, 2)
    for m, scale in zip(blocks + [head], (10.0, 0.01, 10.0)):
        for p in m.parameters():
            p.grad = torch.full_like(p, scale)
    expected = [[p.grad.clone() for p in m.parameters()] for m in blocks + [head]]
    groups = [list(b.parameters()) for b in blocks]
    clip_block_gradients(groups, 1.0)
    norm0 = torch.cat([p.grad.flatten() for p in blocks[0].parameters()]).norm()
    assert norm0 == pytest.approx(1.0, rel=1e-5)  # clipped to the bound
    scale = 1.0 / torch.cat([g.flatten() for g in expected[0]]).norm()
    for p, g in zip(blocks[0].parameters(), expected[0]):  # same direction, shorter
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-5, atol=0)
    assert all(torch.equal(p.grad, g) for p, g in zip(blocks[1].parameters(), expected[1]))  # small: untouched
    assert all(torch.equal(p.grad, g) for p, g in zip(head.parameters(), expected[2]))  # not a block


def test_grad_clip_changes_training_only_when_set():
    _, _, plain = _run("dfa", {})
    _, _, clipped = _run("dfa", {}, cfg=TrainConfig(**{**CFG.to_dict(), "grad_clip": 1e-3}))
    assert not np.allclose(plain["h_norm_2"].iloc[-1], clipped["h_norm_2"].iloc[-1])


def test_bad_config_and_misuse():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    model = build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, **TINY["resmlp"])
    with pytest.raises(ValueError, match="TrainConfig"):
        train(model, build_method("bp"), TRAIN, TEST, {"epochs": 1})
    with pytest.raises(ValueError, match="callback_every"):
        train(model, build_method("bp"), TRAIN, TEST, CFG, callback=print, callback_every=0)


# --------------------------------------------------------------------------------------------
# Qualitative reproduction (003 penalty sweep / 004): DFA on the terminal-LN ResidualMLP blows up
# the residual stream; the residual-branch penalty contains it.
# --------------------------------------------------------------------------------------------

QUICK = TrainConfig(epochs=3, batch_size=128, lr=7e-3, eval_batch=128, seed=0)
# 3 epochs of 20 steps on 2,560 synthetic-CIFAR images (the sign-flip stand-in of fa_study.data).
# Measured for seeds 0-4 when this was written: ||h_L|| growth over training BP 13-18x, vanilla
# DFA 710-1080x (DFA/BP 43-77), DFA + penalty 82-96x (penalty/BP 5.0-7.4). The window is real
# but finite: with more steps the penalised stream keeps growing slowly (at lr=3e-3, 6 epochs:
# penalty/BP 13-15 while DFA/BP 116-176), i.e. the penalty contains the explosion (vanilla/penalty
# ~10x and widening) without holding the stream at BP's scale.


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])  # seeds 0-4 all pass (see above); one keeps the test short
def test_dfa_explodes_the_residual_stream_and_the_penalty_contains_it(seed):
    train_ds, test_ds = load_pair("cifar10", n_train=2560, n_test=256, device="cpu", verbose=False)
    cfg = TrainConfig(**{**QUICK.to_dict(), "seed": seed})
    growth = {}
    for label, name, opts in (("bp", "bp", {}), ("dfa", "dfa", {}), ("penalty", "dfa", {"penalty": 1e-2})):
        seed_everything(seed)
        model = build_model("resmlp", input_shape=train_ds.x.shape[1:], num_classes=10)  # d=256, L=4
        hist = train(model, build_method(name, **opts), train_ds, test_ds, cfg)
        assert (hist["status"] == "ok").all()
        growth[label] = hist["h_norm_4"].iloc[-1] / hist["h_norm_4"].iloc[0]
    assert growth["dfa"] >= 10 * growth["bp"], growth
    assert growth["penalty"] <= 10 * growth["bp"], growth
    assert growth["penalty"] < growth["dfa"] / 4, growth
