"""Layer-level rules as Methods: a converted model plus the rule's post-backward step.

:meth:`LayerRule.setup` converts the model in place with :func:`fa_study.feedback.convert`:
every ``nn.Linear`` / ``nn.Conv2d`` becomes a ``LocalLinear`` / ``LocalConv2d`` whose backward
is the rule's (a feedback strategy of :mod:`fa_study.feedback`), everything else stays on BP.
:meth:`LayerRule.fill_grads` is autograd through the local layers (with the output error
captured for the direct rules) followed by the one post-backward call
:func:`fa_study.feedback.feedback_step`. The credit at ``h_l`` is what the converted model's own
backward delivers there: the signal the rule propagates. The BP reference of a converted model
is its BP twin's (:func:`fa_study.diagnostics.bp_reference` switches every local layer to BP), so
no diagnostic ever reads a rule's own signal as "BP".

=================  ==========================================================================
rule               backward of each converted layer (weight gradients BP's unless stated)
=================  ==========================================================================
layer_fa           input gradient through a fixed random B of W's shape (Lillicrap 2016);
                   ``init``: gaussian, orthogonal, ortho_he or sparse
sign_sym           through ``sign(W) ||W||_F / sqrt(numel W)`` (seed 000)
frsf               through ``|M| ⊙ sign(W)``, M drawn once (Liao et al. 2016; biotorch)
brsf               through ``|M_t| ⊙ sign(W)``, M redrawn every batch (Liao et al. 2016)
layer_grape        FA whose B turns toward W's forward-probed Jacobian (GrAPE)
kolen_pollack      FA whose B receives W's gradient and decay (Akrout 2019): B -> W
weight_mirror      FA whose B learns from the layer's response to injected noise (Akrout 2019)
layer_dfa          Nokland's DFA: a hidden layer's update ``((e B_l^T) ⊙ f'(a_l))^T x_l``;
                   ``gated=False`` is seed 000's ungated ``(e B^T)^T x``
layer_dfa_block    DFA inside each block from the error at the block's output
=================  ==========================================================================
"""
from __future__ import annotations

import copy
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import MAX_NOISE_SAMPLES, MAX_PROBES, check_int
from .base import (Method, Option, boolean, check_batch, check_class_count, choice, device_generator,
                   draw_seed, nonnegative, positive, positive_int, positive_or_none)

LAYER_ARCHS: tuple[str, ...] = ("resmlp", "vit", "resnet", "mlp")  # models holding nn.Linear / nn.Conv2d
INIT_STD = Option(None, positive_or_none, "scale of the random feedback (None: the RMS of W)")


def probes(name: str, value) -> int:
    """Forward probes per step: 1..MAX_PROBES (each layer draws probes x fan_in floats)."""
    return check_int(name, value, 1, MAX_PROBES, bound="fa_study.config.MAX_PROBES")


def noise_samples(name: str, value) -> int:
    """Noise samples per weight-mirror step: 1..MAX_NOISE_SAMPLES (n x fan_in floats per layer)."""
    return check_int(name, value, 1, MAX_NOISE_SAMPLES, bound="fa_study.config.MAX_NOISE_SAMPLES")


def convertible_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the plain ``nn.Linear`` / ``nn.Conv2d`` that
    :func:`fa_study.feedback.convert` would put on a layer rule (those inside
    ``nn.MultiheadAttention`` stay on BP); works on a model on the meta device."""
    from ..feedback.convert import _unconvertible

    out, stack = [], [("", model)]
    while stack:
        name, m = stack.pop()
        if isinstance(m, torch.nn.MultiheadAttention):
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and _unconvertible(m) is None:
            out.append((name, m))
            continue
        stack.extend((f"{name}.{n}" if name else n, c) for n, c in m.named_children())
    return out[::-1]


class LayerRule(Method):
    """Base of the layer-level rules; subclasses set :attr:`layer_rule` (the feedback strategy's
    name in :data:`fa_study.feedback.METHODS`) and map their options to the strategy's in
    :meth:`convert_options`."""

    family = "layer"
    archs = LAYER_ARCHS
    needs_blocks = False  # converts the nn.Linear / nn.Conv2d of any classifier nn.Module
    layer_rule: ClassVar[str] = ""
    needs_targets: ClassVar[bool] = False  # dfa: feedback matrices sized by the number of classes

    def convert_options(self, train_cfg) -> dict:
        """Keyword options for :func:`fa_study.feedback.convert`."""
        return {}

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        from ..feedback.strategies import rule_class

        arch = getattr(model, "arch", type(model).__name__)
        layers = convertible_layers(model)
        if not layers:
            raise ValueError(f"rule {cls.name!r} finds no nn.Linear or nn.Conv2d to convert in the "
                             f"{arch!r} model")
        rule = cls(**options)
        convs = [n for n, m in layers if isinstance(m, torch.nn.Conv2d)]
        if convs and "conv_method" not in rule.convert_options(train_cfg) \
                and not rule_class(rule.layer_rule).has_conv_form:
            given = {k: v for k, v in options.items() if v != cls.OPTIONS[k].default}
            raise ValueError(f"rule {cls.name!r}{f' with {given}' if given else ''} runs the layer rule "
                             f"{rule.layer_rule!r}, which has no Conv2d form, and the {arch!r} model has "
                             f"Conv2d layers ({', '.join(convs[:3])}{', ...' if len(convs) > 3 else ''}); "
                             f"allowed: a model without Conv2d layers, or options of {cls.name!r} "
                             f"whose layer rule has a Conv2d form")

    def check_model(self, model, num_classes=None):
        from .. import feedback

        self._require_ready("fill_grads")
        if not feedback.local_layers(model):
            raise ValueError(f"rule {self.name!r} was set up on another model: this "
                             f"{type(model).__name__} holds no layer converted to it; build a new rule "
                             f"(train() sets it up) or call rule.setup(model, num_classes, generator)")
        if self.needs_targets:  # B_dfa maps the output error: (num_classes, fan_in)
            check_class_count(self, self._num_classes, model, num_classes)

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        from .. import feedback

        self.check_trainable(model)
        if not feedback.local_layers(model):
            kw = self.convert_options(train_cfg)
            if self.needs_targets:
                kw["dfa_target_dim"] = int(num_classes)
            if self.layer_rule == "dfa_block":
                kw["dfa_block_dim"] = model.width
            feedback.convert(model, self.layer_rule, generator=generator, **kw)
        if not feedback.local_layers(model):
            raise ValueError(f"rule {self.name!r} found no nn.Linear or nn.Conv2d to convert in the "
                             f"{getattr(model, 'arch', type(model).__name__)!r} model")
        self._num_classes = int(num_classes)
        # the noise of weight mirrors, brsf and GrAPE probes comes from a generator seeded here
        self._step_seed = draw_seed(generator)
        self._step_generator = None
        self._fresh_seed = None
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new._fresh_seed = draw_seed(generator)
        return new

    def _generator(self, device: torch.device) -> torch.Generator:
        self._step_generator = device_generator(self._step_seed, device, self._step_generator)
        return self._step_generator

    def fill_grads(self, model, x, y):
        from .. import feedback

        self._require_ready("fill_grads")
        check_batch(x, y)
        self._zero_grads(model)
        logits = model(x)
        if feedback.needs_output_error(model):
            feedback.capture_output_error(model, logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        feedback.feedback_step(model, generator=self._generator(logits.device))
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        return self.credit_at(model, x, y, None)

    def credit_at(self, model, x, y, states):
        """What the converted model's backward delivers at every ``h_l`` (for a fresh copy, on a
        copy of the model with its random feedback redrawn)."""
        from ..diagnostics import model_credit

        self._require_ready("credit")
        if self._fresh_seed is not None:
            model = self._redrawn_copy(model)
        return model_credit(model, x, y, hidden=states)

    def _redrawn_copy(self, model):
        from .. import feedback

        twin = copy.deepcopy(model)
        g = torch.Generator().manual_seed(self._fresh_seed)
        for _, layer in feedback.local_layers(twin):
            if layer.has_random_feedback:
                layer.reset_feedback(generator=g)
        return twin


class LayerFA(LayerRule):
    name = "layer_fa"
    summary = "per-layer FA: input gradient through a fixed random B (Lillicrap 2016)"
    layer_rule = "fa"
    has_random_feedback = True
    OPTIONS = {
        "init": Option("gaussian", choice("gaussian", "orthogonal", "ortho_he", "sparse"),
                       "initial B: gaussian, orthogonal, ortho_he (He-scaled orthogonal) or sparse"),
        "sparse_k": Option(None, lambda n, v: v if v is None else positive_int(n, v),
                           "non-zeros per row of a sparse B (None: fan_in // 16)"),
        "init_std": INIT_STD,
    }
    LABELS = {"init": "init"}

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        super().check_run(options, model, num_classes, train_cfg)
        k = options["sparse_k"]
        if options["init"] == "sparse" and k is not None:
            fans = {n: m.weight[0].numel() for n, m in convertible_layers(model)}
            name = min(fans, key=fans.get)
            if k > fans[name]:
                raise ValueError(f"sparse_k must be at most the smallest fan-in of the layers "
                                 f"layer_fa converts ({fans[name]}, layer {name!r} of the "
                                 f"{getattr(model, 'arch', type(model).__name__)!r} model), got {k}")

    def convert_options(self, train_cfg):
        return {"fa_init_mode": self.init, "fa_sparse_k": self.sparse_k, "init_std": self.init_std}


class SignSymmetry(LayerRule):
    name = "sign_sym"
    summary = "input gradient through sign(W)·rms(W) (seed 000)"
    layer_rule = "sign_sym"


class _SignConcordant(LayerRule):
    """Sign-concordant feedback ``|M| ⊙ sign(W)`` with random magnitudes (Liao et al. 2016)."""

    OPTIONS = {"init_std": INIT_STD}

    def convert_options(self, train_cfg):
        return {"init_std": self.init_std}


class FixedRandomSign(_SignConcordant):
    name = "frsf"
    summary = "sign-concordant feedback |M|⊙sign(W), M fixed (Liao 2016)"
    layer_rule = "frsf"
    has_random_feedback = True


class BatchRandomSign(_SignConcordant):
    name = "brsf"
    summary = "sign-concordant feedback |M_t|⊙sign(W), M redrawn every batch (Liao 2016)"
    layer_rule = "brsf"


class LayerGrAPE(LayerRule):
    name = "layer_grape"
    summary = "per-layer FA whose B aligns to W's forward-probed Jacobian (GrAPE)"
    layer_rule = "fa"  # FA layers whose B is moved by GrAPE after every backward
    has_random_feedback = True
    learns_feedback = True
    OPTIONS = {
        "lr_b": Option(0.05, nonnegative, "GrAPE step: fraction of the angle to J_hat closed per step"),
        "n_probe": Option(32, probes, "forward probes per step"),
        "scale_free": Option(True, boolean, "scale-free step (False: seed 000's plain gradient step)"),
        "normalize_columns": Option(False, boolean, "unit-norm columns of B after each step (GrAPE Eq. 6)"),
    }
    LABELS = {"lr_b": "η"}

    def convert_options(self, train_cfg):
        return {"fa_grape": True, "lr_b": self.lr_b, "grape_n_probe": self.n_probe,
                "grape_scale_free": self.scale_free, "grape_normalize_columns": self.normalize_columns}


def matched_step(train_cfg) -> tuple[float, float]:
    """``(step, decay)`` that W receives per unit of gradient under the trainer's optimizer:
    under SGD with momentum ``mu`` a gradient moves W by ``lr / (1 - mu)`` in total and the
    weight decay shrinks W by ``lr * weight_decay / (1 - mu)`` per step; AdamW decays W by
    ``lr * weight_decay`` directly (its step is rescaled per coordinate, so no B can match it)."""
    if train_cfg is None:
        return 0.01, 0.0
    if train_cfg.optimizer == "sgd":
        step = train_cfg.lr / (1.0 - train_cfg.momentum)
        return step, train_cfg.weight_decay * step
    return train_cfg.lr, train_cfg.lr * train_cfg.weight_decay


class KolenPollack(LayerRule):
    """Kolen-Pollack (Akrout et al. 2019): B receives W's own gradient and decay, so under SGD
    with the matched step ``B - W`` only shrinks. ``lr_b`` / ``b_decay`` ``None`` (default)
    derive both from the trainer's optimizer (:func:`matched_step`)."""

    name = "kolen_pollack"
    summary = "B receives W's gradient and decay: B -> W (Akrout 2019)"
    layer_rule = "kolen_pollack"
    has_random_feedback = True
    learns_feedback = True
    OPTIONS = {
        "lr_b": Option(None, positive_or_none, "B's step (None: W's own effective step)"),
        "b_decay": Option(None, lambda n, v: v if v is None else _decay(n, v),
                          "B's per-step decay in [0, 1) (None: W's own decay)"),
    }

    @staticmethod
    def _steps(lr_b, b_decay, train_cfg) -> dict:
        step, decay = matched_step(train_cfg)
        lr_b = step if lr_b is None else lr_b
        b_decay = decay if b_decay is None else b_decay
        if not 0.0 <= b_decay < 1.0:
            raise ValueError(
                f"kolen_pollack's derived decay of B is {b_decay:g} (>= 1): W's own per-step decay "
                f"under optimizer={train_cfg.optimizer!r}, lr={train_cfg.lr:g}, "
                f"momentum={train_cfg.momentum:g}, weight_decay={train_cfg.weight_decay:g} would flip W's "
                f"sign every step; lower lr or weight_decay, or pass b_decay in [0, 1)")
        return {"lr_b": lr_b, "b_decay": b_decay}

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        super().check_run(options, model, num_classes, train_cfg)
        cls._steps(options["lr_b"], options["b_decay"], train_cfg)

    def convert_options(self, train_cfg):
        return self._steps(self.lr_b, self.b_decay, train_cfg)


def _decay(name: str, value) -> float:
    from ..config import check_float

    return check_float(name, value, 0.0, 1.0, high_open=True)


class WeightMirror(LayerRule):
    """Weight mirror (Akrout et al. 2019): ``B <- (1 - decay) B + lr_b y^T x / n`` for noise
    ``x ~ N(0, sigma^2)`` and the layer's response ``y = x W^T``; the default decay
    ``lr_b sigma^2`` makes W itself the fixed point."""

    name = "weight_mirror"
    summary = "B learns from the layer's response to injected noise (Akrout 2019)"
    layer_rule = "weight_mirror"
    has_random_feedback = True
    learns_feedback = True
    OPTIONS = {
        "lr_b": Option(0.05, positive, "mirror step"),
        "sigma": Option(1.0, positive, "std of the injected noise"),
        "n_noise": Option(64, noise_samples, "noise samples per step"),
    }

    @staticmethod
    def _check_decay(lr_b: float, sigma: float) -> None:
        if lr_b * sigma ** 2 >= 1.0:
            raise ValueError(f"weight_mirror needs lr_b * sigma**2 < 1 (it is also B's decay), got "
                             f"lr_b={lr_b:g}, sigma={sigma:g}")

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        super().check_run(options, model, num_classes, train_cfg)
        cls._check_decay(options["lr_b"], options["sigma"])

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        self._check_decay(self.lr_b, self.sigma)
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    def convert_options(self, train_cfg):
        return {"lr_b": self.lr_b, "mirror_sigma": self.sigma, "mirror_n": self.n_noise}


class LayerDFA(LayerRule):
    """Nokland's DFA per layer (see the module doc); ``gated=False`` is seed 000's variant."""

    name = "layer_dfa"
    summary = "per-layer DFA (Nokland 2016): ((e B^T) ⊙ f'(a))^T x"
    has_random_feedback = True
    needs_targets = True
    OPTIONS = {
        "gated": Option(True, boolean, "gate by f' of the next nonlinearity (False: seed 000's ungated form)"),
    }
    LABELS = {"gated": "gated"}

    @property
    def layer_rule(self) -> str:  # type: ignore[override]
        return "dfa" if self.gated else "dfa_ungated"

    @classmethod
    def credit_uses_feedback(cls, options):
        # ungated: the backward is BP's and B only rewrites the weight gradients afterwards, so the
        # credit at the hidden states does not depend on B
        return bool(options.get("gated", True))


class LayerDFABlock(LayerRule):
    """DFA inside each block: every Linear of block l gets the error at the block's output
    projected through its own random matrix. Convolutions (ViTMini's patch embedding) stay on BP;
    SmallResNet, all convolutions, is refused. The credit at the block boundaries is the ordinary
    backward's (the projections act inside the blocks), so redrawing the matrices does not change
    it: the fresh-feedback null does not apply."""

    name = "layer_dfa_block"
    summary = "DFA inside each block from the error at the block's output"
    layer_rule = "dfa_block"
    archs = ("resmlp", "vit", "mlp")
    needs_blocks = True
    model_requirement = ("blocks with a width d (the blocks and width of a fa_study.models."
                         "BlockModel), whose outputs' error its projections read")

    def convert_options(self, train_cfg):
        return {"conv_method": "bp"}
