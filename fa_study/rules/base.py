"""The learning-rule interface: :class:`Method`, declared options, and the block-local base.

A rule owns its feedback state (random or learned matrices) and does two things for any
:class:`~fa_study.models.BlockModel`:

* ``fill_grads(model, x, y)`` writes every trainable parameter's ``.grad`` for one batch; one
  optimizer (built by the trainer from :meth:`Method.param_groups`) then steps them all;
* ``credit(model, x, y)`` returns the signals ``a_0 .. a_L`` at ``h_0 .. h_L`` the rule would
  use, each shaped like ``h_l``, so every diagnostic works for every rule.

What distinguishes rules is asked of the rule class, never decided by comparing its name:
:attr:`Method.OPTIONS` (the options it takes, with defaults and checks),
:attr:`Method.takes_penalty`, :attr:`Method.has_random_feedback` (the fresh-feedback null
applies), :attr:`Method.is_baseline` (frozen / shallow: no credit of its own, not judged by D3),
:attr:`Method.learns_feedback`, :meth:`Method.supports` (the architectures it can train),
:attr:`Method.needs_blocks` (False: it trains any classifier ``nn.Module``, not only the
package's block models; :meth:`Method.check_trainable` refuses the others, naming what the
model lacks and the rules that can train it).

:class:`BlockLocal` writes ``fill_grads`` and ``credit`` once for every rule that trains each
block by a local surrogate: a subclass supplies :meth:`BlockLocal.signals` (its credit
signals) and, where it learns its feedback, :meth:`BlockLocal.learn` (called after the
gradients are written, before the optimizer step).

Indexing follows the block interface: ``h_0 = embed(x)``, ``h_{l+1} = step(l, h_l)``,
``logits = readout(h_L)``. Block ``l`` is trained by the credit at its *output* ``h_{l+1}``:
the surrogate ``<f_l(h_l), a_{l+1}/rms(a_{l+1})>`` (plus ``penalty * ||f_l||^2`` where the rule
takes a penalty), the embedding by ``<h_0, a_0/rms(a_0)>``, the head by the cross-entropy on a
detached ``h_L``. For token and conv models a ``(batch, d)`` signal is broadcast over positions
(``model.broadcast``); a signal already shaped like the hidden state is used as it is. A
surrogate is the sum over features, averaged over batch and positions (for MLPs: the batch
mean of per-sample inner products, as in the reference).
"""
from __future__ import annotations

import copy
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_batch, check_choice
from ..fields import (Option, boolean, choice, fraction, fraction_open, nonnegative,  # noqa: F401
                      positive, positive_int, positive_int_or_none, positive_or_none)
from ..models.base import BlockModel

RMS_EPS = 1e-6  # the reference's floor when a credit signal is rms-normalised


# --------------------------------------------------------------------------------------------
# Shared pieces of the local rules
# --------------------------------------------------------------------------------------------

def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``e = softmax(logits) - onehot(y)`` ``(batch, C)`` (detached)."""
    with torch.no_grad():
        # a scattered 1 (F.one_hot reads y's range back to the host every step); the same values
        onehot = torch.zeros_like(logits).scatter_(-1, y.unsqueeze(-1), 1.0)
        return torch.softmax(logits, dim=-1) - onehot


def rms_normalise(a: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """``a / (rms(a) + eps)`` per sample, the rms taken over every non-batch entry."""
    dims = tuple(range(1, a.dim()))
    return a / (a.pow(2).mean(dim=dims, keepdim=True).sqrt() + eps)


def _spread(model: BlockModel, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(batch, d)`` signal broadcast over the positions of ``like``; a signal already shaped
    like ``like`` is returned as it is."""
    return a if a.shape == like.shape else model.broadcast(a, like)


def surrogate_output_grads(model: BlockModel, outputs: list[torch.Tensor], signals: list[torch.Tensor],
                           penalties: list[float], eps: float = RMS_EPS) -> list[torch.Tensor]:
    """The gradients of the local surrogates with respect to their outputs, in closed form.

    ``d/df [<f, a/rms(a)> + p ||f||^2] / n = (spread(a/rms(a)) + 2 p f) / n`` with ``n`` =
    batch * positions. Feeding these to one ``torch.autograd.backward`` call gives exactly the
    parameter gradients of the summed surrogates without building their graphs.
    """
    if signals and all(a.dim() == 2 and a.shape == signals[0].shape for a in signals):
        # (batch, d) signals: normalised in one batched op, not one small op chain per block
        s = torch.stack([a.detach() for a in signals])
        s = s / (s.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)
        if not any(penalties) and all(f.shape == s.shape[1:] for f in outputs):
            return list((s / s.shape[1]).unbind(0))  # (batch, d) outputs: divided by n at once
        normed = s.unbind(0)
    else:
        normed = [rms_normalise(a.detach(), eps) for a in signals]
    grads = []
    for f, a, p in zip(outputs, normed, penalties):
        n = f.shape[0] * model.positions(f)
        g = _spread(model, a, f)
        g = g / n if not p else (g + (2.0 * p) * f.detach()) / n
        grads.append(g)
    return grads


def local_surrogate(model: BlockModel, f: torch.Tensor, a: torch.Tensor, penalty: float = 0.0,
                    eps: float = RMS_EPS) -> torch.Tensor:
    """``<f, a/rms(a)> + penalty ||f||^2``, averaged over batch and positions (the loss whose
    gradient :func:`surrogate_output_grads` writes in closed form; for tests and readers)."""
    n = f.shape[0] * model.positions(f)
    loss = (f * _spread(model, rms_normalise(a.detach(), eps), f)).sum() / n
    if penalty:
        loss = loss + penalty * f.pow(2).sum() / n
    return loss


def backward_local(model: BlockModel, outputs: list[torch.Tensor], signals: list[torch.Tensor],
                   penalties: list[float]) -> None:
    """One backward of the local surrogates of ``outputs`` driven by ``signals``."""
    grads = surrogate_output_grads(model, outputs, signals, penalties)
    pairs = [(t, g) for t, g in zip(outputs, grads) if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def local_forward(model: BlockModel, x: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One forward with every block fed a detached input.

    Returns ``(h_0 with its graph into the embedding, [f_0 .. f_{L-1}] with graphs into their own
    blocks only, [h_0 .. h_L] detached)``.
    """
    h0 = model.embed(x)
    h = h0.detach()
    hiddens, branches = [h], []
    for l in range(model.num_blocks):
        h_next, f = model.step_and_branch(l, h)
        branches.append(f)
        h = h_next.detach()
        hiddens.append(h)
    return h0, branches, hiddens


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU when it has none)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------

# The registry: every rule class by name (filled by fa_study.rules and by register()).
RULES: dict[str, type["Method"]] = {}


class Method:
    """A learning rule. Subclasses set :attr:`name`, declare :attr:`OPTIONS` and implement
    :meth:`fill_grads` and :meth:`credit` (or derive from :class:`BlockLocal`).

    Life cycle: ``setup(model, num_classes, generator)`` once (the trainer calls it when
    :attr:`ready` is False), then ``fill_grads`` every step. ``fresh(generator)`` gives a copy
    with newly drawn feedback state (the fresh-feedback null). Options are validated in the
    constructor; they are attributes of the instance (``rule.penalty``) and :meth:`options`
    returns them as a dict.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "other"  # "bp", "block", "learned", "layer", "ra": tables and docs
    summary: ClassVar[str] = ""  # one line for tables and the control panel
    OPTIONS: ClassVar[dict[str, Option]] = {}
    LABELS: ClassVar[dict[str, str]] = {}  # option -> symbol shown in a run's label, e.g. λ
    takes_penalty: ClassVar[bool] = False  # the residual-branch penalty applies
    has_random_feedback: ClassVar[bool] = False  # the fresh-feedback null applies
    learns_feedback: ClassVar[bool] = False  # its feedback changes during training
    is_baseline: ClassVar[bool] = False  # no credit of its own (frozen, shallow)
    is_d3_baseline: ClassVar[bool] = False  # D3 compares every other rule's accuracy with this one's
    # Whether it needs the package's block interface (True: only fa_study.models.BlockModel, the
    # conservative default for a rule written against it) or trains any classifier nn.Module
    # (False: its training is the model's own forward and backward, e.g. BP and the layer rules).
    needs_blocks: ClassVar[bool] = True
    # what a model must offer this rule when needs_blocks, for the refusal's message
    model_requirement: ClassVar[str] = ("the block interface (embed / step / readout) of "
                                        "fa_study.models.BlockModel")
    # setup() takes hidden= (the trainer's HiddenStates: frozen freezes the modules between h_0 and h_L)
    takes_hidden_states: ClassVar[bool] = False

    def __new__(cls, *args: Any, **options: Any):
        # before any subclass's __init__: a positional argument would otherwise be Python's bare
        # "takes 1 positional argument but 2 were given"
        if args:
            first = next(iter(cls.OPTIONS.items()), None)
            example = (f"build_rule({cls.name!r}, {first[0]}={first[1].default!r})" if first
                       else f"build_rule({cls.name!r})")
            listed = ", ".join(repr(k) for k in cls.OPTIONS) or "none"
            raise ValueError(f"rule classes take keyword options only: {example}; allowed options of "
                             f"{cls.name!r}: {listed}; got positional argument(s) "
                             f"{', '.join(repr(a) for a in args)}")
        return super().__new__(cls)

    def __init__(self, **options: Any) -> None:
        self._options = self.check_options(options)
        for key, value in self._options.items():
            setattr(self, key, value)
        self._ready = False

    # ---- class-level questions -----------------------------------------------------------

    @classmethod
    def null_applies(cls, num_blocks: int) -> bool:
        """Whether the fresh-feedback null can read this rule on a model with ``num_blocks``
        blocks: it redraws the rule's random feedback, so some must be in use there."""
        return cls.has_random_feedback

    @classmethod
    def credit_uses_feedback(cls, options: dict[str, Any]) -> bool:
        """Whether, with ``options`` (the full checked options), the rule's random feedback enters
        the credit the fresh-feedback null reads (default: True; a variant whose feedback only
        rewrites weight gradients after BP's backward, as ungated layer DFA, says False)."""
        return True

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The full option dict (defaults filled in), or ValueError naming what is wrong."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            listed = ", ".join(repr(k) for k in cls.OPTIONS) or "none"
            raise ValueError(f"rule {cls.name!r} has no option {unknown[0]!r}; allowed options: {listed}")
        out = {}
        for key, opt in cls.OPTIONS.items():
            value = options.get(key, opt.default)
            out[key] = opt.check(key, value) if (key in options or value is not None) else value
        return out

    @classmethod
    def check_run(cls, options: dict[str, Any], model: nn.Module, num_classes: int, train_cfg) -> None:
        """ValueError for anything :meth:`setup` or training would refuse about a run, decided
        before it runs (:class:`fa_study.runs.RunSpec` calls it when built): ``options`` are the
        full checked options, ``model`` the run's model on the meta device (shapes only; do not
        modify it), ``num_classes`` the data's class count, ``train_cfg`` the
        :class:`~fa_study.train.TrainConfig`. Default: nothing beyond the options' own checks."""

    @classmethod
    def fits(cls, model: nn.Module) -> bool:
        """Whether this rule can train ``model``, asked of the model itself (default: any of
        the package's block models). ``model`` may live on the meta device."""
        return isinstance(model, BlockModel) or not cls.needs_blocks

    @classmethod
    def supports(cls, arch: str) -> bool:
        """Whether this rule can train the package's architecture ``arch`` (asked of the
        architecture's model, built on the meta device)."""
        from ..models import meta_model

        return cls.fits(meta_model(arch))

    @classmethod
    def check_trainable(cls, model: nn.Module) -> None:
        """ValueError unless this rule can train ``model``, naming the rule, what the model
        lacks and the rules that can train it."""
        if cls.fits(model):
            return
        arch = getattr(model, "arch", None)
        kind = f"a {arch!r} model" if arch else type(model).__name__
        able = ", ".join(n for n, c in RULES.items() if c.fits(model))
        raise ValueError(f"rule {cls.name!r} cannot train {kind}: it needs {cls.model_requirement}, "
                         f"which {arch or kind} does not have. Rules that train it: {able or 'none'}")

    @classmethod
    def check_arch(cls, arch: str) -> None:
        """ValueError naming the rule, the architecture and the architectures it supports."""
        from ..models import arch_names

        if not cls.supports(arch):
            able = ", ".join(repr(a) for a in arch_names() if cls.supports(a))
            raise ValueError(f"rule {cls.name!r} cannot train a {arch!r} model; it supports: {able}")

    @classmethod
    def label_for(cls, options: dict[str, Any]) -> str:
        """A run's label: the name plus the options in :attr:`LABELS` that differ from their
        default, e.g. ``dfa λ=0.01``."""
        parts = [cls.name]
        for key, symbol in cls.LABELS.items():
            value = options.get(key, cls.OPTIONS[key].default)
            if value != cls.OPTIONS[key].default:
                parts.append(f"{symbol}={value:g}" if isinstance(value, float) else f"{symbol}={value}")
        return " ".join(parts)

    # ---- life cycle ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once :meth:`setup` has run."""
        return self._ready

    def setup(self, model: BlockModel, num_classes: int, generator: torch.Generator, *,
              train_cfg=None) -> None:
        """Create the feedback state for ``model`` (drawn from ``generator``). ``train_cfg``
        (the trainer's :class:`~fa_study.train.TrainConfig`) lets a rule match its feedback's
        step to the optimizer's (Kolen-Pollack). Refuses (ValueError) a model the rule cannot
        train (:meth:`check_trainable`)."""
        self.check_trainable(model)
        self._ready = True

    def check_model(self, model: nn.Module, num_classes: int | None = None) -> None:
        """ValueError unless the state :meth:`setup` made fits ``model`` (and data of
        ``num_classes`` classes): the trainer asks a rule that is already set up before it trains
        with it. Default: nothing to check (BP and its baselines keep no shapes)."""

    def fresh(self, generator: torch.Generator) -> "Method":
        """A copy with the same options and newly drawn feedback state."""
        self._require_ready("fresh")
        return copy.deepcopy(self)

    def model_kwargs(self) -> dict[str, Any]:
        """Keywords for :func:`fa_study.models.build_model` this rule needs (shallow: no blocks)."""
        return {}

    def options(self) -> dict[str, Any]:
        """The rule's options, for history columns and cache keys."""
        return dict(self._options)

    def label(self) -> str:
        return self.label_for(self._options)

    def state(self) -> dict[str, float]:
        """Cheap read-outs of the feedback state for the per-epoch history (one host sync)."""
        return {}

    def feedback_quality(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """How close the feedback is to the one that would make its credit BP's (may cost
        several forward-mode passes; the trainer calls it only when asked)."""
        return {}

    def _require_ready(self, call: str) -> None:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}.{call}() needs the feedback state: call "
                               f"rule.setup(model, num_classes, generator) first")

    # ---- the two jobs --------------------------------------------------------------------

    def fill_grads(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the ``.grad`` of every trainable parameter for the batch ``x``, ``y`` ``(batch,)``.

        Returns ``(mean cross-entropy as a detached 0-dim tensor, logits (batch, C) detached)``.
        """
        raise NotImplementedError

    def credit(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The credit signals ``[a_0, ..., a_L]``, each shaped like ``h_l`` (detached)."""
        raise NotImplementedError

    def credit_at(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, states) -> list[torch.Tensor]:
        """The credit at the hidden states ``states`` reads (a
        :class:`fa_study.diagnostics.HiddenStates`): what the diagnostics call. Default: the
        block interface's :meth:`credit`; rules whose credit is the model's own backward (BP,
        the layer rules) read it at any network's hidden states."""
        return self.credit(model, x, y)

    # ---- parameters ----------------------------------------------------------------------

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters this rule trains (those with ``requires_grad``)."""
        return [p for p in model.parameters() if p.requires_grad]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups ``{"params", "name", "clip"}``: embed, block0..block{L-1},
        head, other. ``clip`` marks the groups the trainer's per-block clipping acts on."""
        trainable = {id(p): p for p in self.trainable_parameters(model)}
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()

        def add(name: str, params, clip: bool) -> None:
            ps = [p for p in params if id(p) in trainable and id(p) not in seen]
            seen.update(id(p) for p in ps)
            if ps:
                groups.append({"params": ps, "name": name, "clip": clip})

        if isinstance(model, BlockModel):
            add("embed", model.embed_parameters(), False)
            for l in range(model.num_blocks):
                add(f"block{l}", model.block_parameters(l), True)
            add("head", model.head_parameters(), False)
        add("other", trainable.values(), not isinstance(model, BlockModel))
        return groups

    def _zero_grads(self, model: nn.Module) -> None:
        for p in self.trainable_parameters(model):
            p.grad = None

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


# --------------------------------------------------------------------------------------------
# Block-local rules: fill_grads and credit written once
# --------------------------------------------------------------------------------------------

class CreditContext:
    """What a block-local rule may read to form its signals for one batch.

    ``hiddens``: ``[h_0 .. h_L]`` detached; ``logits`` ``(batch, C)``; ``a_top``: the true
    gradient of the mean cross-entropy at ``pool(h_L)`` ``(batch, d)``; ``e``: the output error
    ``softmax - onehot`` ``(batch, C)``; ``bp_grads``: the BP gradients ``g_l = dL/dh_l``
    (computed on first use: an extra forward and backward).
    """

    def __init__(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor,
                 hiddens: list[torch.Tensor], logits: torch.Tensor, a_top: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.hiddens, self.logits, self.a_top = hiddens, logits, a_top

    @cached_property
    def e(self) -> torch.Tensor:
        return output_error(self.logits, self.y)

    @cached_property
    def bp_grads(self) -> list[torch.Tensor]:
        from ..diagnostics import bp_reference

        return bp_reference(self.model, self.x, self.y)[1]


class BlockLocal(Method):
    """Base of every rule that trains each block through a local surrogate.

    ``fill_grads`` runs ONE forward with autograd on, each block fed a detached copy of its
    input (so every local loss backpropagates only inside its block), one small backward of the
    head's cross-entropy (which also gives ``a_top``), then one backward of all the surrogates
    with their output gradients fed in closed form. Subclasses implement :meth:`signals` and,
    when the feedback learns, :meth:`learn`.
    """

    family = "block"
    uses_bp_grads: ClassVar[bool] = False  # signals read ctx.bp_grads: computed before the forward

    def signals(self, model: BlockModel, ctx: CreditContext) -> list[torch.Tensor]:
        """``[a_0 .. a_L]``: each ``(batch, d)`` (broadcast over positions) or shaped like ``h_l``."""
        raise NotImplementedError

    def learn(self, model: BlockModel, ctx: CreditContext) -> None:
        """Update learned feedback after the gradients are written (default: nothing)."""

    def check_model(self, model: BlockModel, num_classes: int | None = None) -> None:
        """Raise when ``model`` does not match the shapes the rule was set up for."""
        self._require_ready("fill_grads")

    def _penalties(self, model: BlockModel) -> list[float]:
        p = float(getattr(self, "penalty", 0.0)) if self.takes_penalty else 0.0
        return [0.0] + [p] * model.num_blocks

    def fill_grads(self, model, x, y):
        self.check_model(model)
        check_batch(x, y)
        self._zero_grads(model)
        # the BP reference restores BatchNorm's running statistics in place: it must run before
        # the forward whose graph the surrogates' backward still needs
        bp_grads = CreditContext(model, x, y, [], None, None).bp_grads if self.uses_bp_grads else None
        h0, branches, hiddens = local_forward(model, x)
        z = model.pool(hiddens[-1]).detach().requires_grad_(True)
        logits = model.classify(z)
        loss = F.cross_entropy(logits, y)
        loss.backward()  # the head's gradients and a_top = dCE/d pool(h_L)
        ctx = CreditContext(model, x, y, hiddens, logits.detach(), z.grad.detach())
        if bp_grads is not None:
            ctx.__dict__["bp_grads"] = bp_grads
        a = self.signals(model, ctx)
        backward_local(model, [h0] + branches, a, self._penalties(model))
        self.learn(model, ctx)
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        self.check_model(model)
        with torch.no_grad():
            _, hiddens = model(x, return_hidden=True)
        with torch.enable_grad():
            z = model.pool(hiddens[-1]).detach().requires_grad_(True)
            logits = model.classify(z)
            a_top, = torch.autograd.grad(F.cross_entropy(logits, y), z)
        ctx = CreditContext(model, x, y, hiddens, logits.detach(), a_top.detach())
        with torch.no_grad():
            a = self.signals(model, ctx)
            return [_spread(model, a_l, h).detach() for a_l, h in zip(a, hiddens)]


def check_class_count(rule: Method, set_up_for: int, model: nn.Module, num_classes: int | None) -> None:
    """ValueError naming the rule and both class counts when its feedback, drawn for
    ``set_up_for`` classes, would meet a model (``model.num_classes``) or data (``num_classes``)
    of another count."""
    for what, count in (("the model has num_classes", getattr(model, "num_classes", None)),
                        ("the data has", num_classes)):
        if count is not None and int(count) != int(set_up_for):
            raise ValueError(f"rule {rule.name!r} was set up for {set_up_for} classes (its feedback "
                             f"reads the {set_up_for}-dim output error) but {what} {count}"
                             f"{'' if 'num_classes' in what else ' classes'}; set it up again for "
                             f"this model (rule.setup(model, {count}, generator)) or build a new rule "
                             f"(build_rule({rule.name!r}, ...)), which train() sets up itself")


def check_dims(rule: Method, dims: tuple[int, int, int], model: nn.Module) -> None:
    """ValueError naming the rule and both shapes when ``model``'s width and block count are not
    those of ``dims`` ``(d, C, L)``, the shapes its feedback was drawn for."""
    if (model.width, model.num_blocks) != (dims[0], dims[2]):
        raise ValueError(f"{rule.name} was set up for d={dims[0]}, L={dims[2]} but the model has "
                         f"d={model.width}, L={model.num_blocks}; call setup again")


def draw_seed(generator: torch.Generator) -> int:
    """A seed for a rule's own noise generator, drawn from the setup generator."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def device_generator(seed: int, device: torch.device, current: torch.Generator | None) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (``current`` reused when it lives there)."""
    if current is None or current.device != device:
        return torch.Generator(device=device).manual_seed(seed)
    return current


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

def register(cls: type[Method], *, replace: bool = False) -> type[Method]:
    """Add a rule class to :data:`RULES` under ``cls.name`` (usable as a class decorator).

    Refuses a class that is not a :class:`Method`, has no name, or whose name is taken by
    another class (unless ``replace``: re-running a notebook cell that defines the rule).
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"register() takes a subclass of fa_study.rules.Method, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' (its registry key)")
    have = RULES.get(cls.name)
    if have is not None and have is not cls and not (replace or have.__qualname__ == cls.__qualname__):
        raise ValueError(f"a rule named {cls.name!r} is already registered ({have.__module__}."
                         f"{have.__qualname__}); pick another name or pass replace=True")
    RULES[cls.name] = cls
    return cls


def get_rule(name: str) -> type[Method]:
    """The class registered as ``name`` (ValueError listing the registered names otherwise)."""
    check_choice("rule", name, tuple(RULES))
    return RULES[name]


def build_rule(name: str, **options) -> Method:
    """Build the rule ``name`` with ``options`` (checked against ``RULES[name].OPTIONS``)."""
    return get_rule(name)(**options)
