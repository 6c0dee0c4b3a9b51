"""Every class of bad input gets a clear error before any training starts.

Each case is a call a user could make with a wrong value, the exception it must raise (a
``ValueError``) and a pattern its message must match: the parameter's name, the bad value, and
what is allowed. ``test_bad_input_is_refused_before_training`` also checks that no training
step ran (the trainer's ``fill_grads`` is wrapped to count calls).
"""
import math

import pytest
import torch

from fa_study import config, data, feedback, models, rules
from fa_study import diagnostics as protocol
from fa_study.experiments import (AuditStudy, DirectionStudy, FeedbackTour, LearnedStudy, PenaltyStudy,
                                  RAStudy)
from fa_study.runs import ModelSpec, ReadSpec, RunSpec
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


def _empty_batch():
    model = models.build_model("resmlp", input_shape=(3, 8, 8), num_classes=4, d=8, num_blocks=1)
    rule = rules.build_rule("fa")
    rule.setup(model, 4, torch.Generator().manual_seed(0))
    return rule.fill_grads(model, torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))


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
    "profile_unknown": (lambda: config.get_profile("fastest"), r"profile.*'fastest'.*'quick', 'default', 'paper'"),
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
                                                         torch.tensor([0, 1, 12]), "synthetic", 10, (0.0,), (1.0,)),
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
    "local_linear_zero": (lambda: feedback.LocalLinear(0, 3), r"in_features.*0"),
    "layer_rule_unknown": (lambda: feedback.LocalLinear(3, 3, method="fa2"), r"'fa2'.*'bp'"),
    "layer_option_unknown": (lambda: feedback.LocalLinear(3, 3, method="fa", lr=0.1), r"lr.*allowed"),
    "mirror_sigma_inf": (lambda: feedback.LocalLinear(3, 3, method="weight_mirror", mirror_sigma=math.inf),
                         r"mirror_sigma.*inf"),
    "grape_probe_fractional": (lambda: feedback.LocalLinear(3, 3, method="fa", fa_grape=True, grape_n_probe=2.5),
                               r"grape_n_probe.*2.5"),
    # rules
    "rule_unknown": (lambda: rules.build_rule("backprop"), r"rule 'backprop'.*'bp'"),
    "rule_option_unknown": (lambda: rules.build_rule("dfa", lam=0.1), r"no option 'lam'.*'penalty'"),
    "rule_option_inf": (lambda: rules.build_rule("kolen_pollack", lr_b=math.inf), r"lr_b.*inf"),
    "rule_option_string": (lambda: rules.build_rule("dfa", penalty="0.1"), r"penalty.*'0.1'"),
    "rule_option_fractional": (lambda: rules.build_rule("grape_fa", n_probe=2.5), r"n_probe.*2.5"),
    "rule_on_wrong_arch": (lambda: RunSpec(rule="ra_rev", model=ModelSpec("vit")), r"'ra_rev' cannot train a 'vit'"),
    "null_without_random_feedback": (lambda: RunSpec(rule="bp", read=ReadSpec(null_draws=5)),
                                     r"'bp' has no random feedback"),
    "null_without_blocks": (lambda: RunSpec(rule="fa", model=ModelSpec("resmlp", num_blocks=0),
                                            read=ReadSpec(null_draws=5)), r"'fa'.*num_blocks=0.*null_draws=0"),
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
    "empty_training_set": (_empty_dataset, r"train_ds is empty"),
    "empty_batch": (_empty_batch, r"batch is empty"),
    # studies
    "study_setting_unknown": (lambda: AuditStudy.for_profile("quick", epoch=3), r"unknown setting.*'epoch'"),
    "seeds_duplicate": (lambda: AuditStudy.for_profile("quick", seeds=(1, 1)), r"seeds must not repeat.*\[1\]"),
    "seeds_empty": (lambda: PenaltyStudy.for_profile("quick", seeds=()), r"seeds must be a non-empty"),
    "lambdas_text": (lambda: PenaltyStudy(lambdas="0, ten"), r"lambdas"),
    "study_lr_zero": (lambda: LearnedStudy.for_profile("quick", lr=0), r"lr must be a finite number > 0"),
    "tour_lr_inf": (lambda: FeedbackTour.for_profile("quick", lr=math.inf), r"lr must be a finite number > 0, got inf"),
    "tour_lr_string": (lambda: FeedbackTour.for_profile("quick", lr="0.1"), r"lr must be a finite number > 0, got '0.1'"),
    "tour_grape_lr_inf": (lambda: FeedbackTour.for_profile("quick", grape_lr_b=math.inf), r"grape_lr_b.*inf"),
    "tour_weight_decay_inf": (lambda: FeedbackTour.for_profile("quick", weight_decay=math.inf), r"weight_decay.*inf"),
    "read_layer_absent": (lambda: DirectionStudy.for_profile("quick", read_layer=99), r"read_layer must be one of 0..4"),
    "rank_above_width": (lambda: LearnedStudy.for_profile("quick", rules=("stiefel_dfa",), d=4, rank=8),
                         r"rank must be at most"),
    "ra_depth": (lambda: RAStudy.for_profile("quick", depth=1), r"depth.*1"),
    "null_draws_one": (lambda: AuditStudy.for_profile("quick", null_draws=1), r"null_draws must be 0"),
    # protocol
    "frozen_acc_percentage": (lambda: protocol.audit(models.build_model("resmlp", input_shape=(3, 4, 4), d=8),
                                                     torch.zeros(4, 3, 4, 4), torch.zeros(4, dtype=torch.long),
                                                     frozen_acc=35.0), r"frozen_acc.*\[0, 1\].*35.0"),
    "compare_unknown": (lambda: protocol.credit_cosines(None, [], [], compare="cls"), r"compare 'cls'.*'summed'"),
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


def test_an_audit_without_blocks_reads_the_null_only_where_feedback_is_used():
    """num_blocks=0: block FA's B_l sit between blocks, so it has none and gets no null (as BP);
    DFA's B_0 still carries the error to h_0, so its null stays."""
    study = AuditStudy.for_profile("quick", num_blocks=0, rules=("bp", "fa", "dfa"), archs=("resmlp",))
    draws = {s.rule: s.read.null_draws for s in study.specs()}  # frozen joins as D3's baseline
    assert draws == {"bp": 0, "fa": 0, "dfa": study.null_draws, "frozen": 0} and study.null_draws > 0
