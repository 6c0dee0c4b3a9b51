"""Block rules whose feedback learns from forward-only signals: GrAPE-FA and Stiefel-DFA.

Neither reads a transposed weight and neither runs a backward pass through the network to
learn its feedback: the feedback learns from JVPs (forward-mode derivatives of one block) or
from the loss change caused by injected noise. The blocks themselves are trained exactly as by
:class:`~fa_study.rules.block.FA` / :class:`~fa_study.rules.block.DFA` (the
:class:`~fa_study.rules.base.BlockLocal` surrogates); only :meth:`signals` and :meth:`learn`
differ.

=============  ===============================================================================
rule           credit and how its feedback learns
=============  ===============================================================================
grape_fa       block FA (``a_L = dCE/d pool(h_L)``, ``a_l = a_{l+1} B_l``, ``B_l`` ``(d, d)``
               drawn as FA's) whose ``B_l`` turns, every step, toward the forward-only estimate
               ``J_hat_l = (1/n) sum_i (J_l p_i) p_i^T`` of the block's mean Jacobian
               ``J_l = d pool(h_{l+1}) / d h_l`` (``I + df_l/dh`` for a residual block), with
               probes ``p_i ~ N(0, I)`` at the batch's own ``h_l`` and one ``torch.func.jvp``
               per block: the cosine-alignment step of GrAPE (Caillon et al.),
               :func:`fa_study.feedback.grape_step`
stiefel_dfa    DFA-like: ``a_l = alpha_l (e C^T) U_l^T`` at every hidden state ``h_0..h_L``,
               ``e = softmax - onehot``, ``C`` ``(r, classes)`` a fixed row-orthonormal
               compressor, ``U_l`` ``(d, r)`` on the Stiefel manifold with gain ``alpha_l``
               (:class:`fa_study.feedback.StiefelFeedback`); ``U_l`` and ``alpha_l`` follow the
               cross-covariance of ``c = e C^T`` with a LOCAL estimate ``g_hat_l`` of the
               per-sample gradient at ``h_l``: simultaneous node perturbation (below)
=============  ===============================================================================

Node perturbation (``probe="node"``): every hidden state of the first ``n_probe`` samples is
shifted by independent noise ``+xi_l`` and, in a second copy, ``-xi_l`` (antithetic pair),
``xi_l = sigma_l z_l``, ``z_l ~ N(0, I)``, ``sigma_l = sigma * rms(h_l)``; one forward of both
copies (no autograd) gives the per-sample losses, and
``g_hat_l = (loss(+) - loss(-)) / (2 sigma_l) * z_l``. To first order
``loss(+) - loss(-) = 2 sum_k <g_k, xi_k>``, so ``E[g_hat_l] = g_l``. ``probe="bp"`` uses the
exact per-sample gradient instead: an oracle that transports weights, for separating the
estimator's noise from what a rank-``r`` feedback can express.

Forward-mode passes run with BatchNorm in eval mode (running statistics: no in-place update
under the functorch transform), the math attention kernel and no MultiheadAttention fast path
(the CPU flash kernel and the fast path have no forward-mode derivative), so both rules train
every architecture. Probing forwards never move BatchNorm running statistics.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..diagnostics import buffers_preserved, eval_mode
from ..diagnostics.jacobians import (direct_feedback_quality, jvp_jacobian_estimate,
                                     per_sample_gradients)
from ..feedback import StiefelFeedback, grape_step
from ..models.base import BlockModel
from ..config import MAX_PROBES, check_int
from .base import (BlockLocal, CreditContext, Option, check_class_count, check_dims, choice,
                   device_generator, draw_seed, fraction, fraction_open, model_device, model_dtype,
                   nonnegative, output_error, positive)
from .block import FA, PENALTY

PROBES: tuple[str, ...] = ("node", "bp")


# --------------------------------------------------------------------------------------------
# Pieces shared by both rules
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def node_perturbation_grads(model: BlockModel, h0: torch.Tensor, y: torch.Tensor, *,
                            sigma: float = 0.01, generator: torch.Generator | None = None,
                            repeats: int = 1) -> list[torch.Tensor]:
    """Forward-only estimates ``g_hat_l`` of ``d loss_i / d h_l`` at every hidden state.

    Simultaneous antithetic node perturbation (module doc): one forward (no autograd) of the
    ``2 * repeats`` perturbed copies of the batch from ``h0`` ``(n, ...)`` (the embedding's
    output) through every block and the readout, ``loss_i`` the per-sample cross-entropy with
    labels ``y`` ``(n,)``. ``sigma`` is relative: ``sigma_l = sigma * rms(pool(h_l))`` of the
    clean pass. Returns ``[g_hat_0 .. g_hat_L]``, each ``(n, d)``, the mean over ``repeats``
    independent probes per sample; unbiased up to O(sigma^2).
    """
    sigma = positive("sigma", sigma)
    repeats = check_int("repeats", repeats, 1)
    gen_device = generator.device if generator is not None else h0.device
    scales, h = [], h0
    for l in range(model.num_blocks + 1):  # clean pass for the per-state noise scales
        scales.append(model.pool(h).pow(2).mean().sqrt().clamp_min(1e-12) * sigma)
        if l < model.num_blocks:
            h = model.step(l, h)
    n = h0.shape[0]
    noise = [torch.randn(repeats * n, model.width, generator=generator, device=gen_device,
                         dtype=h0.dtype).to(h0.device) for _ in scales]

    def shift(h: torch.Tensor, l: int) -> torch.Tensor:
        xi = noise[l] * scales[l]
        return h + model.broadcast(torch.cat([xi, -xi]), h)  # antithetic copies: +xi, then -xi

    reps = 2 * repeats
    h = shift(h0.repeat(reps, *([1] * (h0.dim() - 1))), 0)
    for l in range(model.num_blocks):
        h = shift(model.step(l, h), l + 1)
    losses = F.cross_entropy(model.readout(h), y.repeat(reps), reduction="none")
    half = repeats * n
    dl = (losses[:half] - losses[half:]) / 2  # (repeats * n,)
    return [((dl / s).unsqueeze(1) * z).reshape(repeats, n, -1).mean(dim=0) for z, s in zip(noise, scales)]


def probes_or_none(name: str, value) -> int | None:
    """A count of probed samples per step: 1..MAX_PROBES, or None (the whole batch)."""
    return check_int(name, value, 1, MAX_PROBES, none_ok=True, none_means="the whole batch",
                     bound="fa_study.config.MAX_PROBES")


# --------------------------------------------------------------------------------------------
# GrAPE-FA
# --------------------------------------------------------------------------------------------

class GrAPEFA(FA):
    """Block FA whose ``B_l`` align to the blocks' forward-probed Jacobians (see module doc).

    ``B_l`` maps ``a_{l+1}`` to ``a_l`` and BP's ``g_l = g_{l+1} J_l`` per sample, so
    ``B_l -> mean J_l`` is what makes the credit BP's. ``B_l`` are drawn exactly as FA's, so with
    the same seed both rules start from the same feedback; ``eta_B = 0`` is plain block FA.
    """

    name = "grape_fa"
    family = "learned"
    summary = "block FA whose B_l turn toward the blocks' JVP-probed Jacobians (GrAPE)"
    learns_feedback = True
    OPTIONS = {
        "penalty": PENALTY,
        "eta_B": Option(0.1, nonnegative, "fraction of the angle between B_l and J_hat_l closed per step"),
        "n_probe": Option(32, probes_or_none, "probed samples per step (GrAPE's 32; None: the batch)"),
    }

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        super().setup(model, num_classes, generator, train_cfg=train_cfg)
        # the probes come from their own generator, seeded from the setup draw
        self._step_seed = draw_seed(generator)
        self._gen = None
        self._last_cos = None

    def learn(self, model, ctx: CreditContext):
        if self.eta_B > 0 and model.num_blocks:
            self.align(model, ctx.hiddens)

    @torch.no_grad()
    def align(self, model: BlockModel, hiddens: list[torch.Tensor]) -> torch.Tensor:
        """One GrAPE step for every ``B_l`` at the batch's inputs ``hiddens[l]``; returns the
        cosines ``cos(B_l, J_hat_l)`` before the step ``(L,)`` (kept, not synchronised)."""
        n = hiddens[0].shape[0] if self.n_probe is None else min(self.n_probe, hiddens[0].shape[0])
        device = hiddens[0].device
        self._gen = device_generator(self._step_seed, device, self._gen)
        cos = []
        with buffers_preserved(model):
            for l, B in enumerate(self.B):
                h = hiddens[l][:n]
                p = torch.randn(n, B.shape[1], generator=self._gen, device=device, dtype=h.dtype)
                cos.append(grape_step(B, jvp_jacobian_estimate(model, l, h, p).to(B.dtype), self.eta_B))
        self._last_cos = torch.stack(cos)
        return self._last_cos

    def state(self):
        """The last step's ``cos(B_l, J_hat_l)`` per block as ``probe_cos_<l>`` (one sync)."""
        if getattr(self, "_last_cos", None) is None:
            return {}
        return {f"probe_cos_{l}": v for l, v in enumerate(self._last_cos.tolist())}


# --------------------------------------------------------------------------------------------
# Stiefel-subspace DFA
# --------------------------------------------------------------------------------------------

def _rank(name: str, value) -> int | None:
    # no constant bound: the rank is at most the class count and the width, checked against the
    # run's model and data (StiefelDFA.check_run) and in setup, before anything is drawn
    return check_int(name, value, 1, none_ok=True, none_means="the number of classes")


def check_rank(rank: int | None, num_classes: int, width: int) -> int:
    """The rank a StiefelDFA uses (``None``: the class count), or ValueError naming it and both
    bounds: at most the class count (C maps the error to r dims) and the width d."""
    rank = int(num_classes) if rank is None else rank
    if rank > num_classes:
        raise ValueError(f"rank must be at most the number of classes ({num_classes}): the "
                         f"compressor C maps the {num_classes}-dim error to r dims; got rank={rank}")
    if rank > width:
        raise ValueError(f"rank must be at most the width d={width}, got rank={rank}")
    return rank


class StiefelDFA(BlockLocal):
    """DFA through a learned factored subspace (see the module doc).

    ``eta_B`` is a scale-free step of ``U_l``: the expander's Riemannian step
    ``U + eta alpha Delta`` is taken with ``eta = eta_B / (alpha |EMA(G)|)``, i.e. a step
    ``eta_B Delta / |EMA(G)|`` of Frobenius size at most ``eta_B``: with a fixed ``eta`` the
    speed of ``U`` would scale as the squared gradient size, which changes by decades in
    training, and a layer whose ``alpha`` collapsed to its floor would stop learning.
    ``eta_B = 0`` keeps ``U`` and ``alpha`` fixed: DFA with a random scaled isometry as feedback.
    """

    name = "stiefel_dfa"
    family = "learned"
    summary = "DFA through a learned rank-r Stiefel subspace (node perturbation)"
    takes_penalty = True
    has_random_feedback = True
    learns_feedback = True
    OPTIONS = {
        "penalty": PENALTY,
        "rank": Option(None, _rank, "r, the compressed error's dimension (None: the number of classes)"),
        "eta_B": Option(0.1, nonnegative, "scale-free Riemannian step of U_l"),
        "probe": Option("node", choice(*PROBES),
                        "g_hat: node perturbation, or 'bp' (the weight-transporting oracle)"),
        "sigma": Option(0.05, positive, "relative node-perturbation scale"),
        "n_probe": Option(None, probes_or_none, "samples probed per step (None: the batch)"),
        "tau": Option(0.95, fraction_open, "EMA factor of the cross-covariance"),
        "beta_alpha": Option(0.05, fraction, "EMA rate of the gain alpha_l"),
        "alpha_init": Option(0.1, positive, "initial gain"),
    }
    LABELS = {"penalty": "λ"}

    def __init__(self, **options):
        super().__init__(**options)
        self.feedback: StiefelFeedback | None = None  # drawn by setup, with _dims and _last

    @classmethod
    def check_run(cls, options, model, num_classes, train_cfg):
        check_rank(options["rank"], num_classes, model.width)

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        self.check_trainable(model)
        self._rank = check_rank(self.rank, int(num_classes), model.width)
        self._dims = (model.width, int(num_classes), model.num_blocks)
        self._dtype = model_dtype(model)
        self.feedback = self._draw(generator, model_device(model))
        self._step_seed = draw_seed(generator)
        self._gen = None
        self._last = []
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    def _draw(self, generator: torch.Generator, device) -> StiefelFeedback:
        d, classes, num_blocks = self._dims
        # drawn as float32 (the same draws for every model), held in the model's dtype
        return StiefelFeedback(classes, [d] * (num_blocks + 1), self._rank, alpha_init=self.alpha_init,
                               generator=generator, device=device).to(self._dtype)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new.feedback = self._draw(generator, self.feedback.C.device)
        new._last = []
        return new

    def check_model(self, model, num_classes=None):
        self._require_ready("fill_grads")
        check_dims(self, self._dims, model)
        check_class_count(self, self._dims[1], model, num_classes)

    def signals(self, model, ctx):
        return self.feedback.deltas(self.feedback.compress(ctx.e))

    def learn(self, model, ctx):
        if self.eta_B <= 0:
            return
        x, y = ctx.x, ctx.y
        n = x.shape[0] if self.n_probe is None else min(self.n_probe, x.shape[0])
        with torch.no_grad():
            if self.probe == "node":
                self._gen = device_generator(self._step_seed, x.device, self._gen)
                with buffers_preserved(model):
                    g_hats = node_perturbation_grads(model, ctx.hiddens[0][:n], y[:n], sigma=self.sigma,
                                                     generator=self._gen)
            else:
                with torch.enable_grad(), buffers_preserved(model):
                    g_hats = per_sample_gradients(model, x[:n], y[:n])
            self.update_feedback(g_hats, self.feedback.compress(ctx.e[:n]))

    @torch.no_grad()
    def update_feedback(self, g_hats: list[torch.Tensor], c: torch.Tensor) -> None:
        """One scale-free Stiefel step of every ``U_l`` and ``alpha_l`` from the local signals
        ``g_hats[l]`` ``(n, d)`` and the compressed error ``c`` ``(n, r)`` (see the class doc)."""
        n = c.shape[0]
        stats = []
        for layer, g in zip(self.feedback.layers, g_hats):
            g = g.to(c.dtype)
            ema_next = self.tau * layer.ema_G + (1.0 - self.tau) * (g.t() @ c) / n
            eta = self.eta_B / (layer.alpha * ema_next.norm()).clamp_min(1e-30)
            stats.append(layer.update_tensors(g, c, eta=eta, tau=self.tau, beta_alpha=self.beta_alpha,
                                              max_step_frob=None))
        self._last = stats

    def state(self):
        """``alpha_<l>`` per hidden state, and the last update's ``rho_hat_<l>``; one sync."""
        if self.feedback is None:
            return {}
        alphas = torch.stack([layer.alpha for layer in self.feedback.layers]).float()
        out = {f"alpha_{l}": v for l, v in enumerate(alphas.tolist())}
        if self._last:
            rho = torch.stack([s["rho"] for s in self._last]).float()
            out.update({f"rho_hat_{l}": v for l, v in enumerate(rho.tolist())})
        return out

    def feedback_matrices(self) -> list[torch.Tensor]:
        """``alpha_l U_l C`` ``(d, classes)`` per hidden state: the matrix ``M_l`` with
        ``a_l = e M_l^T`` (DFA's form)."""
        self._require_ready("feedback_matrices")
        return [layer.alpha * layer.U @ self.feedback.C for layer in self.feedback.layers]

    def feedback_quality(self, model, x, y):
        """DFA's ``fb_align_<l>``, plus ``alpha_<l>`` and ``rho_<l>`` = <U_l, G_l>/(|G_l| sqrt r) with
        ``G_l = E[g_l c^T]`` read on the exact gradient (0 for a random U, 1 when U is G's polar
        factor with equal singular values)."""
        out = direct_feedback_quality(self.feedback_matrices(), model, x, y)
        with eval_mode(model), buffers_preserved(model):
            grads = per_sample_gradients(model, x, y)
            with torch.no_grad():
                c = self.feedback.compress(output_error(model(x), y))
        r, n = self.feedback.rank, x.shape[0]
        for l, (layer, g) in enumerate(zip(self.feedback.layers, grads)):
            G = g.t() @ c / n
            out[f"rho_{l}"] = float((G * layer.U).sum() / (G.norm() * math.sqrt(r)).clamp_min(1e-30))
            out[f"alpha_{l}"] = float(layer.alpha)
        return out
