"""Backpropagation, its baselines, and the block-level feedback rules.

=========  ======================================================================================
rule       what trains what
=========  ======================================================================================
bp         autograd of the mean cross-entropy through everything
frozen     only embedding and head train (by BP through the random blocks); block parameters are
           frozen and BatchNorm inside blocks stays in eval mode. On any network: the blocks
           are the modules between h_0 and h_L (fa_study.diagnostics.find_hidden_states)
shallow    BP on a model built with ``num_blocks=0`` (see :meth:`Method.model_kwargs`)
fa         block FA: ``a_L = dCE/d pool(h_L)`` through the head (the true head gradient), then
           ``a_l = a_{l+1} B_l`` with fixed random ``B_l`` ``(d, d)`` scaled ``1/sqrt(d)``
dfa        ``e = softmax(logits) - onehot(y)``; ``a_0 = e B_0^T``, ``a_{l+1} = e B_l^T`` with
           ``B_l`` ``(d, C)`` scaled ``1/sqrt(C)`` (Nokland 2016 at block level, as reference 003)
oracle     the same block-local training with the exact BP gradient as credit (``a_l = g_l``):
           not a plausible rule but the ceiling of every rule that trains blocks through these
           surrogates (they normalise each sample's credit, so even a perfect direction does
           not give BP's update)
=========  ======================================================================================

fa, dfa and oracle are :class:`~fa_study.rules.base.BlockLocal` rules: block ``l`` follows the
surrogate ``<f_l(h_l), a_{l+1}/rms(a_{l+1})> + penalty ||f_l||^2``, the embedding
``<h_0, a_0/rms(a_0)>``, the head the cross-entropy on a detached ``h_L``.
"""
from __future__ import annotations

import copy
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_batch
from .base import (BlockLocal, CreditContext, Method, Option, check_class_count,
                   check_dims, model_device, model_dtype, nonnegative)

PENALTY = Option(0.0, nonnegative, "weight λ of the residual-branch penalty λ·||f_l(h_l)||²")


class BP(Method):
    """Backpropagation: autograd of the mean cross-entropy; its credit is the true gradient."""

    name = "bp"
    family = "bp"
    summary = "backpropagation (autograd)"
    needs_blocks = False  # autograd of the model's own forward: any classifier nn.Module

    def fill_grads(self, model, x, y):
        self._require_ready("fill_grads")
        check_batch(x, y)
        self._zero_grads(model)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        return self.credit_at(model, x, y, None)

    def credit_at(self, model, x, y, states):
        from ..diagnostics import bp_reference

        return bp_reference(model, x, y, hidden=states)[1]


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` replacement for BatchNorm in frozen blocks: always eval (running stats fixed)."""
    return nn.Module.train(self, False)


class Frozen(BP):
    """Frozen random blocks: everything else trains by BP through them (D3's baseline).

    The blocks are the modules between ``h_0`` and ``h_L``
    (:meth:`fa_study.diagnostics.HiddenStates.block_modules`): a package model's ``blocks``, the
    blocks found in a network of another layout, or those between the states named with
    ``hidden=[...]``. :meth:`setup` sets ``requires_grad=False`` on their parameters and pins
    BatchNorm inside them to eval mode, so ``model.train()`` can no longer update their running
    statistics: the blocks stay bit-identical to their initialisation.
    """

    name = "frozen"
    family = "baseline"
    summary = "frozen random blocks; embedding and head by BP (D3's baseline)"
    is_baseline = True
    is_d3_baseline = True
    takes_hidden_states = True

    def setup(self, model, num_classes, generator, *, train_cfg=None, hidden=None):
        """``hidden``: where ``h_0 .. h_L`` are (a :class:`~fa_study.diagnostics.HiddenStates`
        or module names, see :func:`~fa_study.diagnostics.find_hidden_states`); needed for a
        network the package did not build (the trainer passes the states it found)."""
        self.check_trainable(model)
        freeze_modules(self.frozen_modules(model, hidden))
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    @staticmethod
    def frozen_modules(model: nn.Module, hidden=None) -> list[nn.Module]:
        """The modules between ``h_0`` and ``h_L`` of ``model`` (those this rule freezes)."""
        from ..diagnostics import find_hidden_states
        from ..models.base import BlockModel

        if hidden is None and not isinstance(model, BlockModel):
            raise ValueError(
                f"rule 'frozen' freezes the modules between h_0 and h_L, and needs to know where "
                f"the hidden states of {type(model).__name__} are: pass hidden=[...] (module names "
                "whose outputs are h_0 .. h_L) to train() / frozen_baseline() / setup(); train() "
                "finds them itself for block containers named 'blocks' / 'layers' and ResNet stages")
        return find_hidden_states(model, None, hidden=hidden).block_modules(model)


def freeze_modules(modules: list[nn.Module]) -> None:
    """``requires_grad=False`` on every parameter of ``modules`` and their BatchNorm pinned to eval
    mode (running statistics fixed even under ``model.train()``)."""
    for block in modules:
        for p in block.parameters():
            p.requires_grad_(False)
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train = types.MethodType(_stay_in_eval, m)
                m.eval()


class Shallow(BP):
    """The shallow baseline: BP on a model with no blocks (build it with :meth:`model_kwargs`)."""

    name = "shallow"
    family = "baseline"
    summary = "no blocks at all; BP (a second baseline)"
    is_baseline = True
    needs_blocks = True
    model_requirement = ("a fa_study.models.BlockModel built with num_blocks=0 "
                         "(build_model(arch, **rule.model_kwargs()))")

    def model_kwargs(self):
        return {"num_blocks": 0}

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        self.check_trainable(model)
        if model.num_blocks != 0:
            raise ValueError(f"the shallow baseline needs a model with num_blocks=0, got "
                             f"num_blocks={model.num_blocks}; build it with "
                             f"build_model(arch, **rule.model_kwargs())")
        super().setup(model, num_classes, generator, train_cfg=train_cfg)


class RandomFeedbackRule(BlockLocal):
    """Shared machinery of the block rules with random feedback matrices ``B`` (a list)."""

    takes_penalty = True
    has_random_feedback = True
    OPTIONS = {"penalty": PENALTY}
    LABELS = {"penalty": "λ"}

    def __init__(self, **options):
        super().__init__(**options)
        self.B: list[torch.Tensor] = []

    def draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Fresh feedback matrices for the set-up shapes ``self._dims`` ``(d, C, L)`` (CPU draws)."""
        raise NotImplementedError

    def _drawn(self, generator: torch.Generator) -> list[torch.Tensor]:
        # drawn as float32 on the CPU (the same draws for every model), held in the model's dtype
        return [b.to(self._device, self._dtype) for b in self.draw(generator)]

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        self.check_trainable(model)
        self._dims = (model.width, int(num_classes), model.num_blocks)
        self._device, self._dtype = model_device(model), model_dtype(model)
        self.B = self._drawn(generator)
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new.B = new._drawn(generator)
        return new

    def check_model(self, model, num_classes=None):
        self._require_ready("fill_grads")
        check_dims(self, self._dims, model)


class FA(RandomFeedbackRule):
    """Block-level feedback alignment (see the module docstring)."""

    name = "fa"
    summary = "block FA: a_l = a_{l+1} B_l, fixed random B_l (d, d)"

    @classmethod
    def null_applies(cls, num_blocks: int) -> bool:
        # the B_l sit between blocks: without blocks the error reaches h_0 exactly, through no B
        return num_blocks >= 1

    def draw(self, generator):
        d, _, num_blocks = self._dims
        return [torch.randn(d, d, generator=generator) / math.sqrt(d) for _ in range(num_blocks)]

    def _products(self) -> torch.Tensor:
        """``[P_0 | P_1 | ... | P_{L-1}]`` ``(d, L*d)`` with ``P_l = B_{L-1} ... B_l``, so that
        ``a_l = a_L P_l``: all the signals of a step in one matrix product instead of L chained
        ones. Recomputed only when a feedback matrix is replaced or changed in place."""
        key = [(b, b._version) for b in self.B]  # the B tensors themselves and their versions
        cached = getattr(self, "_products_key", [])
        if len(cached) != len(key) or any(c is not b or cv != v for (c, cv), (b, v) in zip(cached, key)):
            prods, p = [], None
            for b in reversed(self.B):
                p = b if p is None else p @ b
                prods.append(p)
            self._products_cache = torch.cat(prods[::-1], dim=1)
            self._products_key = key
        return self._products_cache

    def signals(self, model, ctx: CreditContext):
        """``[a_0, ..., a_L]`` ``(batch, d)`` from ``a_L`` through ``a_l = a_{l+1} B_l``."""
        if not self.B:
            return [ctx.a_top]
        return list((ctx.a_top @ self._products()).split(ctx.a_top.shape[-1], dim=-1)) + [ctx.a_top]

    def feedback_quality(self, model, x, y):
        """``fb_align_<l>`` = cos(B_l, J_l) with ``J_l`` the exact batch-mean Jacobian of block l."""
        from ..diagnostics.jacobians import block_feedback_quality

        return block_feedback_quality(self.B, model, x, y)


class DFA(RandomFeedbackRule):
    """Direct feedback alignment at block level (see the module docstring)."""

    name = "dfa"
    summary = "block DFA: a_l = e B_l^T, fixed random B_l (d, C)"

    def check_model(self, model, num_classes=None):
        super().check_model(model, num_classes)
        # B_l is (d, C): the output error of another class count cannot pass through it
        check_class_count(self, self._dims[1], model, num_classes)

    def draw(self, generator):
        d, c, num_blocks = self._dims
        # a model without blocks still trains its embedding through B_0
        return [torch.randn(d, c, generator=generator) / math.sqrt(c) for _ in range(max(num_blocks, 1))]

    def signals(self, model, ctx: CreditContext):
        """``[a_0, a_1, ..., a_L]`` ``(batch, d)``: ``a_0 = e B_0^T``, ``a_{l+1} = e B_l^T``."""
        d = self.B[0].shape[0]
        a = (ctx.e @ torch.cat(self.B, dim=0).t()).split(d, dim=-1)  # one product for all blocks
        return [a[0]] + list(a[: self._dims[2]])

    def feedback_matrices(self) -> list[torch.Tensor]:
        """The matrix ``M_l`` ``(d, C)`` with ``a_l = e M_l^T`` for every hidden state h_0..h_L."""
        return self.B[:1] + self.B[: self._dims[2]]

    def feedback_quality(self, model, x, y):
        """``fb_align_<l>`` = cos(M_l, E[g_l e^T]): the direction a linear feedback from e should take."""
        from ..diagnostics.jacobians import direct_feedback_quality

        return direct_feedback_quality(self.feedback_matrices(), model, x, y)


class Oracle(BlockLocal):
    """Block-local training driven by the exact BP gradient: the ceiling of the local rules.

    Every block, the embedding and the head are trained exactly as by fa / dfa, with
    ``a_l = g_l = dCE/dh_l`` from autograd (:func:`fa_study.diagnostics.bp_reference`, used at every
    position of token and conv models). Its credit's cosine with BP is 1 by construction; its
    accuracy tells how much of the gap to BP is the local training scheme and not the direction
    of the credit.
    """

    name = "oracle"
    summary = "block-local training with the exact BP gradient as credit (a ceiling)"
    takes_penalty = True
    uses_bp_grads = True
    OPTIONS = {"penalty": PENALTY}
    LABELS = {"penalty": "λ"}

    def signals(self, model, ctx):
        return ctx.bp_grads
