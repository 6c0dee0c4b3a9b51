"""Layer-level rules: one class each, owning its options, its layers' backward and its after-step.

:func:`convert` (or the trainer, through :meth:`LayerRule.setup`) puts every ``nn.Linear`` /
``nn.Conv2d`` of any model on a rule: each becomes a ``LocalLinear`` / ``LocalConv2d``
(:mod:`fa_study.feedback.layers`) that holds the rule instance and asks it how to run its
backward (:meth:`LayerRule.layer_forward`), which feedback to draw and redraw
(:meth:`~LayerRule.init_layer`, :meth:`~LayerRule.redraw`) and what to do after the backward
(:meth:`~LayerRule.after_backward`). Everything else stays on BP. The credit at ``h_l`` is
what the converted model's own backward delivers there; its BP reference is the BP twin's
(:func:`fa_study.diagnostics.bp_reference`), so no diagnostic reads a rule's signal as "BP".

=================  ==========================================================================
rule               backward of each converted layer (weight gradients BP's unless stated)
=================  ==========================================================================
layer_fa           input gradient through a fixed random B of W's shape (Lillicrap 2016);
                   ``init``: gaussian, orthogonal, ortho_he or sparse
sign_sym           through ``sign(W) ||W||_F / sqrt(numel W)`` (seed 000)
frsf               through ``|M| ⊙ sign(W)``, M drawn once (Liao et al. 2016; biotorch)
brsf               through ``|M_t| ⊙ sign(W)``, M redrawn every batch (Liao et al. 2016)
layer_grape        layer_fa whose B turns toward W's forward-probed Jacobian (GrAPE)
kolen_pollack      layer_fa whose B receives W's gradient and decay (Akrout 2019): B -> W
weight_mirror      layer_fa whose B learns from the layer's response to noise (Akrout 2019)
layer_dfa          Nøkland's DFA: a hidden layer's update ``((e B_l^T) ⊙ f'(a_l))^T x_l``;
                   ``gated=False`` is seed 000's ungated ``(e B^T)^T x``
layer_dfa_block    DFA inside each block from the error at the block's output
=================  ==========================================================================

A new layer rule is one class: subclass :class:`LayerRule` (or one of the rules here), declare
its ``OPTIONS``, override the per-layer methods that differ, and :func:`fa_study.rules.register`
it.
"""
from __future__ import annotations

import copy
from typing import ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_NOISE_SAMPLES, MAX_PROBES, check_batch, check_int
from ..feedback.convert import swap_layers, visible_layers
from ..feedback.dfa import OutputError, share_output_error, tap_blocks, write_projection_grads
from ..feedback.functions import sign_feedback
from ..feedback.inits import FA_INIT_MODES, draw_gaussian, init_feedback, layer_std
from ..feedback.layers import LocalConv2d, LocalLinear
from ..feedback.learned import grape_step, kolen_pollack_step, probe_jacobian, weight_mirror_step
from ..feedback.step import feedback_step, local_layers, needs_output_error
from ..fields import Option, boolean, choice, float_range, nonnegative, positive, positive_or_none
from .base import RULES, Method, build_rule, check_class_count, device_generator, draw_seed
from .block import BP

DFA_INIT_STD = 0.02  # the reference's scale of the direct feedback matrices
INIT_STD = Option(None, positive_or_none, "scale of the random feedback (None: the RMS of W)")


def _probes(name: str, value) -> int:
    return check_int(name, value, 1, MAX_PROBES, bound="fa_study.config.MAX_PROBES")


def _noise_samples(name: str, value) -> int:
    return check_int(name, value, 1, MAX_NOISE_SAMPLES, bound="fa_study.config.MAX_NOISE_SAMPLES")


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a rule converts or has converted: plain Linear / Conv2d and local layers."""
    return visible_layers(model) + local_layers(model)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "arch", None) or type(model).__name__


class LayerRule(Method):
    """Base of the layer rules. Its per-layer methods are BP's (a plain forward, no feedback,
    nothing after the backward); a rule overrides what differs."""

    family = "layer"
    needs_blocks = False  # converts the nn.Linear / nn.Conv2d of any classifier nn.Module
    model_requirement = "an nn.Linear or nn.Conv2d to convert"
    layer_buffers: ClassVar[tuple[str, ...]] = ()  # buffers its layers keep (B, B_abs, ...)
    # what the rule is with its default options (an instance whose options change it says so)
    has_conv_form: ClassVar[bool] = True  # LocalConv2d can run it
    convs_on_bp: ClassVar[bool] = False  # without a conv form: leave convolutions on BP
    needs_output_error: ClassVar[bool] = False  # its layers read dL/d(model output)
    has_after_backward: ClassVar[bool] = False  # after_backward does something
    stores_b: ClassVar[bool] = False  # its layers keep a settable B of W's shape
    needs_targets: ClassVar[bool] = False  # feedback sized by the number of classes

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self._options.items())})"

    # ---- per layer (called by LocalLinear / LocalConv2d) ----------------------------------

    def init_layer(self, layer, generator: torch.Generator | None) -> None:
        """Draw the layer's initial feedback (its buffers exist, as None)."""
        self.redraw(layer, generator)

    def layer_has_random_feedback(self, layer) -> bool:
        """Whether ``layer`` holds random feedback that :meth:`redraw` can redraw (default:
        whether the rule keeps buffers in its layers, which it draws at random)."""
        return bool(self.layer_buffers)

    def redraw(self, layer, generator: torch.Generator | None = None,
               init_std: float | None = None) -> bool:
        """Redraw the layer's random feedback; return whether there was any."""
        return False

    def feedback_matrix(self, layer) -> torch.Tensor | None:
        """The matrix the backward uses in place of W (W's shape), or None when the input
        gradient does not pass through one (the direct rules)."""
        return None

    def layer_forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward with gradients enabled (it picks the backward)."""
        return layer._plain_forward(x)

    def after_backward(self, layer, *, e: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> bool:
        """The post-backward update of one layer; return whether the rule has one."""
        return False

    # ---- converting a model ---------------------------------------------------------------

    def bind(self, model: nn.Module, num_classes: int | None, train_cfg) -> None:
        """Settings the rule takes from the model, the data and the trainer before converting."""
        if self.needs_targets and num_classes is None:
            raise ValueError(f"rule {self.name!r} draws feedback matrices sized by the number of "
                             "classes: pass num_classes= to convert()")
        self._num_classes = None if num_classes is None else check_int("num_classes", num_classes, 1)

    def _conv_rule(self, conv_rule, model: nn.Module, train_cfg) -> "LayerRule | None":
        """The rule of the model's convolutions (None: they stay on BP)."""
        if conv_rule is None:
            if self.has_conv_form or self.convs_on_bp:
                return None if self.convs_on_bp else self
            convs = [n for n, m in visible_layers(model) if isinstance(m, nn.Conv2d)]
            if convs:
                raise ValueError(
                    f"rule {self!r} has no Conv2d form and the {_model_name(model)!r} model has "
                    f"Conv2d layers ({', '.join(convs[:3])}{', ...' if len(convs) > 3 else ''}); "
                    "allowed: a model without Conv2d layers, options with a Conv2d form, or "
                    "fa_study.rules.convert(model, rule, conv_rule='bp') to keep them on BP")
            return None
        if conv_rule == BP.name:
            return None
        rule = build_rule(conv_rule) if isinstance(conv_rule, str) else conv_rule
        if not isinstance(rule, LayerRule) or not rule.has_conv_form:
            raise ValueError(f"conv_rule must be 'bp' or a layer rule with a Conv2d form, got {conv_rule!r}")
        rule.bind(model, self._num_classes, train_cfg)
        return rule

    def attach(self, model: nn.Module, generator: torch.Generator | None = None, *,
               num_classes: int | None = None, conv_rule=None, train_cfg=None
               ) -> tuple[nn.Module, pd.DataFrame]:
        """Convert ``model`` in place (see :func:`convert`); return ``(model, report)``."""
        self.check_trainable(model)
        self.bind(model, num_classes, train_cfg)
        convs = self._conv_rule(conv_rule, model, train_cfg)

        def make(m: nn.Module):
            if isinstance(m, nn.Linear):
                return LocalLinear.from_linear(m, self, generator)
            return None if convs is None else LocalConv2d.from_conv(m, convs, generator)

        model, report = swap_layers(model, make)
        for rule in {id(r): r for r in (self, convs) if r is not None}.values():
            rule.after_attach(model, generator)
        share_output_error(model)
        return model, report

    def after_attach(self, model: nn.Module, generator: torch.Generator | None) -> None:
        """Draw what needs the whole converted model (direct feedback, block taps)."""

    # ---- the Method interface -------------------------------------------------------------

    @classmethod
    def fits(cls, model: nn.Module) -> bool:
        layers = _layers(model)
        return bool(layers) and (cls.has_conv_form or cls.convs_on_bp
                                 or not any(isinstance(m, nn.Conv2d) for _, m in layers))

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        rule = cls(**options)
        if not visible_layers(model):
            raise ValueError(f"rule {cls.name!r} finds no nn.Linear or nn.Conv2d to convert in the "
                             f"{_model_name(model)!r} model")
        rule.bind(model, num_classes, train_cfg)
        rule._conv_rule(None, model, train_cfg)

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        if not local_layers(model):
            self.attach(model, generator, num_classes=num_classes, train_cfg=train_cfg)
        if not local_layers(model):
            raise ValueError(f"rule {self.name!r} found no nn.Linear or nn.Conv2d to convert in the "
                             f"{_model_name(model)!r} model")
        self._num_classes = int(num_classes)
        # the noise of weight mirrors, brsf and GrAPE probes comes from a generator seeded here
        self._step_seed = draw_seed(generator)
        self._step_generator = None
        self._fresh_seed = None
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    def check_model(self, model, num_classes=None):
        self._require_ready("fill_grads")
        if not local_layers(model):
            raise ValueError(f"rule {self.name!r} was set up on another model: this "
                             f"{type(model).__name__} holds no layer converted to it; build a new rule "
                             f"(train() sets it up) or call rule.setup(model, num_classes, generator)")
        if self.needs_targets:  # B_dfa maps the output error: its size is the class count
            check_class_count(self, self._num_classes, model, num_classes)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new._fresh_seed = draw_seed(generator)
        return new

    def fill_grads(self, model, x, y):
        from ..feedback import capture_output_error

        self._require_ready("fill_grads")
        check_batch(x, y)
        self._zero_grads(model)
        logits = model(x)
        if needs_output_error(model):
            capture_output_error(model, logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self._step_generator = device_generator(self._step_seed, logits.device, self._step_generator)
        feedback_step(model, generator=self._step_generator)
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        return self.credit_at(model, x, y, None)

    def credit_at(self, model, x, y, states):
        """What the converted model's backward delivers at every ``h_l`` (for a fresh copy, on a
        copy of the model with its random feedback redrawn)."""
        from ..diagnostics import model_credit

        self._require_ready("credit")
        if self._fresh_seed is not None:
            model = copy.deepcopy(model)
            g = torch.Generator().manual_seed(self._fresh_seed)
            for _, layer in local_layers(model):
                if layer.has_random_feedback:
                    layer.reset_feedback(generator=g)
        return model_credit(model, x, y, hidden=states)


def convert(model: nn.Module, rule, *, conv_rule=None, generator: torch.Generator | None = None,
            num_classes: int | None = None, train_cfg=None, **options) -> tuple[nn.Module, pd.DataFrame]:
    """Put every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` on a layer rule, in place; return
    ``(model, report)``.

    rule: a layer rule's name (its ``options`` as keywords, e.g. ``convert(model, "layer_fa",
        init="sparse")``) or a :class:`LayerRule` instance.
    conv_rule: the convolutions' rule when it differs: ``"bp"`` keeps them on BP, a layer
        rule's name or instance runs it; default the rule itself (a rule without a Conv2d form
        refuses a model with convolutions unless it leaves them on BP by design).
    generator: CPU generator for every feedback matrix drawn (default: the global RNG).
    num_classes: the size of the output error (the direct rules).
    train_cfg: the trainer's :class:`~fa_study.train.TrainConfig` (Kolen-Pollack matches W's step).

    The new layers *share* the old layers' Parameters, so outputs are unchanged, weight tying
    survives and an optimizer built before the call stays valid. Left alone and reported:
    ``nn.MultiheadAttention`` with its children, subclasses of Linear / Conv2d, lazy and
    parametrized layers, and layers with forward hooks. report: one row per layer converted,
    module left alone and other module holding parameters, columns ``name, type, action,
    method, reason``.
    """
    if isinstance(rule, str):
        rule = build_rule(rule, **options)
    elif options:
        raise ValueError(f"options {sorted(options)} go with a rule name, not a built rule {rule!r}")
    if not isinstance(rule, LayerRule):
        raise ValueError(f"convert() takes a layer rule, one of {list(converting_rules())}, got {rule!r}")
    return rule.attach(model, generator, num_classes=num_classes, conv_rule=conv_rule,
                       train_cfg=train_cfg)


def converting_rules(model: nn.Module | None = None) -> tuple[str, ...]:
    """The registered layer rules that convert ``model`` (asked of each rule,
    :meth:`LayerRule.fits`), or all of them when ``model`` is None; read when asked, so a rule
    registered later counts."""
    return tuple(n for n, c in RULES.items() if issubclass(c, LayerRule) and (model is None or c.fits(model)))


# ------------------------------------------------------------------------------------------------
# Feedback through a matrix of W's shape
# ------------------------------------------------------------------------------------------------

class LayerFA(LayerRule):
    """Input gradient through a fixed random B of W's shape (Lillicrap et al. 2016)."""

    name = "layer_fa"
    summary = "per-layer FA: input gradient through a fixed random B (Lillicrap 2016)"
    has_random_feedback = True
    layer_buffers = ("B",)
    stores_b = True
    OPTIONS = {
        "init": Option("gaussian", choice(*FA_INIT_MODES),
                       "initial B: gaussian, orthogonal, ortho_he (He-scaled orthogonal) or sparse"),
        "sparse_k": Option(None, lambda n, v: v if v is None else check_int(n, v, 1),
                           "non-zeros per row of a sparse B (None: fan_in // 16)"),
        "init_std": INIT_STD,
    }
    LABELS = {"init": "init"}
    # the initial B of the subclasses that do not declare these options
    init, sparse_k, init_std = "gaussian", None, None

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        super().check_run(options, model, num_classes, train_cfg)
        k = options.get("sparse_k")
        if options.get("init") == "sparse" and k is not None:
            fans = {n: m.weight[0].numel() for n, m in visible_layers(model)}
            name = min(fans, key=fans.get)
            if k > fans[name]:
                raise ValueError(f"sparse_k must be at most the smallest fan-in of the layers "
                                 f"{cls.name} converts ({fans[name]}, layer {name!r} of the "
                                 f"{_model_name(model)!r} model), got {k}")

    @torch.no_grad()
    def redraw(self, layer, generator=None, init_std=None):
        std = layer_std(layer, self.init_std if init_std is None else init_std)
        layer.B = init_feedback(layer.weight.shape, self.init, std, self.sparse_k, generator,
                                device=layer.weight.device, dtype=layer.weight.dtype)
        return True

    def feedback_matrix(self, layer):
        return layer.B

    def layer_forward(self, layer, x):
        return layer._feedback_forward(x, layer.B)


class _LearnedFA(LayerFA):
    """layer_fa whose B learns: after every backward, ``update_b(layer, generator)`` (a
    subclass's; run under ``torch.no_grad``) updates the layer's B in place."""

    LABELS: ClassVar[dict[str, str]] = {}
    learns_feedback = True
    has_after_backward = True

    @torch.no_grad()
    def after_backward(self, layer, *, e=None, generator=None):
        self.update_b(layer, generator)
        return True


class LayerGrAPE(_LearnedFA):
    """layer_fa whose B moves toward W's forward-probed Jacobian after every backward (GrAPE)."""

    name = "layer_grape"
    summary = "per-layer FA whose B aligns to W's forward-probed Jacobian (GrAPE)"
    OPTIONS = {
        "lr_b": Option(0.05, nonnegative, "GrAPE step: fraction of the angle to J_hat closed per step"),
        "n_probe": Option(32, _probes, "forward probes per step"),
        "scale_free": Option(True, boolean, "scale-free step (False: seed 000's plain gradient step)"),
        "normalize_columns": Option(False, boolean, "unit-norm columns of B after each step (GrAPE Eq. 6)"),
    }
    LABELS = {"lr_b": "η"}

    def update_b(self, layer, generator):
        grape_step(layer.B, probe_jacobian(layer.weight, self.n_probe, generator), self.lr_b,
                   scale_free=self.scale_free)
        if self.normalize_columns:
            B2 = layer.B.view(layer.B.shape[0], -1)
            B2.div_(B2.norm(dim=0, keepdim=True).clamp_min(1e-8))


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


class KolenPollack(_LearnedFA):
    """Kolen-Pollack (Akrout et al. 2019): ``B <- (1 - decay) B - lr_b grad_W``. B receives W's
    own gradient and decay, so with the matched step ``B - W`` shrinks by ``(1 - decay)`` per
    step whatever the gradients are. ``lr_b`` / ``b_decay`` None (default) take both from the
    trainer's optimizer (:func:`matched_step`)."""

    name = "kolen_pollack"
    summary = "B receives W's gradient and decay: B -> W (Akrout 2019)"
    OPTIONS = {
        "lr_b": Option(None, positive_or_none, "B's step (None: W's own effective step)"),
        "b_decay": Option(None, lambda n, v: v if v is None else float_range(0.0, 1.0, high_open=True)(n, v),
                          "B's per-step decay in [0, 1) (None: W's own decay)"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        self._match(None)  # without a trainer: the step and decay of matched_step(None)

    def bind(self, model, num_classes, train_cfg):
        super().bind(model, num_classes, train_cfg)
        self._match(train_cfg)

    def _match(self, train_cfg) -> None:
        """B's step and decay: the options, else W's own under ``train_cfg``'s optimizer."""
        step, decay = matched_step(train_cfg)
        self.step_size = step if self.lr_b is None else self.lr_b
        self.decay = decay if self.b_decay is None else self.b_decay
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(
                f"kolen_pollack's derived decay of B is {self.decay:g} (>= 1): W's own per-step decay "
                f"under optimizer={train_cfg.optimizer!r}, lr={train_cfg.lr:g}, momentum="
                f"{train_cfg.momentum:g}, weight_decay={train_cfg.weight_decay:g} would flip W's sign "
                "every step; lower lr or weight_decay, or pass b_decay in [0, 1)")

    def update_b(self, layer, generator):
        if layer.weight.grad is None:
            raise RuntimeError("a kolen_pollack layer has no weight gradient: call loss.backward() "
                               "before feedback_step")
        kolen_pollack_step(layer.B, layer.weight.grad, self.step_size, self.decay)


class WeightMirror(_LearnedFA):
    """Weight mirror (Akrout et al. 2019): ``B <- (1 - decay) B + lr_b y^T x / n`` for noise
    ``x ~ N(0, sigma^2)`` ``(n, fan_in)`` and the layer's response ``y = x W^T``; the decay
    ``lr_b sigma^2`` makes W itself the fixed point."""

    name = "weight_mirror"
    summary = "B learns from the layer's response to injected noise (Akrout 2019)"
    OPTIONS = {
        "lr_b": Option(0.05, positive, "mirror step"),
        "sigma": Option(1.0, positive, "std of the injected noise"),
        "n_noise": Option(64, _noise_samples, "noise samples per step"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        if self.lr_b * self.sigma ** 2 >= 1.0:
            raise ValueError(f"weight_mirror needs lr_b * sigma**2 < 1 (it is also B's decay), got "
                             f"lr_b={self.lr_b:g}, sigma={self.sigma:g}")

    def update_b(self, layer, generator):
        weight_mirror_step(layer.B, layer.weight, self.lr_b, self.lr_b * self.sigma ** 2,
                           self.sigma, self.n_noise, generator)


class SignSymmetry(LayerRule):
    name = "sign_sym"
    summary = "input gradient through sign(W)·rms(W) (seed 000)"

    def feedback_matrix(self, layer):
        return sign_feedback(layer.weight.detach())

    def layer_forward(self, layer, x):
        return layer._feedback_forward(x, None)  # computed in the backward from the current W


class FixedRandomSign(LayerRule):
    """Sign-concordant feedback ``|M| ⊙ sign(W)`` (Liao et al. 2016), M drawn once."""

    name = "frsf"
    summary = "sign-concordant feedback |M|⊙sign(W), M fixed (Liao 2016)"
    has_random_feedback = True
    layer_buffers = ("B_abs",)
    OPTIONS = {"init_std": INIT_STD}

    @torch.no_grad()
    def redraw(self, layer, generator=None, init_std=None):
        std = layer_std(layer, self.init_std if init_std is None else init_std)
        layer.B_abs = init_feedback(layer.weight.shape, "gaussian", std, None, generator,
                                    device=layer.weight.device, dtype=layer.weight.dtype).abs()
        return True

    def feedback_matrix(self, layer):
        return layer.B_abs * torch.sign(layer.weight.detach())

    def layer_forward(self, layer, x):
        return layer._feedback_forward(x, self.feedback_matrix(layer))


def _mix(seed: int, step: int) -> int:
    # a seed per redraw, from the layer's stream seed and the redraw count
    return (seed * 6364136223846793005 + (step + 1) * 1442695040888963407) % (2 ** 63)


class BatchRandomSign(FixedRandomSign):
    """``|M_t| ⊙ sign(W)`` with ``M_t ~ N(0, std^2)`` redrawn at every forward with gradients.

    Draw ``t`` is made on the weight's device by a generator seeded from the layer's stream
    seed and ``t`` (plain attributes that ``deepcopy`` carries), so a run is reproducible on a
    device and nothing synchronises with the host. ``std`` is fixed when the layer is set up.
    The feedback changes every batch, so the fresh-feedback null does not apply to the rule.
    """

    name = "brsf"
    summary = "sign-concordant feedback |M_t|⊙sign(W), M redrawn every batch (Liao 2016)"
    has_random_feedback = False

    @torch.no_grad()
    def redraw(self, layer, generator=None, init_std=None):
        layer._rsf_std = layer_std(layer, self.init_std if init_std is None else init_std)
        layer._rsf_seed = draw_seed(generator)
        layer._rsf_draws = 0
        layer.B_abs = draw_gaussian(layer.weight.shape, layer._rsf_std, generator, layer.weight).abs()
        return True

    def layer_forward(self, layer, x):
        w = layer.weight
        gen = torch.Generator(device=w.device).manual_seed(_mix(layer._rsf_seed, layer._rsf_draws))
        layer._rsf_draws += 1
        m = torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype)
        # a new tensor, not an in-place redraw: an earlier call of the layer in the same graph
        # keeps the B it used
        layer.B_abs = m.abs_().mul_(layer._rsf_std)
        return super().layer_forward(layer, x)


# ------------------------------------------------------------------------------------------------
# Direct feedback
# ------------------------------------------------------------------------------------------------

class _DirectRule(LayerRule):
    """What the direct rules share: a random matrix per layer in the buffer ``layer_buffers[0]``
    (none on a layer outside their reach, the identity on ungated DFA's output layer), redrawn
    at the layer's ``_dfa_init_std``, and a forward that keeps the input for the weight update
    written after the backward."""

    def layer_has_random_feedback(self, layer):
        return getattr(layer, self.layer_buffers[0]) is not None and not layer._dfa_identity

    @torch.no_grad()
    def redraw(self, layer, generator=None, init_std=None):
        if not self.layer_has_random_feedback(layer):
            return False
        shape = getattr(layer, self.layer_buffers[0]).shape
        std = layer._dfa_init_std if init_std is None else init_std
        setattr(layer, self.layer_buffers[0], draw_gaussian(shape, std, generator, layer.weight))
        return True

    def layer_forward(self, layer, x):
        layer._cache_input(x)
        return layer._plain_forward(x)


class LayerDFA(_DirectRule):
    """Nøkland's DFA (2016) per layer, as biotorch implements it (``gated``, default).

    In the backward of each layer the input gradient is ``e @ B_dfa`` (``B_dfa`` ``(target_dim,
    in)``; Conv2d: the transposed convolution of ``e`` broadcast over the output positions with
    ``B_dfa`` ``(target_dim, C_in, kh, kw)``), where ``e = dL/d(model output)``. Autograd then
    applies ``f'`` on the way to the layer below, whose update is the published
    ``((e B^T) ⊙ f'(a))^T x``; the output layer's update is its BP gradient.

    ``gated=False`` is seed 000's form (Linear only): an ordinary backward, then the weight
    gradient overwritten by ``(e B_dfa^T)^T x`` (``B_dfa`` ``(out, target_dim)``), not gated by
    any ``f'``; the output layer receives ``e`` itself (``B_dfa = I``).
    """

    name = "layer_dfa"
    summary = "per-layer DFA (Nokland 2016): ((e B^T) ⊙ f'(a))^T x"
    has_random_feedback = True
    needs_targets = True
    needs_output_error = True
    layer_buffers = ("B_dfa",)
    OPTIONS = {
        "gated": Option(True, boolean,
                        "gate by f' of the next nonlinearity (False: seed 000's ungated form)"),
        "init_std": Option(DFA_INIT_STD, positive_or_none, "std of B_dfa (None: the RMS of W)"),
    }
    LABELS = {"gated": "gated"}

    def __init__(self, **options):
        super().__init__(**options)
        # the class attributes describe the default (gated) form; the ungated one differs
        self.has_conv_form, self.has_after_backward = self.gated, not self.gated

    @classmethod
    def credit_uses_feedback(cls, options):
        # ungated: the backward is BP's and B only rewrites the weight gradients afterwards, so the
        # credit at the hidden states does not depend on B
        return bool(options.get("gated", True))

    def init_layer(self, layer, generator):
        layer._output_error = OutputError()
        layer._dfa_identity = False
        layer._dfa_init_std = DFA_INIT_STD if self.init_std is None else self.init_std

    @torch.no_grad()
    def after_attach(self, model, generator):
        k = self._num_classes
        layers = [(n, m) for n, m in local_layers(model) if m.rule is self]
        fits = [n for n, m in layers if m.weight.shape[0] == k and isinstance(m, nn.Linear)]
        for name, layer in layers:
            if not self.gated and fits and name == fits[-1]:
                layer._dfa_identity = True
                layer.B_dfa = torch.eye(k, device=layer.weight.device, dtype=layer.weight.dtype)
                continue
            shape = layer._direct_feedback_shape(k) if self.gated else (layer.out_features, k)
            layer._dfa_init_std = layer_std(layer, self.init_std)
            layer.B_dfa = draw_gaussian(shape, layer._dfa_init_std, generator, layer.weight)

    def layer_forward(self, layer, x):
        if not self.gated:
            return super().layer_forward(layer, x)
        holder, since, B = layer._output_error, layer._output_error.captures, layer.B_dfa

        def error() -> tuple[torch.Tensor, torch.Tensor]:
            if B is None:
                raise RuntimeError("this layer_dfa layer has no feedback matrix: convert the model "
                                   "with fa_study.rules.convert(model, 'layer_dfa', num_classes=...)")
            e = holder.get(since, "a layer_dfa layer's backward")
            if e.shape[-1] != B.shape[0]:
                raise ValueError(f"the output error has last dimension {e.shape[-1]} but B_dfa "
                                 f"was drawn for {B.shape[0]} classes")
            return e, B

        return layer._direct_forward(x, error)

    def after_backward(self, layer, *, e=None, generator=None):
        if self.gated:
            return False
        if layer.B_dfa is None:
            raise RuntimeError("this layer_dfa layer has no feedback matrix: convert the model with "
                               "fa_study.rules.convert(model, 'layer_dfa', num_classes=...)")
        if e is None:
            try:
                e = layer._output_error.get(layer._cached_stamp, "an ungated layer_dfa layer")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}, or pass e=dL/d(output) to feedback_step") from None
        write_projection_grads(layer, e, layer.B_dfa, mean=False)
        return True


class LayerDFABlock(_DirectRule):
    """DFA inside each block: every Linear of block l gets the error at the block's output
    projected through its own random ``B_dfa_block`` ``(out, d)``, averaged over rows
    (Linear only; convolutions, e.g. ViTMini's patch embedding, stay on BP; SmallResNet, all
    convolutions, is refused). The credit at the block boundaries is the ordinary backward's
    (the projections act inside the blocks), so the fresh-feedback null does not apply."""

    name = "layer_dfa_block"
    summary = "DFA inside each block from the error at the block's output"
    needs_blocks = True
    has_conv_form = False
    convs_on_bp = True
    has_after_backward = True
    layer_buffers = ("B_dfa_block",)
    model_requirement = ("blocks with a width d (the blocks and width of a fa_study.models."
                         "BlockModel) holding nn.Linear layers, whose outputs' error they read")

    @classmethod
    def fits(cls, model):
        blocks, width = getattr(model, "blocks", None), getattr(model, "width", None)
        return (blocks is not None and isinstance(width, int)
                and any(isinstance(m, nn.Linear) for b in blocks for _, m in _layers(b)))

    def init_layer(self, layer, generator):
        layer._dfa_init_std, layer._dfa_identity = DFA_INIT_STD, False
        layer._block_tap = None
        layer._block_assigned = False  # set by after_attach: tells "outside every block" from "not set up"

    @torch.no_grad()
    def after_attach(self, model, generator):
        owner = tap_blocks(model.blocks)
        for _, layer in local_layers(model):
            layer._block_assigned = layer.rule is self or getattr(layer, "_block_assigned", False)
            if layer.rule is self and id(layer) in owner:
                layer._block_tap = owner[id(layer)]
                layer.B_dfa_block = draw_gaussian((layer.out_features, model.width), DFA_INIT_STD,
                                                  generator, layer.weight)

    def after_backward(self, layer, *, e=None, generator=None):
        if not layer._block_assigned:
            raise RuntimeError("this layer_dfa_block layer was not set up with its model's blocks: "
                               "convert the model with fa_study.rules.convert(model, 'layer_dfa_block')")
        if layer._block_tap is None:
            return False  # outside every block: keeps the BP gradient of its forward
        if layer._block_tap.error is None:
            raise RuntimeError(f"no gradient reached the output of block {layer._block_tap.index}: "
                               "call loss.backward() (with the block's output in the graph) first")
        write_projection_grads(layer, layer._block_tap.error, layer.B_dfa_block, mean=True)
        return True


LAYER_RULES: tuple[type[LayerRule], ...] = (LayerFA, SignSymmetry, FixedRandomSign, BatchRandomSign,
                                            LayerGrAPE, KolenPollack, WeightMirror, LayerDFA,
                                            LayerDFABlock)
