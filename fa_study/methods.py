"""Block-level learning rules behind one :class:`Method` interface.

A Method owns its feedback state and does two things for any :class:`~fa_study.models.BlockModel`:

* ``fill_grads(model, x, y)`` writes every trainable parameter's ``.grad`` for one batch;
  one AdamW (built from ``param_groups``) then steps them all;
* ``credit(model, x, y)`` returns the signals ``a_0 .. a_L`` at ``h_0 .. h_L`` the rule would
  use, each shaped like ``h_l``, so every diagnostic works for every rule.

Indexing follows the block interface: ``h_0 = embed(x)``, ``h_{l+1} = step(l, h_l)``,
``logits = readout(h_L)``. Block ``l`` is trained by the credit at its *output* ``h_{l+1}``.

=========  ======================================================================================
rule       what trains what
=========  ======================================================================================
bp         autograd of the mean cross-entropy through everything
fa         block FA: ``a_L = dCE/d pool(h_L)`` through the head (the true head gradient), then
           ``a_l = a_{l+1} B_l`` with fixed random ``B_l`` ``(d, d)`` scaled ``1/sqrt(d)``; block
           ``l`` by the surrogate ``<f_l(h_l), a_{l+1}/rms(a_{l+1})>``, the embedding by
           ``<h_0, a_0/rms(a_0)>``, the head by CE on a detached ``h_L``
dfa        ``e = softmax(logits) - onehot(y)``; ``a_0 = e B_0^T``, ``a_{l+1} = e B_l^T`` with
           ``B_l`` ``(d, C)`` scaled ``1/sqrt(C)``; surrogates and head as for fa
frozen     only embedding and head train (by BP through the random blocks); block parameters
           are frozen and BatchNorm inside blocks stays in eval mode
shallow    BP on a model built with ``num_blocks=0`` (see :meth:`Method.model_kwargs`)
layer      a model converted by :func:`fa_study.feedback.convert` (``rule=`` any layer-level rule):
           autograd through the local layers plus their post-backward updates
=========  ======================================================================================

For token and conv models a ``(batch, d)`` signal is broadcast over positions
(``model.broadcast``), and a surrogate is the sum over features, averaged over batch and
positions: ``sum(f * a_b) / (batch * positions)`` (for MLPs: the batch mean of per-sample inner
products, as in the reference). The optional residual-branch penalty of fa/dfa,
``penalty * ||f_l(h_l)||^2``, is normalised the same way, so for MLPs it is the batch mean of
per-sample squared norms (the reference's ``lam * (f**2).sum(-1).mean()``) and its balance
against the surrogate does not depend on the number of positions.

Speed: fa and dfa run ONE forward pass with autograd on, each block fed a detached copy of its
input, so every local loss backpropagates only inside its block; one backward of the summed
local losses (plus the head's CE) then fills every gradient. No block is evaluated twice, and
the surrogates' gradients with respect to the block outputs are fed in closed form
(:func:`surrogate_output_grads`) instead of building a small graph per block.
"""
from __future__ import annotations

import copy
import math
import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_choice
from .models.base import BlockModel

METHODS: tuple[str, ...] = ("bp", "fa", "dfa", "frozen", "shallow", "layer")
RMS_EPS = 1e-6  # the reference's floor when a credit signal is rms-normalised


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

def bp_gradients(model: BlockModel, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The BP reference: ``(hiddens h_0..h_L, grads g_l = dL/dh_l, logits)``, all detached.

    ``L`` is the mean cross-entropy; gradients come from ``torch.autograd.grad`` through the
    model's own ``step`` and ``readout``, so they are those of the network that is trained.
    Parameter ``.grad`` fields are left untouched.
    """
    with torch.enable_grad():
        h = model.embed(x).detach().requires_grad_(True)
        hiddens = [h]
        for l in range(model.num_blocks):
            h = model.step(l, h)
            hiddens.append(h)
        logits = model.readout(h)
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, hiddens)
    return [t.detach() for t in hiddens], [g.detach() for g in grads], logits.detach()


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``e = softmax(logits) - onehot(y)`` ``(batch, C)`` (detached)."""
    with torch.no_grad():
        return torch.softmax(logits, dim=-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)


def rms_normalise(a: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """``a / (rms(a) + eps)`` per sample, for ``a`` ``(batch, d)``."""
    return a / (a.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)


def local_surrogate(model: BlockModel, f: torch.Tensor, a: torch.Tensor,
                    penalty: float = 0.0, eps: float = RMS_EPS) -> torch.Tensor:
    """``<f, a/rms(a)> + penalty ||f||^2``, averaged over batch and positions.

    Args:
        f: a branch output or ``h_0``, shaped like a hidden state.
        a: the credit signal ``(batch, d)`` (no gradient flows into it).
        penalty: weight of the residual-branch penalty.
    """
    n = f.shape[0] * model.positions(f)
    a_b = model.broadcast(rms_normalise(a.detach(), eps), f)
    loss = (f * a_b).sum() / n
    if penalty:
        loss = loss + penalty * f.pow(2).sum() / n
    return loss


def surrogate_output_grads(model: BlockModel, outputs: list[torch.Tensor], signals: list[torch.Tensor],
                           penalties: list[float], eps: float = RMS_EPS) -> list[torch.Tensor]:
    """The gradients of :func:`local_surrogate` with respect to its outputs, in closed form.

    ``d/df [<f, a/rms(a)> + p ||f||^2] / n = (broadcast(a/rms(a)) + 2 p f) / n`` with ``n`` =
    batch * positions. Feeding these to one ``torch.autograd.backward`` call gives exactly the
    parameter gradients of the summed surrogates without building their graphs (the signals are
    normalised in one batched op, not one small op chain per block).
    """
    normed = rms_normalise(torch.stack([a.detach() for a in signals]), eps).unbind(0)
    grads = []
    for f, a, p in zip(outputs, normed, penalties):
        n = f.shape[0] * model.positions(f)
        g = model.broadcast(a, f)
        g = g / n if not p else (g + (2.0 * p) * f.detach()) / n
        grads.append(g)
    return grads


def _backward_local(model: BlockModel, outputs: list[torch.Tensor], signals: list[torch.Tensor],
                    penalties: list[float], extra: torch.Tensor | None = None) -> None:
    """One backward of the local surrogates (and ``extra``, a scalar loss, when given)."""
    grads = surrogate_output_grads(model, outputs, signals, penalties)
    tensors = [t for t in outputs if t.requires_grad]
    grads = [g for t, g in zip(outputs, grads) if t.requires_grad]
    if extra is not None:
        tensors.append(extra)
        grads.append(torch.ones_like(extra))
    if tensors:
        torch.autograd.backward(tensors, grads)


def _local_forward(model: BlockModel, x: torch.Tensor):
    """One forward with each block fed a detached input.

    Returns ``(h_0 with its graph into the embedding, [f_0..f_{L-1}] with graphs into their
    blocks only, h_L detached)``.
    """
    h0 = model.embed(x)
    h = h0.detach()
    branches = []
    for l in range(model.num_blocks):
        h_next, f = model.step_and_branch(l, h)
        branches.append(f)
        h = h_next.detach()
    return h0, branches, h


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    for key in options:
        if key not in allowed:
            listed = ", ".join(repr(a) for a in allowed) or "none"
            raise ValueError(f"method {name!r} has no option {key!r}; allowed options: {listed}")


def _check_nonnegative_float(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------

class Method:
    """A learning rule. Subclasses implement :meth:`fill_grads` and :meth:`credit`.

    Life cycle: ``setup(model, num_classes, generator)`` once (the trainer calls it when
    :attr:`ready` is False), then ``fill_grads`` every step. ``fresh(generator)`` gives a copy
    with newly drawn feedback state (the fresh-feedback null).
    """

    name: str = "method"

    def __init__(self) -> None:
        self._ready = False

    # ---- life cycle ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once :meth:`setup` has run."""
        return self._ready

    def setup(self, model: BlockModel, num_classes: int, generator: torch.Generator) -> None:
        """Create the feedback state for ``model`` (drawn from ``generator``)."""
        self._ready = True

    def fresh(self, generator: torch.Generator) -> "Method":
        """A copy with the same options and newly drawn feedback state (set up for the same shapes)."""
        self._require_ready("fresh")
        return copy.deepcopy(self)

    def model_kwargs(self) -> dict[str, Any]:
        """Keywords for :func:`fa_study.models.build_model` this rule needs (shallow: no blocks)."""
        return {}

    def options(self) -> dict[str, Any]:
        """The rule's options, for history columns and cache keys."""
        return {}

    def _require_ready(self, call: str) -> None:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}.{call}() needs the feedback state: call "
                               f"method.setup(model, num_classes, generator) first")

    # ---- the two jobs --------------------------------------------------------------------

    def fill_grads(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the ``.grad`` of every trainable parameter for the batch ``x``, ``y`` ``(batch,)``.

        Returns ``(mean cross-entropy as a detached 0-dim tensor, logits (batch, C) detached)``;
        never synchronises with the host.
        """
        raise NotImplementedError

    def credit(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The credit signals ``[a_0, ..., a_L]``, each shaped like ``h_l`` (detached)."""
        raise NotImplementedError

    # ---- parameters ----------------------------------------------------------------------

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters this rule trains (those with ``requires_grad``)."""
        return [p for p in model.parameters() if p.requires_grad]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW parameter groups ``{"params", "name", "clip"}``: embed, block0..block{L-1}, head,
        other (anything else). ``clip`` marks the groups the trainer's per-block clipping acts on.
        Empty groups are left out."""
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
# Backpropagation and its baselines
# --------------------------------------------------------------------------------------------

class BP(Method):
    """Backpropagation: autograd of the mean cross-entropy; its credit is the true gradient."""

    name = "bp"

    def fill_grads(self, model, x, y):
        self._zero_grads(model)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        return bp_gradients(model, x, y)[1]


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` replacement for BatchNorm in frozen blocks: always eval (running stats fixed)."""
    return nn.Module.train(self, False)


class Frozen(BP):
    """Frozen random blocks: only the embedding and the head train (by BP through the blocks).

    :meth:`setup` sets ``requires_grad=False`` on every block parameter and pins BatchNorm
    inside the blocks to eval mode, so ``model.train()`` can no longer update their running
    statistics: the blocks stay bit-identical to their initialisation.
    """

    name = "frozen"

    def setup(self, model, num_classes, generator):
        for l in range(model.num_blocks):
            for p in model.block_parameters(l):
                p.requires_grad_(False)
        for m in model.blocks.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train = types.MethodType(_stay_in_eval, m)
                m.eval()
        super().setup(model, num_classes, generator)


class Shallow(BP):
    """The shallow baseline: BP on a model with no blocks (build it with :meth:`model_kwargs`)."""

    name = "shallow"

    def model_kwargs(self):
        return {"num_blocks": 0}

    def setup(self, model, num_classes, generator):
        if model.num_blocks != 0:
            raise ValueError(f"the shallow baseline needs a model with num_blocks=0, got "
                             f"num_blocks={model.num_blocks}; build it with "
                             f"build_model(arch, **method.model_kwargs())")
        super().setup(model, num_classes, generator)


# --------------------------------------------------------------------------------------------
# Block-local rules
# --------------------------------------------------------------------------------------------

class _LocalRule(Method):
    """Shared machinery of fa and dfa: fixed random matrices ``B``, the penalty, the surrogates."""

    def __init__(self, penalty: float = 0.0):
        super().__init__()
        self.penalty = _check_nonnegative_float("penalty", penalty)
        self.B: list[torch.Tensor] = []
        self._dims: tuple[int, int, int] | None = None  # (d, C, L)
        self._device: torch.device | None = None

    def options(self):
        return {"penalty": self.penalty}

    def _draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        raise NotImplementedError

    def setup(self, model, num_classes, generator):
        self._dims = (model.width, int(num_classes), model.num_blocks)
        try:
            self._device = next(model.parameters()).device
        except StopIteration:
            self._device = torch.device("cpu")
        self.B = [b.to(self._device) for b in self._draw(generator)]
        super().setup(model, num_classes, generator)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new.B = [b.to(self._device) for b in self._draw(generator)]
        return new

    def _check_model(self, model: BlockModel) -> None:
        self._require_ready("fill_grads")
        if (model.width, model.num_blocks) != (self._dims[0], self._dims[2]):
            raise ValueError(f"{self.name} was set up for d={self._dims[0]}, L={self._dims[2]} but the "
                             f"model has d={model.width}, L={model.num_blocks}; call setup again")


class FA(_LocalRule):
    """Block-level feedback alignment (see the module docstring)."""

    name = "fa"

    def _draw(self, generator):
        d, _, num_blocks = self._dims
        return [torch.randn(d, d, generator=generator) / math.sqrt(d) for _ in range(num_blocks)]

    def _products(self) -> torch.Tensor:
        """``[P_0 | P_1 | ... | P_{L-1}]`` ``(d, L*d)`` with ``P_l = B_{L-1} ... B_l``, so that
        ``a_l = a_L P_l``: all the signals of a step in one matrix product instead of L chained
        ones. Recomputed only when a feedback matrix is replaced or changed in place."""
        cached = getattr(self, "_products_key", None)  # (the B tensors themselves, their versions)
        if cached is None or len(cached[0]) != len(self.B) \
                or any(c is not b for c, b in zip(cached[0], self.B)) \
                or cached[1] != tuple(b._version for b in self.B):
            prods, p = [], None
            for b in reversed(self.B):
                p = b if p is None else p @ b
                prods.append(p)
            self._products_cache = torch.cat(prods[::-1], dim=1)
            self._products_key = (tuple(self.B), tuple(b._version for b in self.B))
        return self._products_cache

    def _pass_down(self, a_top: torch.Tensor) -> list[torch.Tensor]:
        """``[a_0, ..., a_L]`` ``(batch, d)`` from ``a_L`` through ``a_l = a_{l+1} B_l``."""
        if not self.B:
            return [a_top]
        return list((a_top @ self._products()).split(a_top.shape[-1], dim=-1)) + [a_top]

    def fill_grads(self, model, x, y):
        self._check_model(model)
        self._zero_grads(model)
        h0, branches, h_top = _local_forward(model, x)
        z = model.pool(h_top).detach().requires_grad_(True)
        logits = model.classify(z)
        loss = F.cross_entropy(logits, y)
        loss.backward()  # head gradients and a_L = dCE/dz
        a = self._pass_down(z.grad.detach())
        _backward_local(model, [h0] + branches, a, [0.0] + [self.penalty] * len(branches))
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        self._check_model(model)
        with torch.no_grad():
            _, hiddens = model(x, return_hidden=True)
        with torch.enable_grad():
            z = model.pool(hiddens[-1]).detach().requires_grad_(True)
            a_top, = torch.autograd.grad(F.cross_entropy(model.classify(z), y), z)
        a = self._pass_down(a_top)
        return [model.broadcast(a_l, h).detach() for a_l, h in zip(a, hiddens)]


class DFA(_LocalRule):
    """Direct feedback alignment at block level (see the module docstring)."""

    name = "dfa"

    def _draw(self, generator):
        d, c, num_blocks = self._dims
        # a model without blocks still trains its embedding through B_0
        return [torch.randn(d, c, generator=generator) / math.sqrt(c) for _ in range(max(num_blocks, 1))]

    def _signals(self, e: torch.Tensor) -> list[torch.Tensor]:
        """``[a_0, a_1, ..., a_L]`` ``(batch, d)``: ``a_0 = e B_0^T``, ``a_{l+1} = e B_l^T``."""
        d = self.B[0].shape[0]
        a = (e @ torch.cat(self.B, dim=0).t()).split(d, dim=-1)  # one product for all blocks
        return [a[0]] + list(a[: self._dims[2]])

    def fill_grads(self, model, x, y):
        self._check_model(model)
        self._zero_grads(model)
        h0, branches, h_top = _local_forward(model, x)
        logits = model.readout(h_top)
        loss = F.cross_entropy(logits, y)
        a = self._signals(output_error(logits, y))
        # one backward: the head's cross-entropy plus every local surrogate
        _backward_local(model, [h0] + branches, a, [0.0] + [self.penalty] * len(branches), extra=loss)
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        self._check_model(model)
        with torch.no_grad():
            logits, hiddens = model(x, return_hidden=True)
            a = self._signals(output_error(logits, y))
            return [model.broadcast(a_l, h) for a_l, h in zip(a, hiddens)]


# --------------------------------------------------------------------------------------------
# Layer-level rules from fa_study.feedback
# --------------------------------------------------------------------------------------------

class LayerRule(Method):
    """Layer-level rules of :mod:`fa_study.feedback` through the Method interface.

    :meth:`setup` converts the model in place with :func:`fa_study.feedback.convert` (unless it
    already holds local layers, e.g. converted by the caller with custom options): every
    ``nn.Linear`` / ``nn.Conv2d`` runs ``rule``, everything else stays on BP. ``dfa`` layers get
    targets of size ``num_classes``, ``dfa_block`` layers of size ``model.width``.
    :meth:`fill_grads` is autograd through the local layers followed by the one post-backward
    call :func:`fa_study.feedback.feedback_step`.

    ``credit`` is the gradient that the converted model's own backward delivers at each
    ``h_l``, i.e. the signal the rule propagates. For ``dfa`` / ``dfa_block``, whose weight
    gradients are replaced after an ordinary backward, that backward is BP's, so their credit
    reads as the BP gradient. The feedback state lives in the model's layers: a :meth:`fresh`
    copy reads its credit on a copy of the model with newly drawn feedback.

    Args:
        rule: one of :data:`fa_study.feedback.METHODS`.
        conv_method: rule for convolutions (see :func:`fa_study.feedback.convert`).
        **rule_options: :class:`fa_study.feedback.RuleOptions` fields (``fa_init_mode``, ``lr_b``, ...).
    """

    name = "layer"

    def __init__(self, rule: str = "fa", *, conv_method: str | None = None, **rule_options):
        super().__init__()
        from . import feedback

        check_choice("layer rule", rule, feedback.METHODS)
        if conv_method is not None:
            check_choice("conv_method", conv_method, feedback.CONV_METHODS)
        feedback.RuleOptions(**rule_options).validate(rule)  # bad options fail here, not in setup
        self.rule, self.conv_method = rule, conv_method
        self.rule_options = dict(rule_options)
        self._step_seed = 0
        self._num_classes = None
        self._fresh_seed: int | None = None
        self._step_generator: torch.Generator | None = None

    def options(self):
        return {"rule": self.rule, "conv_method": self.conv_method, **self.rule_options}

    def setup(self, model, num_classes, generator):
        from . import feedback

        if not feedback.local_layers(model):
            feedback.convert(model, self.rule, conv_method=self.conv_method, generator=generator,
                             dfa_target_dim=num_classes if self.rule == "dfa" else None,
                             dfa_block_dim=model.width if self.rule == "dfa_block" else None,
                             **self.rule_options)
        self._num_classes = int(num_classes)
        # the noise of weight mirrors and GrAPE probes comes from a generator seeded here
        self._step_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._step_generator = None
        super().setup(model, num_classes, generator)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new._fresh_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return new

    def fill_grads(self, model, x, y):
        from . import feedback

        self._require_ready("fill_grads")
        self._zero_grads(model)
        logits = model(x)
        needs_e = feedback.needs_output_error(model)
        if needs_e:
            logits.retain_grad()
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if feedback.has_feedback_step(model):
            feedback.feedback_step(model, e=logits.grad if needs_e else None,
                                   generator=self._generator(logits.device))
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        self._require_ready("credit")
        if self._fresh_seed is not None:
            model = self._redrawn_copy(model)
        return bp_gradients(model, x, y)[1]

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._step_generator is None or self._step_generator.device != device:
            self._step_generator = torch.Generator(device=device).manual_seed(self._step_seed)
        return self._step_generator

    def _redrawn_copy(self, model: nn.Module) -> nn.Module:
        from . import feedback

        twin = copy.deepcopy(model)
        g = torch.Generator().manual_seed(self._fresh_seed)
        for _, layer in feedback.local_layers(twin):
            if layer.B is not None:
                layer.reset_feedback(generator=g)
        if any(layer.B_dfa is not None for _, layer in feedback.local_layers(twin)):
            feedback.initialize_dfa_targets(twin, self._num_classes, generator=g)
        return twin


# --------------------------------------------------------------------------------------------
# Construction by name
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "bp": (BP, ()),
    "fa": (FA, ("penalty",)),
    "dfa": (DFA, ("penalty",)),
    "frozen": (Frozen, ()),
    "shallow": (Shallow, ()),
}


def build_method(name: str, **options) -> Method:
    """Build the rule ``name`` (one of :data:`METHODS`) with its options.

    ``fa`` and ``dfa`` take ``penalty`` (the residual-branch penalty weight, default 0);
    ``layer`` takes ``rule`` (default ``"fa"``), ``conv_method`` and the
    :class:`fa_study.feedback.RuleOptions` fields, e.g. ``build_method("layer", rule="kolen_pollack")``.
    """
    check_choice("method", name, METHODS)
    if name == "layer":
        return LayerRule(**options)  # its options are checked against fa_study.feedback
    cls, allowed = _BUILDERS[name]
    _check_options(name, options, allowed)
    return cls(**options)
