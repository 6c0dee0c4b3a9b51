"""Block-level rules whose feedback learns from forward-only signals: GrAPE-FA and Stiefel-DFA.

Both are :class:`~fa_study.methods.Method` s, so :func:`fa_study.train.train`, the protocol and
every diagnostic use them unchanged. Neither reads a transposed weight and neither runs a
backward pass through the network to learn its feedback: the feedback learns from JVPs
(forward-mode derivatives of one block) or from the loss change caused by injected noise.
The blocks themselves are trained exactly as by :class:`~fa_study.methods.FA` /
:class:`~fa_study.methods.DFA`: block ``l`` follows the surrogate ``<f_l(h_l), a_{l+1}/rms>``,
the embedding ``<h_0, a_0/rms>``, the head the cross-entropy on a detached ``h_L``, all from
ONE forward pass (each block fed a detached input) and one backward of the summed local losses.

=============  ===============================================================================
rule           credit and how its feedback learns
=============  ===============================================================================
grape_fa       block FA (``a_L = dCE/d pool(h_L)``, ``a_l = a_{l+1} B_l``, ``B_l`` ``(d, d)``
               drawn as FA's) whose ``B_l`` turns, every step, toward the forward-only estimate
               ``J_hat_l = (1/n) sum_i (J_l p_i) p_i^T`` of the block's mean Jacobian
               ``J_l = d pool(h_{l+1}) / d h_l`` (``I + df_l/dh`` for a residual block), with
               probes ``p_i ~ N(0, I)`` at the batch's own ``h_l`` and one ``torch.func.jvp``
               per block: the cosine-alignment step of GrAPE (Caillon et al.)
stiefel_dfa    DFA-like: ``a_l = alpha_l (e C^T) U_l^T`` at every hidden state ``h_0..h_L``,
               ``e = softmax - onehot``, ``C`` ``(r, classes)`` a fixed row-orthonormal
               compressor, ``U_l`` ``(d, r)`` on the Stiefel manifold with gain ``alpha_l``
               (:class:`fa_study.feedback.StiefelFeedback`); ``U_l`` and ``alpha_l`` follow the
               cross-covariance of ``c = e C^T`` with a LOCAL estimate ``g_hat_l`` of the
               per-sample gradient at ``h_l``: simultaneous node perturbation (below)
oracle         the same block-local training with the exact BP gradient as credit
               (``a_l = g_l``): not a plausible rule but the ceiling of every feedback rule that
               trains blocks through these surrogates (the surrogates normalise each sample's
               credit, so even a perfect direction does not give BP's update)
=============  ===============================================================================

Node perturbation (``probe="node"``): every hidden state of the first ``n_probe`` samples is
shifted by independent noise ``+xi_l`` and, in a second copy, ``-xi_l`` (antithetic pair),
``xi_l = sigma_l z_l``, ``z_l ~ N(0, I)``, ``sigma_l = sigma * rms(h_l)``; one forward of both
copies (no autograd) gives the per-sample losses, and
``g_hat_l = (loss(+) - loss(-)) / (2 sigma_l) * z_l``. To first order
``loss(+) - loss(-) = 2 sum_k <g_k, xi_k>``, so ``E[g_hat_l] = g_l`` (the gradient of the
per-sample loss at ``h_l``): each state correlates its own noise with one broadcast scalar.
``probe="bp"`` uses the exact per-sample gradient instead: an oracle that transports weights,
for separating the estimator's noise from what a rank-``r`` feedback can express.

No per-step host synchronisation: every update is tensor arithmetic on the device; the
per-step diagnostics are kept as tensors and read by :meth:`feedback_state` (one sync).
:func:`feedback_quality` reads the feedback against its exact targets (autograd, for the
notebook's plots only). :func:`build_learned_method` builds these rules and, by name, every
rule of :func:`fa_study.methods.build_method`.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_choice
from .feedback import StiefelFeedback
from .methods import (DFA, FA, METHODS as BLOCK_METHODS, Method, bp_gradients, build_method,
                      output_error, surrogate_output_grads)
from .models.base import BlockModel

LEARNED_METHODS: tuple[str, ...] = ("grape_fa", "stiefel_dfa", "oracle")
PROBES: tuple[str, ...] = ("node", "bp")
ALIGN_EPS = 1e-12  # a feedback matrix or target this small is left alone (no direction yet)


# --------------------------------------------------------------------------------------------
# Pieces shared by both rules
# --------------------------------------------------------------------------------------------

def local_forward(model: BlockModel, x: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One forward with every block fed a detached input.

    Returns ``(h_0 with its graph into the embedding, [f_0 .. f_{L-1}] with graphs into their own
    blocks only, [h_0 .. h_L] detached)``; ``h_l`` ``(batch, d)`` for MLPs, ``(batch, ..., d)``
    or ``(batch, d, H, W)`` for token and conv models.
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


def backward_local(model: BlockModel, outputs: list[torch.Tensor], signals: list[torch.Tensor],
                   penalties: list[float], extra: torch.Tensor | None = None) -> None:
    """One backward of the local surrogates ``<f, a/rms(a)> + p ||f||^2`` (their gradients in
    closed form, :func:`fa_study.methods.surrogate_output_grads`) plus the scalar ``extra``."""
    grads = surrogate_output_grads(model, outputs, signals, penalties)
    tensors = [t for t in outputs if t.requires_grad]
    grads = [g for t, g in zip(outputs, grads) if t.requires_grad]
    if extra is not None:
        tensors.append(extra)
        grads.append(torch.ones_like(extra))
    if tensors:
        torch.autograd.backward(tensors, grads)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards: probe forwards must not move BatchNorm running stats."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _check_rate(what: str, value, *, positive: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")
    return float(value)


def _check_n_probe(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"n_probe must be None (the whole batch) or a positive integer, got {value!r}")
    return int(value)


def _device_generator(seed: int, device: torch.device, current: torch.Generator | None
                      ) -> torch.Generator:
    if current is None or current.device != device:
        return torch.Generator(device=device).manual_seed(seed)
    return current


# --------------------------------------------------------------------------------------------
# GrAPE: cosine alignment of B to a forward-only Jacobian estimate
# --------------------------------------------------------------------------------------------

def cosine_alignment_grad(B: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``d/dB [1 - cos(B, target)] = -target/(|B||T|) + cos(B, T) B/|B|^2`` (Frobenius norms).

    Zero when either matrix is (nearly) zero. ``B`` and ``target`` share any shape.
    """
    b_norm, t_norm = B.norm(), target.norm()
    ok = (b_norm > ALIGN_EPS) & (t_norm > ALIGN_EPS)
    b_safe = torch.where(ok, b_norm, torch.ones_like(b_norm))
    t_safe = torch.where(ok, t_norm, torch.ones_like(t_norm))
    cos = (B * target).sum() / (b_safe * t_safe)
    grad = -target / (b_safe * t_safe) + cos * B / b_safe ** 2
    return torch.where(ok, grad, torch.zeros_like(grad))


@torch.no_grad()
def grape_step(B: torch.Tensor, target: torch.Tensor, eta: float) -> torch.Tensor:
    """One GrAPE step on ``1 - cos(B, target)`` in place; returns ``cos(B, target)`` before it.

    The step is gradient descent with ``lr = eta * |B|_F^2``: the cosine is scale-free, so its
    gradient shrinks as ``1/|B|``, and this learning rate makes ``eta`` the (small-angle) fraction
    of the remaining angle closed per step, whatever the size of ``B``:
    ``B <- B + eta (|B|/|T| T - cos B)``.
    """
    grad = cosine_alignment_grad(B, target)
    cos = (B * target).sum() / (B.norm() * target.norm()).clamp_min(ALIGN_EPS)
    B.sub_(grad * (eta * B.norm() ** 2))
    return cos


def block_jvp(model: BlockModel, l: int, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``pool(J_l p)``: the change of ``pool(h_{l+1})`` when ``h_l`` moves along ``p``.

    ``h`` is the block's input ``h_l``; ``p`` ``(n, d)`` is broadcast over positions (so the
    probed map is the one a ``(batch, d)`` FA signal travels through). Forward mode only
    (``torch.func.jvp`` through ``model.step(l, .)``); returns ``(n, d)``.
    """
    tangent = model.broadcast(p, h).contiguous()
    with torch.no_grad():
        _, jp = torch.func.jvp(lambda t: model.pool(model.step(l, t)), (h,), (tangent,))
    return jp


def jvp_jacobian_estimate(model: BlockModel, l: int, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """GrAPE's ``J_hat = (1/n) sum_i (J_l(h_i) p_i) p_i^T`` ``(d, d)`` from probes ``p`` ``(n, d)``
    at the inputs ``h`` (``n`` samples); ``E_p[J_hat]`` is the batch-mean Jacobian (row = output)."""
    jp = block_jvp(model, l, h, p)
    return jp.t() @ p / p.shape[0]


def mean_block_jacobian(model: BlockModel, l: int, h: torch.Tensor, chunk_rows: int = 8192
                        ) -> torch.Tensor:
    """The exact batch-mean Jacobian ``(1/n) sum_i d pool(h_{l+1,i}) / d h_{l,i}`` ``(d, d)``
    (rows: outputs) at the block inputs ``h`` (``n`` samples): one forward-mode pass per group
    of basis directions, each over ``chunk_rows`` rows at most (a diagnostic)."""
    d, n = model.width, h.shape[0]
    eye = torch.eye(d, device=h.device, dtype=h.dtype)
    per = max(1, chunk_rows // max(n, 1))
    cols = []
    for j0 in range(0, d, per):
        k = min(per, d - j0)
        hh = h.repeat(k, *([1] * (h.dim() - 1)))  # k copies of the batch
        jp = block_jvp(model, l, hh, eye[j0:j0 + k].repeat_interleave(n, dim=0))
        cols.append(jp.reshape(k, n, d).mean(dim=1))  # (k, d_out): column j of the Jacobian
    return torch.cat(cols).t()


class GrAPEFA(FA):
    """Block FA whose ``B_l`` align to the blocks' forward-probed Jacobians (see module doc).

    Args:
        eta_B: GrAPE rate (:func:`grape_step`; 0 keeps ``B`` fixed, i.e. plain block FA).
        n_probe: samples of each batch probed (one probe each; GrAPE's 32); None: the whole
            batch.
        penalty: residual-branch penalty, as :class:`fa_study.methods.FA`.

    The layer-level :func:`fa_study.feedback.grape_align_step` estimates ``J_hat`` of a linear
    layer from its weight; a block is nonlinear, so ``J_hat`` comes from JVPs through
    ``model.step`` at the batch's own inputs, and the step is :func:`grape_step`'s scale-free one.
    ``B_l`` are drawn exactly as FA's, so with the same seed both rules start from the same
    feedback. ``B_l`` maps ``a_{l+1}`` to ``a_l`` (``a_l = a_{l+1} B_l``) and BP's ``g_l =
    g_{l+1} J_l`` per sample, so ``B_l -> mean J_l`` is what makes the credit BP's.
    """

    name = "grape_fa"

    def __init__(self, eta_B: float = 0.1, n_probe: int | None = 32, penalty: float = 0.0):
        super().__init__(penalty=penalty)
        self.eta_B = _check_rate("eta_B", eta_B)
        self.n_probe = _check_n_probe(n_probe)
        self._step_seed = 0
        self._gen: torch.Generator | None = None
        self._last_cos: torch.Tensor | None = None

    def options(self):
        return {"penalty": self.penalty, "eta_B": self.eta_B, "n_probe": self.n_probe}

    def setup(self, model, num_classes, generator):
        super().setup(model, num_classes, generator)
        # the probes come from their own generator, seeded from the setup draw
        self._step_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._gen = None
        self._last_cos = None

    def fill_grads(self, model, x, y):
        self._check_model(model)
        self._zero_grads(model)
        h0, branches, hiddens = local_forward(model, x)
        z = model.pool(hiddens[-1]).detach().requires_grad_(True)
        logits = model.classify(z)
        loss = F.cross_entropy(logits, y)
        loss.backward()  # head gradients and a_L = dCE/dz, the true gradient at the top
        a = self._pass_down(z.grad.detach())
        backward_local(model, [h0] + branches, a, [0.0] + [self.penalty] * len(branches))
        if self.eta_B > 0 and model.num_blocks:
            self.align(model, hiddens)
        return loss.detach(), logits.detach()

    @torch.no_grad()
    def align(self, model: BlockModel, hiddens: list[torch.Tensor]) -> torch.Tensor:
        """One GrAPE step for every ``B_l`` at the batch's inputs ``hiddens[l]``; returns the
        cosines ``cos(B_l, J_hat_l)`` before the step ``(L,)`` (kept, not synchronised)."""
        n = hiddens[0].shape[0] if self.n_probe is None else min(self.n_probe, hiddens[0].shape[0])
        device = hiddens[0].device
        self._gen = _device_generator(self._step_seed, device, self._gen)
        cos = []
        with preserved_buffers(model):
            for l, B in enumerate(self.B):
                h = hiddens[l][:n]
                p = torch.randn(n, B.shape[1], generator=self._gen, device=device, dtype=h.dtype)
                j_hat = jvp_jacobian_estimate(model, l, h, p)
                cos.append(grape_step(B, j_hat.to(B.dtype), self.eta_B))
        self._last_cos = torch.stack(cos)
        return self._last_cos

    def feedback_state(self) -> dict[str, float]:
        """The last step's ``cos(B_l, J_hat_l)`` per block as ``probe_cos_<l>`` (one sync)."""
        if self._last_cos is None:
            return {}
        return {f"probe_cos_{l}": v for l, v in enumerate(self._last_cos.tolist())}


# --------------------------------------------------------------------------------------------
# Node perturbation and Stiefel-subspace DFA
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
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    n = h0.shape[0]
    gen_device = generator.device if generator is not None else h0.device
    # clean pass for the per-state noise scales
    scales, h = [], h0
    for l in range(model.num_blocks + 1):
        scales.append(model.pool(h).pow(2).mean().sqrt().clamp_min(1e-12) * sigma)
        if l < model.num_blocks:
            h = model.step(l, h)
    noise = [torch.randn(repeats * n, model.width, generator=generator, device=gen_device,
                         dtype=h0.dtype).to(h0.device) for _ in scales]

    def shift(h: torch.Tensor, l: int) -> torch.Tensor:
        xi = noise[l] * scales[l]
        xi = torch.cat([xi, -xi])  # antithetic copies: +xi, then -xi
        return h + model.broadcast(xi, h)

    reps = 2 * repeats
    h = shift(h0.repeat(reps, *([1] * (h0.dim() - 1))), 0)
    for l in range(model.num_blocks):
        h = shift(model.step(l, h), l + 1)
    losses = F.cross_entropy(model.readout(h), y.repeat(reps), reduction="none")
    half = repeats * n
    dl = (losses[:half] - losses[half:]) / 2  # (repeats * n,)
    out = []
    for z, s in zip(noise, scales):
        g = (dl / s).unsqueeze(1) * z
        out.append(g.reshape(repeats, n, -1).mean(dim=0))
    return out


def per_sample_gradients(model: BlockModel, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Exact ``d loss_i / d h_l`` ``(n, d)`` (pooled over positions by summation of the
    broadcast direction) at every hidden state, by autograd: the oracle ``g_hat``."""
    _, grads, _ = bp_gradients(model, x, y)
    n = x.shape[0]
    # bp_gradients differentiates the batch mean: the per-sample loss's gradient is n times it
    return [_sum_positions(model, g) * n for g in grads]


def _sum_positions(model: BlockModel, g: torch.Tensor) -> torch.Tensor:
    """``(batch, d)``: the gradient along a position-constant direction, i.e. the adjoint of
    ``model.broadcast`` applied to ``g`` (the sum over positions; ``g`` itself for MLPs)."""
    if g.dim() == 2:
        return g
    with torch.enable_grad():
        v = torch.zeros(g.shape[0], model.width, device=g.device, dtype=g.dtype, requires_grad=True)
        out, = torch.autograd.grad((model.broadcast(v, g) * g).sum(), v)
    return out


class StiefelDFA(Method):
    """DFA through a learned factored subspace (see the module doc).

    Args:
        rank: r, the compressed error's dimension (at most the number of classes).
        eta_B: scale-free step of ``U_l`` (0 keeps ``U`` and ``alpha`` fixed: DFA with a random
            scaled isometry as feedback). The expander's Riemannian step
            ``U + eta alpha Delta`` is taken with ``eta = eta_B / (alpha |EMA(G)|)``, i.e. a step
            ``eta_B Delta / |EMA(G)|`` of Frobenius size at most ``eta_B``, not clipped: with a
            fixed ``eta`` the speed of ``U`` would scale as the squared gradient size
            (``Delta`` and ``alpha`` both grow with it), which changes by decades in training,
            and a layer whose ``alpha`` collapsed to its floor would stop learning.
        probe: ``"node"`` (node perturbation, forward only) or ``"bp"`` (exact per-sample
            gradients: the weight-transporting oracle).
        sigma: relative node-perturbation scale (``sigma_l = sigma * rms(h_l)``).
        n_probe: samples of each batch probed; None: the whole batch.
        tau: EMA factor of the cross-covariance.
        beta_alpha: EMA rate of the gain ``alpha_l`` toward its correlation estimate.
        alpha_init: initial gain.
        penalty: residual-branch penalty, as :class:`fa_study.methods.DFA`.
    """

    name = "stiefel_dfa"

    def __init__(self, rank: int = 10, eta_B: float = 0.1, probe: str = "node", sigma: float = 0.05,
                 n_probe: int | None = None, tau: float = 0.95, beta_alpha: float = 0.05,
                 alpha_init: float = 0.1, penalty: float = 0.0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        check_choice("probe", probe, PROBES)
        self.rank = int(rank)
        self.eta_B = _check_rate("eta_B", eta_B)
        self.probe = probe
        self.sigma = _check_rate("sigma", sigma, positive=True)
        self.n_probe = _check_n_probe(n_probe)
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0.0 <= tau < 1.0):
            raise ValueError(f"tau must be a number in [0, 1), got {tau!r}")
        if not (isinstance(beta_alpha, (int, float)) and not isinstance(beta_alpha, bool)
                and 0.0 <= beta_alpha <= 1.0):
            raise ValueError(f"beta_alpha must be a number in [0, 1], got {beta_alpha!r}")
        self.tau, self.beta_alpha = float(tau), float(beta_alpha)
        self.alpha_init = _check_rate("alpha_init", alpha_init, positive=True)
        self.penalty = _check_rate("penalty", penalty)
        self.feedback: StiefelFeedback | None = None
        self._dims: tuple[int, int, int] | None = None
        self._step_seed = 0
        self._gen: torch.Generator | None = None
        self._last: list[dict[str, torch.Tensor]] = []

    def options(self):
        return {"penalty": self.penalty, "rank": self.rank, "eta_B": self.eta_B, "probe": self.probe,
                "sigma": self.sigma, "n_probe": self.n_probe, "tau": self.tau,
                "beta_alpha": self.beta_alpha, "alpha_init": self.alpha_init}

    # ---- life cycle ----------------------------------------------------------------------

    def setup(self, model, num_classes, generator):
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        self._dims = (model.width, int(num_classes), model.num_blocks)
        if self.rank > num_classes:
            raise ValueError(f"rank must be at most the number of classes ({num_classes}): the "
                             f"compressor C maps the {num_classes}-dim error to r dims; got "
                             f"rank={self.rank}")
        self.feedback = self._draw(generator, device)
        self._step_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._gen = None
        self._last = []
        super().setup(model, num_classes, generator)

    def _draw(self, generator: torch.Generator, device) -> StiefelFeedback:
        d, classes, num_blocks = self._dims
        return StiefelFeedback(classes, [d] * (num_blocks + 1), self.rank,
                               alpha_init=self.alpha_init, generator=generator, device=device)

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new.feedback = self._draw(generator, self.feedback.C.device)
        new._last = []
        return new

    def _check_model(self, model: BlockModel) -> None:
        self._require_ready("fill_grads")
        if (model.width, model.num_blocks) != (self._dims[0], self._dims[2]):
            raise ValueError(f"{self.name} was set up for d={self._dims[0]}, L={self._dims[2]} but "
                             f"the model has d={model.width}, L={model.num_blocks}; call setup again")

    # ---- the two jobs --------------------------------------------------------------------

    def _signals(self, e: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.feedback.compress(e)
        return c, self.feedback.deltas(c)

    def fill_grads(self, model, x, y):
        self._check_model(model)
        self._zero_grads(model)
        h0, branches, hiddens = local_forward(model, x)
        logits = model.readout(hiddens[-1])
        loss = F.cross_entropy(logits, y)
        c, a = self._signals(output_error(logits, y))
        # one backward: the head's cross-entropy plus every local surrogate
        backward_local(model, [h0] + branches, a, [0.0] + [self.penalty] * len(branches), extra=loss)
        if self.eta_B > 0:
            self.learn(model, x, y, hiddens, c)
        return loss.detach(), logits.detach()

    @torch.no_grad()
    def learn(self, model: BlockModel, x: torch.Tensor, y: torch.Tensor,
              hiddens: list[torch.Tensor], c: torch.Tensor) -> None:
        """Update every ``U_l``, ``alpha_l`` from ``g_hat_l`` and the compressed error ``c``."""
        n = x.shape[0] if self.n_probe is None else min(self.n_probe, x.shape[0])
        if self.probe == "node":
            self._gen = _device_generator(self._step_seed, x.device, self._gen)
            with preserved_buffers(model):
                g_hats = node_perturbation_grads(model, hiddens[0][:n], y[:n], sigma=self.sigma,
                                                 generator=self._gen)
        else:
            with torch.enable_grad(), preserved_buffers(model):
                g_hats = per_sample_gradients(model, x[:n], y[:n])
        self.update_feedback(g_hats, c[:n])

    @torch.no_grad()
    def update_feedback(self, g_hats: list[torch.Tensor], c: torch.Tensor) -> None:
        """One scale-free Stiefel step of every ``U_l`` and ``alpha_l`` from the local signals
        ``g_hats[l]`` ``(n, d)`` and the compressed error ``c`` ``(n, r)`` (see the class doc)."""
        n = c.shape[0]
        stats = []
        for layer, g in zip(self.feedback.layers, g_hats):
            g = g.to(c.dtype)
            # the EMA the expander is about to form, for a scale-free step (see the class doc)
            ema_next = self.tau * layer.ema_G + (1.0 - self.tau) * (g.t() @ c) / n
            eta = self.eta_B / (layer.alpha * ema_next.norm()).clamp_min(1e-30)
            stats.append(layer.update_tensors(g, c, eta=eta, tau=self.tau, beta_alpha=self.beta_alpha,
                                              max_step_frob=None))
        self._last = stats

    def credit(self, model, x, y):
        self._check_model(model)
        with torch.no_grad():
            logits, hiddens = model(x, return_hidden=True)
            _, a = self._signals(output_error(logits, y))
            return [model.broadcast(a_l, h) for a_l, h in zip(a, hiddens)]

    def feedback_state(self) -> dict[str, float]:
        """``alpha_<l>`` per hidden state, and the last update's ``rho_hat_<l>`` (the alignment
        of ``U_l`` with the cross-covariance of ``g_hat`` and ``c``); one sync."""
        alphas = torch.stack([layer.alpha for layer in self.feedback.layers]).float()
        out = {f"alpha_{l}": v for l, v in enumerate(alphas.tolist())}
        if self._last:
            rho = torch.stack([s["rho"] for s in self._last]).float()
            out.update({f"rho_hat_{l}": v for l, v in enumerate(rho.tolist())})
        return out

    def effective_feedback(self) -> list[torch.Tensor]:
        """``alpha_l U_l C`` ``(d, classes)`` per hidden state: the matrix ``B_l`` with
        ``a_l = e B_l^T`` (DFA's form), for comparison with DFA's fixed ``B``."""
        self._require_ready("effective_feedback")
        return [layer.alpha * layer.U @ self.feedback.C for layer in self.feedback.layers]


class OracleCredit(Method):
    """Block-local training driven by the exact BP gradient: the ceiling of the local rules.

    Every block, the embedding and the head are trained exactly as by fa / dfa (surrogates
    ``<f_l, a_{l+1}/rms(a_{l+1})>``, CE for the head), with ``a_l = g_l = dCE/dh_l`` from
    autograd (:func:`fa_study.methods.bp_gradients`). Its credit's cosine with BP is 1 by
    construction; its accuracy tells how much of the gap to BP is the local training scheme
    and not the direction of the credit.
    """

    name = "oracle"

    def __init__(self, penalty: float = 0.0):
        super().__init__()
        self.penalty = _check_rate("penalty", penalty)

    def options(self):
        return {"penalty": self.penalty}

    def fill_grads(self, model, x, y):
        self._require_ready("fill_grads")
        self._zero_grads(model)
        _, grads, _ = bp_gradients(model, x, y)
        h0, branches, hiddens = local_forward(model, x)
        logits = model.readout(hiddens[-1])
        loss = F.cross_entropy(logits, y)
        backward_local(model, [h0] + branches, grads, [0.0] + [self.penalty] * len(branches),
                       extra=loss)
        return loss.detach(), logits.detach()

    def credit(self, model, x, y):
        self._require_ready("credit")
        return bp_gradients(model, x, y)[1]


# --------------------------------------------------------------------------------------------
# Reading the feedback against its exact targets (diagnostics; autograd allowed here)
# --------------------------------------------------------------------------------------------

def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def feedback_quality(method: Method, model: BlockModel, x: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, float]:
    """How close a rule's feedback is to the one that would make its credit BP's, on one batch.

    Columns (``l`` indexes the hidden state whose credit the feedback produces):

    * fa, grape_fa: ``fb_align_<l>`` = cos(B_l, J_l) for l < L, with ``J_l`` the exact
      batch-mean Jacobian of block l (forward-mode, :func:`mean_block_jacobian`);
    * dfa, stiefel_dfa: ``fb_align_<l>`` = cos(B_l, E[g_l e^T]) with ``B_l`` the matrix that
      maps the output error to ``a_l`` (``alpha_l U_l C`` for Stiefel) and ``g_l`` the
      per-sample BP gradient at ``h_l``: the direction a linear feedback from ``e`` should take;
    * stiefel_dfa also: ``alpha_<l>`` and ``rho_<l>`` = <U_l, G_l>/(|G_l| sqrt r) with
      ``G_l = E[g_l c^T]`` (the quantity its update ascends, read on the exact gradient; 0 for
      a random U, 1 when U is G's polar factor with equal singular values).

    Other rules give an empty dict. Runs in eval mode; buffers are left as they were.
    """
    if not isinstance(method, (FA, DFA, StiefelDFA)):
        return {}
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with preserved_buffers(model):
            if isinstance(method, FA):
                with torch.no_grad():
                    _, hiddens = model(x, return_hidden=True)
                for l, B in enumerate(method.B):
                    out[f"fb_align_{l}"] = _cos(B, mean_block_jacobian(model, l, hiddens[l]).to(B.dtype))
                return out
            grads = per_sample_gradients(model, x, y)
            with torch.no_grad():
                e = output_error(model(x), y)
            n = x.shape[0]
            if isinstance(method, DFA):
                mats = method.B[:1] + method.B[: model.num_blocks]
            else:
                mats = method.effective_feedback()
                c = method.feedback.compress(e)
                r = method.feedback.rank
                for l, (layer, g) in enumerate(zip(method.feedback.layers, grads)):
                    G = g.t() @ c / n
                    out[f"rho_{l}"] = float((G * layer.U).sum() / (G.norm() * math.sqrt(r)).clamp_min(1e-30))
                    out[f"alpha_{l}"] = float(layer.alpha)
            for l, (B, g) in enumerate(zip(mats, grads)):
                out[f"fb_align_{l}"] = _cos(B, (g.t() @ e / n).to(B.dtype))
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Construction by name
# --------------------------------------------------------------------------------------------

_LEARNED: dict[str, type] = {"grape_fa": GrAPEFA, "stiefel_dfa": StiefelDFA, "oracle": OracleCredit}
ALL_METHODS: tuple[str, ...] = tuple(BLOCK_METHODS) + LEARNED_METHODS


def build_learned_method(name: str, **options: Any) -> Method:
    """``grape_fa`` / ``stiefel_dfa`` / ``oracle`` with their options, or any rule of
    :func:`fa_study.methods.build_method` by name (one of :data:`ALL_METHODS`)."""
    check_choice("method", name, ALL_METHODS)
    if name not in _LEARNED:
        return build_method(name, **options)
    cls = _LEARNED[name]
    import inspect

    allowed = tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")
    for key in options:
        if key not in allowed:
            raise ValueError(f"method {name!r} has no option {key!r}; allowed options: "
                             + ", ".join(repr(a) for a in allowed))
    return cls(**options)
