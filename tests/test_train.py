"""The trainer: one loop for every rule, reproducible, with an explicit blow-up criterion,
per-layer diagnostics that match their definitions (the BP reference of a converted model is its
unconverted network's), SGD with momentum, probes, clear errors before training; plus the
qualitative reproduction of the DFA scale explosion."""
import copy
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fa_study import feedback
from fa_study.config import seed_everything
from fa_study.data import Dataset, load_pair
from fa_study.models import build_model
from fa_study.diagnostics import BlockStates, bp_reference, credit_cosines, feedback_angles
from fa_study.rules import build_rule
from fa_study.train import TrainConfig, clip_block_gradients, evaluate, train

SHAPE = (3, 4, 4)
CLASSES = 4
TINY = {"resmlp": dict(d=12, num_blocks=2), "vit": dict(d=8, num_blocks=2, heads=2, patch_size=2),
        "resnet": dict(d=4, num_blocks=2)}


def _toy(n: int, split: str, seed: int, classes: int = CLASSES, dtype=torch.float32) -> Dataset:
    """A learnable toy problem: labels of a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(classes, math.prod(SHAPE), generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x.reshape(n, -1) @ teacher.t()).argmax(-1)
    return Dataset("toy", split, x.to(dtype), y, "toy-teacher", classes, (0.0,) * 3, (1.0,) * 3)


TRAIN, TEST = _toy(96, "train", 1), _toy(40, "test", 2)
CFG = TrainConfig(epochs=2, batch_size=32, eval_batch=16, seed=5, log_every=2)
RULES = [("bp", {}), ("fa", {}), ("dfa", {}), ("dfa", {"penalty": 0.01}), ("frozen", {}),
         ("shallow", {}), ("oracle", {}), ("layer_fa", {}), ("kolen_pollack", {}),
         ("weight_mirror", {}), ("layer_dfa", {}), ("brsf", {})]


def _build(name, opts=None, arch="resmlp", seed=0, **kw):
    rule = build_rule(name, **(opts or {}))
    seed_everything(seed)
    sizes = dict(TINY[arch])
    sizes.update(kw)
    sizes.update(rule.model_kwargs())
    return build_model(arch, input_shape=SHAPE, num_classes=CLASSES, **sizes), rule


def _run(name, opts=None, arch="resmlp", cfg=CFG, seed=0, train_ds=TRAIN, test_ds=TEST, **kw):
    model, rule = _build(name, opts, arch, seed)
    return model, rule, train(model, rule, train_ds, test_ds, cfg, **kw)


def _cfg(**changes) -> TrainConfig:
    return TrainConfig(**{**CFG.to_dict(), **changes})


@pytest.mark.parametrize("name,opts", RULES)
def test_same_seed_gives_identical_history(name, opts):
    _, _, first = _run(name, opts)
    _, _, second = _run(name, opts)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert list(first["epoch"]) == [0, 1, 2] and (first["status"] == "ok").all()
    assert first["train_loss"].notna().all() and first["test_acc"].between(0, 1).all()
    # a different seed changes the run (the assertion above is not vacuous)
    _, _, other = _run(name, opts, cfg=_cfg(seed=6))
    assert not other.drop(columns="seed").equals(first.drop(columns="seed"))


def test_sgd_runs_are_reproducible_too():
    cfg = _cfg(optimizer="sgd", lr=0.05, schedule="constant")
    _, _, first = _run("dfa", cfg=cfg)
    _, _, second = _run("dfa", cfg=cfg)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    _, _, adamw = _run("dfa")
    assert not np.allclose(first["h_norm_2"], adamw["h_norm_2"])


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_conv_and_token_models_train_with_every_block_rule(arch):
    for name in ("bp", "fa", "dfa", "frozen"):
        _, _, hist = _run(name, arch=arch, cfg=TrainConfig(epochs=1, batch_size=48, eval_batch=8))
        assert (hist["status"] == "ok").all(), (arch, name)
        assert np.isfinite(hist.filter(like="cos_").to_numpy(dtype=float)).all()


def test_history_columns_and_diagnostics_match_their_definitions():
    model, rule, hist = _run("dfa", {"penalty": 0.01})
    L = model.num_blocks
    per_layer = [f"{p}_{l}" for l in range(L + 1) for p in ("h_norm", "g_norm", "cos")]
    for col in ["epoch", "train_loss", "train_acc", "test_acc", "status", "diverged_epoch", "diverged_reason",
                "rule", "penalty", "arch", "d", "num_blocks", "dataset", "data_source", "optimizer", "lr",
                "momentum", "weight_decay", "schedule", "grad_clip", "batch_size", "epochs", "seed",
                "max_loss", "log_every", "feedback_quality"] + per_layer:
        assert col in hist.columns, col
    assert (hist["rule"] == "dfa").all() and (hist["optimizer"] == "adamw").all()
    assert (hist["data_source"] == "toy-teacher").all() and (hist["penalty"] == 0.01).all()
    assert hist["diverged_epoch"].isna().all() and (hist["diverged_reason"] == "").all()
    assert hist.attrs["status"] == "ok" and len(hist.attrs["epoch_seconds"]) == 3
    assert hist.attrs["probes"].empty  # no probe given
    last = hist.iloc[-1]
    x, y = TEST.x[:CFG.eval_batch], TEST.y[:CFG.eval_batch]
    model.eval()
    hiddens, grads, _ = bp_reference(model, x, y)
    credit = rule.credit(model, x, y)
    for l in range(L + 1):
        assert last[f"h_norm_{l}"] == pytest.approx(hiddens[l].norm(dim=-1).median().item(), rel=1e-6)
        assert last[f"g_norm_{l}"] == pytest.approx(grads[l].norm(dim=-1).median().item(), rel=1e-6)
        cos = F.cosine_similarity(credit[l].double(), grads[l].double(), dim=-1, eps=1e-30).mean()
        assert last[f"cos_{l}"] == pytest.approx(cos.item(), abs=1e-9)
    assert last["test_acc"] == pytest.approx(evaluate(model, TEST.x, TEST.y)[1])
    # BP's credit is the BP gradient itself
    _, _, bp_hist = _run("bp")
    assert np.allclose(bp_hist.filter(like="cos_").to_numpy(dtype=float), 1.0, atol=1e-6)


def test_vit_cosines_are_read_summed_over_positions():
    model, rule, hist = _run("fa", arch="vit", cfg=_cfg(eval_batch=8))
    x, y = TEST.x[:8], TEST.y[:8]
    from fa_study.diagnostics import eval_mode

    with eval_mode(model):
        _, grads, _ = bp_reference(model, x, y)
        cos = credit_cosines(BlockStates(model), rule.credit(model, x, y), grads)
    assert [hist.iloc[-1][f"cos_{l}"] for l in range(3)] == pytest.approx(cos, abs=1e-9)
    assert hist.iloc[-1]["cos_2"] == pytest.approx(1.0, abs=1e-6)  # FA's top credit: the head's BP


def test_training_reduces_the_loss():
    _, _, hist = _run("bp", cfg=TrainConfig(epochs=4, batch_size=16, eval_batch=16, lr=3e-3))
    assert hist["train_loss"].iloc[-1] < 0.7 * hist["train_loss"].iloc[0]
    assert hist["train_acc"].iloc[-1] > hist["train_acc"].iloc[0] + 0.3
    assert hist["test_acc"].iloc[-1] > hist["test_acc"].iloc[0]


# --------------------------------------------------------------------------------------------
# The optimizer and the schedule
# --------------------------------------------------------------------------------------------

def test_sgd_with_momentum_and_constant_schedule_is_the_hand_written_update():
    """Two full-batch steps (one per epoch): buf = mu buf + g + wd p; p -= lr buf."""
    lr, mu, wd = 0.1, 0.9, 0.01
    data = _toy(32, "train", 3, dtype=torch.float64)
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=lr, momentum=mu, weight_decay=wd,
                      schedule="constant", eval_batch=8)
    model, rule = _build("bp")
    model = model.double()
    by_hand = copy.deepcopy(model)
    train(model, rule, data, _toy(8, "test", 4, dtype=torch.float64), cfg)

    params = list(by_hand.parameters())
    buf = None
    for _ in range(2):
        grads = torch.autograd.grad(F.cross_entropy(by_hand(data.x), data.y), params)
        with torch.no_grad():
            d_p = [g + wd * p for g, p in zip(grads, params)]
            buf = d_p if buf is None else [mu * b + d for b, d in zip(buf, d_p)]
            for p, b in zip(params, buf):
                p.sub_(lr * b)
    for (name, p), q in zip(model.named_parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    # momentum matters: without it the second step differs
    plain, rule = _build("bp")
    plain = plain.double()
    train(plain, rule, data, _toy(8, "test", 4, dtype=torch.float64),
          TrainConfig(**{**cfg.to_dict(), "momentum": 0.0}))
    assert not torch.allclose(plain.out_head.weight, model.out_head.weight)


def test_callback_progress_and_schedules():
    for schedule in ("cosine", "constant"):
        records = []
        cfg = TrainConfig(epochs=3, batch_size=32, eval_batch=8, lr=1e-2, schedule=schedule)
        _run("dfa", cfg=cfg, progress=True, callback=lambda step, rec: records.append((step, rec)),
             callback_every=3)
        assert [s for s, _ in records] == [3, 6, 9]  # 3 steps per epoch
        assert all(r["step"] == s for s, r in records)
        assert {"epoch", "train_loss", "train_acc", "lr"} <= set(records[0][1])
        assert [r["epoch"] for _, r in records] == [1, 2, 3]
        lrs = [r["lr"] for _, r in records]
        if schedule == "cosine":
            expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
        else:
            expected = [1e-2] * 3
        assert lrs == pytest.approx(expected), schedule


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
    # small: untouched
    assert all(torch.equal(p.grad, g) for p, g in zip(blocks[1].parameters(), expected[1]))
    assert all(torch.equal(p.grad, g) for p, g in zip(head.parameters(), expected[2]))  # not a block


def test_grad_clip_changes_training_only_when_set():
    _, _, plain = _run("dfa")
    _, _, clipped = _run("dfa", cfg=_cfg(grad_clip=1e-3))
    assert not np.allclose(plain["h_norm_2"].iloc[-1], clipped["h_norm_2"].iloc[-1])


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

def test_probes_run_at_step_0_every_n_steps_and_the_last_with_the_mean_loss_since_the_last_probe():
    data = _toy(100, "train", 1)  # 4 batches of 32, 32, 32, 4 per epoch
    model, rule = _build("dfa")
    losses = []
    fill = rule.fill_grads

    def recording(m, x, y):
        loss, logits = fill(m, x, y)
        losses.append((float(loss), y.shape[0]))
        return loss, logits

    rule.fill_grads = recording
    seen = []

    def probe(step, m, r):
        assert m is model and r is rule
        seen.append(step)
        return {"w_norm": float(m.out_head.weight.detach().norm()), "steps_seen": len(losses)}

    cfg = TrainConfig(epochs=2, batch_size=32, eval_batch=8, seed=1)
    hist = train(model, rule, data, TEST, cfg, probe=probe, probe_every=3)
    probes = hist.attrs["probes"]
    assert seen == [0, 3, 6, 8] and list(probes["step"]) == [0, 3, 6, 8]
    assert list(probes["epoch"]) == pytest.approx([0.0, 0.75, 1.5, 2.0])
    assert list(probes["steps_seen"]) == [0, 3, 6, 8]  # called right after the step
    assert math.isnan(probes["train_loss"].iloc[0])
    sizes = [n for _, n in losses]
    assert sizes == [32, 32, 32, 4] * 2
    for row, (lo, hi) in zip(probes.iloc[1:].itertuples(), [(0, 3), (3, 6), (6, 8)]):
        chunk = losses[lo:hi]
        mean = sum(v * n for v, n in chunk) / sum(n for _, n in chunk)  # weighted by batch size
        assert row.train_loss == pytest.approx(mean, rel=1e-6)
    assert probes["w_norm"].iloc[-1] == pytest.approx(float(model.out_head.weight.detach().norm()))
    with pytest.raises(ValueError, match="probe_every must be an integer >= 1, got 0"):
        train(model, rule, data, TEST, cfg, probe=probe)


def test_probe_every_larger_than_the_run_gives_the_first_and_last_step():
    _, _, hist = _run("bp", probe=lambda step, m, r: None, probe_every=1000)
    assert list(hist.attrs["probes"]["step"]) == [0, 6]


# --------------------------------------------------------------------------------------------
# The blow-up criterion
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bp", "dfa", "fa"])
def test_diverging_learning_rate_gives_a_diverged_row(name):
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e6, eval_batch=8, log_every=1)
    _, _, hist = _run(name, cfg=cfg)
    assert hist.attrs["status"] == "diverged"
    assert hist["status"].iloc[-1] == "diverged" and (hist["status"].iloc[:-1] == "ok").all()
    ep = int(hist["epoch"].iloc[-1])
    assert 1 <= ep <= 4
    assert (hist["diverged_epoch"] == ep).all()
    reason = hist["diverged_reason"].iloc[0]
    assert (hist["diverged_reason"] == reason).all() and reason
    assert math.isnan(hist["test_acc"].iloc[-1])
    loss = hist["train_loss"].iloc[-1]
    assert not np.isfinite(loss) or loss > cfg.max_loss
    assert hist["test_acc"].iloc[:-1].notna().all()


def _resnet_run(lr, **cfg_kw):
    cfg = TrainConfig(epochs=3, batch_size=16, lr=lr, eval_batch=8, log_every=1, **cfg_kw)
    return _run("bp", arch="resnet", cfg=cfg)[2]


def test_a_finite_loss_above_max_loss_is_a_blow_up():
    """A ResNet at an absurd learning rate: its loss climbs by decades yet stays finite for a
    dozen steps; the criterion stops it at the first check above max_loss (default 1e3)."""
    hist = _resnet_run(1e3)
    assert hist.attrs["status"] == "diverged" and list(hist["status"]) == ["ok", "diverged"]
    reason = hist["diverged_reason"].iloc[-1]
    assert reason.startswith("training loss ") and reason.endswith("above max_loss=1000")
    loss = hist["train_loss"].iloc[-1]
    assert math.isfinite(loss) and loss > 1e3
    assert int(hist["diverged_epoch"].iloc[0]) == 1
    # without the criterion (max_loss out of reach) the same run goes on until the loss is NaN
    late = _resnet_run(1e3, max_loss=1e30)
    assert late.attrs["status"] == "diverged"
    assert late["diverged_reason"].iloc[-1] == "training loss not finite (nan)"


def test_max_loss_is_configurable():
    """lr=100: the loss leaps above 1e4 for a step, then recovers; max_loss decides."""
    strict = _resnet_run(100.0)
    assert strict.attrs["status"] == "diverged"
    assert "above max_loss=1000" in strict["diverged_reason"].iloc[-1]
    lenient = _resnet_run(100.0, max_loss=1e6)
    assert lenient.attrs["status"] == "ok" and (lenient["status"] == "ok").all()
    assert (lenient["diverged_reason"] == "").all() and lenient["diverged_epoch"].isna().all()
    assert (lenient["max_loss"] == 1e6).all() and (strict["max_loss"] == 1e3).all()
    with pytest.raises(ValueError, match="TrainConfig.max_loss must be a finite number > 0, got 0"):
        TrainConfig(max_loss=0)


def test_a_non_finite_loss_is_a_blow_up():
    model, rule = _build("bp")
    with torch.no_grad():
        model.out_head.bias[0] = float("nan")  # a poisoned weight: every batch's loss is NaN
    hist = train(model, rule, TRAIN, TEST, _cfg(log_every=1, max_loss=1e30))
    assert hist.attrs["status"] == "diverged"
    assert hist["diverged_reason"].iloc[-1] == "training loss not finite (nan)"
    assert math.isnan(hist["train_loss"].iloc[-1]) and int(hist["diverged_epoch"].iloc[0]) == 1


def test_blow_up_fires_only_above_max_loss_or_on_a_non_finite_loss():
    """The criterion is 'exceeds max_loss': a mean loss exactly at max_loss is not a blow-up."""
    from fa_study.train import blow_up

    assert blow_up(1e3, 1e3) == "" and blow_up(2.3, 1e3) == ""
    assert blow_up(1e3 * (1 + 1e-9), 1e3).startswith("training loss ")
    assert blow_up(math.inf, 1e3) == "training loss not finite (inf)"


@pytest.mark.parametrize("key", ["h_norm_1", "g_norm_2"])
def test_non_finite_eval_norms_are_a_blow_up(monkeypatch, key):
    """A finite training loss but an overflowed hidden state or BP gradient on the eval batch:
    the run is marked diverged at that epoch, naming the norm."""
    from fa_study import train as train_module

    real = train_module.layer_diagnostics
    calls = []

    def poisoned(model, rule, x, y, **kw):
        out = real(model, rule, x, y, **kw)
        calls.append(1)
        if len(calls) > 1:  # after the first training epoch (epoch 0 is the initial model)
            out[key] = math.inf
        return out

    monkeypatch.setattr(train_module, "layer_diagnostics", poisoned)
    _, _, hist = _run("bp")
    assert hist.attrs["status"] == "diverged" and list(hist["status"]) == ["ok", "diverged"]
    assert hist["diverged_reason"].iloc[-1] == f"non-finite {key} on the eval batch"
    assert int(hist["diverged_epoch"].iloc[0]) == 1


# --------------------------------------------------------------------------------------------
# Rule columns: state() and feedback_quality
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts,cols", [
    ("fa", {}, ["fb_align_0", "fb_align_1"]),
    ("dfa", {}, ["fb_align_0", "fb_align_1", "fb_align_2"]),
    ("grape_fa", {"n_probe": 8}, ["fb_align_0", "fb_align_1"]),
    ("stiefel_dfa", {"rank": 3}, ["fb_align_0", "rho_0", "rho_2", "alpha_1"]),
])
def test_feedback_quality_adds_the_rules_columns(name, opts, cols):
    model, rule, hist = _run(name, opts, cfg=_cfg(feedback_quality=True))
    assert set(cols) <= set(hist.columns) and hist[cols].notna().all().all()
    x, y = TEST.x[:CFG.eval_batch], TEST.y[:CFG.eval_batch]
    now = rule.feedback_quality(model, x, y)
    assert set(now) <= set(hist.columns)
    for key, value in now.items():
        assert hist[key].iloc[-1] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    _, _, without = _run(name, opts)
    assert not set(cols) & set(without.columns) - {"alpha_1"}  # alpha_l: stiefel_dfa's state() too


@pytest.mark.parametrize("name,opts,cols", [
    ("grape_fa", {"n_probe": 8}, ["probe_cos_0", "probe_cos_1"]),
    ("stiefel_dfa", {"rank": 3}, ["alpha_0", "alpha_2", "rho_hat_0", "rho_hat_2"]),
])
def test_rule_state_is_a_column_of_every_epoch(name, opts, cols):
    _, rule, hist = _run(name, opts)
    assert set(cols) <= set(hist.columns)
    assert hist[cols].iloc[1:].notna().all().all()
    for key, value in rule.state().items():
        assert hist[key].iloc[-1] == pytest.approx(value)
    assert not {"probe_cos_0", "alpha_0"} & set(_run("fa")[2].columns)


# --------------------------------------------------------------------------------------------
# Layer rules: the BP reference of a converted model, and the feedback's own stream
# --------------------------------------------------------------------------------------------

def _autograd_g_norms(model, x, y):
    h = model.embed(x)
    hs = [h]
    for l in range(model.num_blocks):
        h = model.step(l, h)
        hs.append(h)
    if feedback.local_layers(model):
        feedback.capture_output_error(model, model.readout(h))
    grads = torch.autograd.grad(F.cross_entropy(model.readout(h), y), hs)
    return [float(g.norm(dim=-1).median()) for g in grads]


@pytest.mark.parametrize("name", ["layer_fa", "kolen_pollack"])
def test_history_g_norm_of_a_converted_model_is_its_unconverted_networks_gradient(name):
    """train.layer_diagnostics must read the gradient of the trained network as plain BP
    computes it: the history's g_norm_l equals autograd of an unconverted copy holding the same
    weights, and not the converted model's own backward (the rule's signal)."""
    model, rule = _build(name)
    plain = copy.deepcopy(model)
    hist = train(model, rule, TRAIN, TEST, CFG)
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state, strict=True)
    assert not feedback.local_layers(plain) and feedback.local_layers(model)
    x, y = TEST.x[:CFG.eval_batch], TEST.y[:CFG.eval_batch]
    ref = _autograd_g_norms(plain.eval(), x, y)
    L = model.num_blocks
    assert [hist[f"g_norm_{l}"].iloc[-1] for l in range(L + 1)] == pytest.approx(ref, rel=1e-5)
    # the test has teeth: the converted model's own backward gives other norms (by 100x the
    # tolerance above), and its credit is not parallel to the reference
    own = _autograd_g_norms(model.eval(), x, y)
    assert max(abs(o / r - 1) for o, r in zip(own, ref)) > 1e-3
    assert hist["cos_0"].iloc[-1] < 0.99


@pytest.mark.parametrize("seed", [0, 5])
def test_the_feedback_stream_is_independent_of_the_weights_stream(seed):
    """The trainer draws B from config.stream_generator(seed, "feedback"), not from a generator
    seeded like the weights: a random FA B is ~90 degrees from W at initialisation (the shared
    stream gives ~110 degrees at the embedding)."""
    seed_everything(seed)
    model = build_model("resmlp", input_shape=SHAPE, num_classes=CLASSES, d=64, num_blocks=2)
    train(model, build_rule("layer_fa"), TRAIN, TEST, TrainConfig(epochs=0, seed=seed, eval_batch=8))
    angles = feedback_angles(model)["angle_BW_deg"]
    assert len(angles) == 6 and (angles - 90).abs().max() < 8, list(angles)


# --------------------------------------------------------------------------------------------
# Baselines and misuse
# --------------------------------------------------------------------------------------------

def test_frozen_baseline_leaves_blocks_bit_identical():
    seed_everything(0)
    model = build_model("resnet", input_shape=SHAPE, num_classes=CLASSES, **TINY["resnet"])
    before = {k: v.clone() for k, v in model.blocks.state_dict().items()}  # weights and BN buffers
    embed_before = [p.clone() for p in model.embed_parameters()]
    hist = train(model, build_rule("frozen"), TRAIN, TEST, TrainConfig(epochs=2, batch_size=16))
    after = model.blocks.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(embed_before, model.embed_parameters()))
    assert (hist["status"] == "ok").all()
    model.train()
    assert all(not m.training for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d))


def test_bad_config_names_the_parameter_the_value_and_what_is_allowed():
    for kw, msg in [
        ({"epochs": -1}, "TrainConfig.epochs must be an integer >= 0, got -1"),
        ({"lr": 0}, "TrainConfig.lr must be a finite number > 0, got 0"),
        ({"lr": 0.0}, "TrainConfig.lr must be a finite number > 0, got 0.0"),
        ({"lr": math.inf}, "TrainConfig.lr must be a finite number > 0, got inf"),
        ({"lr": math.nan}, "TrainConfig.lr must be a finite number > 0, got nan"),
        ({"lr": "1e-3"}, "TrainConfig.lr must be a finite number > 0, got '1e-3'"),
        ({"optimizer": "adam"}, "unknown TrainConfig.optimizer 'adam'; allowed values: 'adamw', 'sgd'"),
        ({"schedule": "step"}, "unknown TrainConfig.schedule 'step'; allowed values: 'cosine', 'constant'"),
        ({"momentum": 1.0}, "TrainConfig.momentum must be a finite number >= 0 and < 1, got 1.0"),
        ({"grad_clip": 0.0}, "TrainConfig.grad_clip must be a finite number > 0 or None"),
        ({"batch_size": 0}, "TrainConfig.batch_size must be an integer >= 1, got 0"),
        ({"max_loss": math.inf}, "TrainConfig.max_loss must be a finite number > 0, got inf"),
        ({"feedback_quality": 1}, "TrainConfig.feedback_quality must be True or False, got 1"),
    ]:
        with pytest.raises(ValueError) as err:
            TrainConfig(**kw)
        assert str(err.value).startswith(msg), (kw, str(err.value))


def _refused(model, rule, train_ds, test_ds, cfg, match, **kw):
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        train(model, rule, train_ds, test_ds, cfg, **kw)
    assert not rule.ready  # refused before the rule was set up
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # and before any step


def test_bad_data_and_misuse_are_refused_before_training():
    model, rule = _build("dfa")
    out_of_range = _toy(96, "train", 1)
    out_of_range.y[3] = 9  # Dataset checks its labels at construction; a later edit is caught here
    _refused(model, rule, out_of_range, TEST, CFG,
             r"train_ds has labels in \[0, 9\], outside \[0, 4\) \(the model's num_classes\)")
    negative = _toy(40, "test", 2)
    negative.y[0] = -1
    _refused(model, rule, TRAIN, negative, CFG, r"test_ds has labels in \[-1, 3\], outside \[0, 4\)")
    five = _toy(96, "train", 1, classes=5)
    _refused(model, rule, five, TEST, CFG,
             "train_ds has 5 classes but the model was built for num_classes=4; build it with num_classes=5")
    empty = Dataset("toy", "train", TRAIN.x[:0], TRAIN.y[:0], "toy-teacher", CLASSES, (0.0,) * 3, (1.0,) * 3)
    _refused(model, rule, empty, TEST, CFG, r"train_ds is empty \(0 samples\)")
    _refused(model, rule, TRAIN, TEST, CFG, "probe_every must be an integer >= 1, got 0",
             probe=lambda *a: {})
    _refused(model, rule, TRAIN, TEST, CFG, "callback_every must be an integer >= 1, got 0",
             callback=print, callback_every=0)
    with pytest.raises(ValueError, match="cfg must be a TrainConfig, got dict"):
        train(model, rule, TRAIN, TEST, {"epochs": 1})
    with pytest.raises(ValueError, match="rule must be a fa_study.rules.Method"):
        train(model, "dfa", TRAIN, TEST, CFG)
    # the same model and rule then train normally
    assert (train(model, rule, TRAIN, TEST, CFG)["status"] == "ok").all()


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
        hist = train(model, build_rule(name, **opts), train_ds, test_ds, cfg)
        assert (hist["status"] == "ok").all()
        growth[label] = hist["h_norm_4"].iloc[-1] / hist["h_norm_4"].iloc[0]
    assert growth["dfa"] >= 10 * growth["bp"], growth
    assert growth["penalty"] <= 10 * growth["bp"], growth
    assert growth["penalty"] < growth["dfa"] / 4, growth


# ---------------------------------------------------------------------------- determinism

def test_train_is_bitwise_reproducible_at_a_fixed_thread_count():
    """Holds: a direct ``train()`` call repeated at the same torch thread count gives the same
    history, bit for bit. Documented, not asserted: at 1 and at 2 threads the histories agree
    only to rounding (on the 2-core CI machine the training loss differed in the 7th digit),
    because a matmul's or a reduction's sums are split, hence added, differently by thread."""
    from fa_study.config import get_device
    from fa_study.experiments.audit import audit_spec

    spec = audit_spec("dfa", "resmlp", 0, d=32, num_blocks=2, epochs=1, n_train=256, n_test=128)
    train_ds, test_ds = spec.data.load(get_device())

    def history(threads: int) -> pd.DataFrame:
        torch.set_num_threads(threads)
        seed_everything(spec.seed)
        model = spec.model.build(train_ds.x.shape[1:], train_ds.num_classes)
        return train(model, spec.rule_class(**dict(spec.options)), train_ds, test_ds, spec.train)

    before = torch.get_num_threads()
    try:
        one, one_again, two = history(1), history(1), history(2)
    finally:
        torch.set_num_threads(before)
    pd.testing.assert_frame_equal(one, one_again, check_exact=True)
    # 1 vs 2 threads: the same run up to rounding, not necessarily the same bits
    pd.testing.assert_frame_equal(one, two, check_exact=False, rtol=1e-4, atol=1e-6)


# ---- the optimizer step and the data checks of the fast path --------------------------------

def _step_both(model, opt, twin, ref, steps: int) -> None:
    """``steps`` optimizer steps of ``model`` (``opt``) and ``twin`` (``ref``) on the same random
    gradients."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_merged_parameter_groups_step_exactly_as_the_rules_groups(optimizer):
    """make_optimizer steps the rule's groups of equal settings as one group: every parameter
    gets bit for bit the update the per-block groups give (reference: the torch optimizer over
    the rule's groups as they are, fused), and a group with its own settings stays apart."""
    from fa_study.train import make_optimizer, merge_groups

    cfg = _cfg(optimizer=optimizer, lr=1e-2, weight_decay=0.1)
    model, rule = _build("dfa")
    groups = rule.param_groups(model)
    twin = copy.deepcopy(model)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    make = partial(torch.optim.SGD, momentum=cfg.momentum) if optimizer == "sgd" else torch.optim.AdamW
    ref = make(rule.param_groups(twin), fused=True, **kw)
    opt = make_optimizer(groups, cfg)
    assert len(opt.param_groups) == 1 and len(ref.param_groups) == len(groups) > 1
    _step_both(model, opt, twin, ref, steps=3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    own = [{"params": groups[0]["params"], "name": "embed", "clip": False, "lr": 0.5}] + groups[1:]
    merged = merge_groups(own)
    assert [len(g["params"]) for g in merged] == [len(groups[0]["params"]),
                                                  sum(len(g["params"]) for g in groups[1:])]
    assert merged[0]["lr"] == 0.5 and "lr" not in merged[1]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_step_is_torchs_plain_update_up_to_rounding(optimizer):
    """The optimizer make_optimizer builds (a fused kernel on the CPU) moves the parameters as
    torch's per-tensor loop of the same optimizer does, to float rounding, over 20 steps."""
    from fa_study.train import make_optimizer

    cfg = _cfg(optimizer=optimizer, lr=1e-2, weight_decay=0.1)
    model, rule = _build("bp")
    twin = copy.deepcopy(model)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    make = partial(torch.optim.SGD, momentum=cfg.momentum) if optimizer == "sgd" else torch.optim.AdamW
    ref, opt = make(twin.parameters(), **kw), make_optimizer(rule.param_groups(model), cfg)
    assert opt.defaults.get("fused")
    start = copy.deepcopy(model)
    _step_both(model, opt, twin, ref, steps=20)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert max((p - s).abs().max().item() for p, s in zip(model.parameters(), start.parameters())) > 1e-2


def test_grad_clip_still_clips_each_block_when_the_groups_are_merged():
    """Per-block clipping reads the rule's groups, not the optimizer's merged one: a run with
    grad_clip equals one whose steps clip each block by hand (reference: clip_grad_norm_ per
    block group, then AdamW over the rule's groups as they are)."""
    from fa_study.config import stream_generator
    from fa_study.data import BatchIterator

    cfg = _cfg(grad_clip=1e-3, epochs=1)
    model, rule = _build("dfa")
    init = copy.deepcopy(model)
    train(model, rule, TRAIN, TEST, cfg)
    twin, twin_rule = copy.deepcopy(init), build_rule("dfa")
    twin_rule.setup(twin, CLASSES, stream_generator(cfg.seed, "feedback"), train_cfg=cfg)
    groups = twin_rule.param_groups(twin)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    for xb, yb in BatchIterator.from_dataset(TRAIN, cfg.batch_size, shuffle=True, seed=cfg.seed):
        twin_rule.fill_grads(twin, xb, yb)
        for g in groups:
            if g["clip"]:
                torch.nn.utils.clip_grad_norm_(g["params"], cfg.grad_clip)
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_data_check_refuses_non_finite_inputs_and_accepts_finite_ones_whose_sum_overflows():
    """The finiteness check sums x once; a sum that overflows on finite inputs falls back to the
    exact count (reference: torch.isfinite over every value)."""
    big = _toy(32, "train", 3)
    big.x.fill_(3e38)  # finite, but the sum is inf
    assert torch.isfinite(big.x).all() and not torch.isfinite(big.x.sum())
    model, rule = _build("bp")
    train(model, rule, big, TEST, _cfg(epochs=0))
    bad = _toy(32, "train", 3)
    bad.x[1, 0, 0, 0], bad.x[2, 1, 1, 1] = math.inf, -math.inf
    with pytest.raises(ValueError, match="train_ds has 2 non-finite values in x"):
        train(*_build("bp"), bad, TEST, _cfg(epochs=0))


def test_train_config_declares_every_field_and_keeps_values_as_given():
    """TrainConfig's fields are declared options (a check and a line of documentation each), and
    a valid value is stored as given: lr=1 stays the int 1, so a run's cache key does not move."""
    from fa_study.fields import field_docs

    docs = field_docs(TrainConfig)
    assert set(docs) == set(TrainConfig().to_dict()) and all(docs.values())
    cfg = TrainConfig(lr=1, weight_decay=0)
    assert type(cfg.lr) is int and type(cfg.weight_decay) is int
