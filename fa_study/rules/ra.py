"""Reciprocal alignment (RA, reference 001): its explicit formulas and its rules.

The network is :class:`fa_study.models.MatrixMLP`: forward matrices ``W[l]`` ``(d_{l+1}, d_l)``
with an optional LayerNorm (no affine parameters) after each hidden activation. The rules own
feedback matrices ``B[l]`` ``(d_l, d_{l+1})`` -- the shape of ``W[l].T`` -- and decide how each is
trained:

==============  ===============================  =================================================
rule            W update                         B update (plain SGD with step ``lr_b``)
==============  ===============================  =================================================
``bp``          backpropagation (autograd)       --
``ra_fa``       feedback alignment through B     none (B stays at its random initial value)
``ra_rev``      FA through B                     reverse task: reconstruct x from the logits down
                                                 the B pathway, with W as the feedback matrices
``ra_recon``    FA through B                     layer-local reconstruction of a_l from a_{l+1}
``ra_comb``     FA through B                     ``(1 - lam) * rev + lam * recon``
==============  ===============================  =================================================

As in the reference, the FA update of W ignores the LayerNorm derivative (the error passes each
LayerNorm as if it were the identity); with ``B[l] = W[l]^T`` it is the same approximation of
BP. ``bp`` is the generic rule (:class:`fa_study.rules.block.BP`): the exact gradient.

RA asks whether B can come to align with W^T from local signals alone; the read-outs
(:meth:`RARule.feedback_quality`) are the per-layer alignment ``||B_l - W_l^T|| / ||W_l||``, the
angle between ``B_l`` and ``W_l^T``, and the angle between the FA and BP updates of each hidden
layer (Lillicrap et al. 2016).

Conventions: activations are rows, ``acts[l]`` is ``(batch, d_l)``; ``acts[0]`` is the input
and ``acts[L]`` the logits. The formulas work on plain tensors without autograd.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..config import check_batch, check_choice, check_int, get_device
from ..models.mlp import MATRIX_ACTIVATIONS, act_deriv, activate
from ..models.mlp import init_gain as matrix_gain
from .base import (Method, Option, boolean, check_class_count, choice, fraction,
                   output_error, positive_or_none)

ACTIVATIONS: tuple[str, ...] = MATRIX_ACTIVATIONS
_ALIGN_EPS = 1e-9  # as in the reference: ||B - W^T|| / (||W|| + eps)


# --------------------------------------------------------------------------------------------
# Model: dimensions, initialisation, forward pass
# --------------------------------------------------------------------------------------------

def make_dims(in_dim: int, hidden: int, depth: int, out_dim: int) -> list[int]:
    """Layer widths ``[in_dim, hidden, ..., hidden, out_dim]`` of a ``depth``-matrix MLP.

    ``depth`` counts weight matrices (so there are ``depth - 1`` hidden layers) and must be
    at least 2.
    """
    depth = check_int("depth (number of weight matrices)", depth, 2)
    in_dim = check_int("in_dim", in_dim, 1)
    hidden = check_int("hidden (width)", hidden, 1)
    out_dim = check_int("out_dim", out_dim, 1)
    return [in_dim] + [hidden] * (depth - 1) + [out_dim]


def init_gain(activation: str) -> float:
    """Initialisation gain of the reference: sqrt(2) for ReLU (Kaiming), 1 otherwise."""
    check_choice("activation", activation, ACTIVATIONS)
    return matrix_gain(activation)


def init_mats(dims: list[int], seed: int, activation: str = "linear", device=None,
              dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random forward matrices ``W`` and feedback matrices ``B`` as in the reference.

    ``W[l]`` is ``(d_{l+1}, d_l)`` with entries N(0, gain² / d_l); ``B[l]`` is ``(d_l, d_{l+1})``
    with entries N(0, gain² / d_{l+1}), i.e. each matrix is scaled by its own fan-in
    (``gain`` from :func:`init_gain`). The reference's comment calls the gain-1 case "Xavier";
    the numbers it draws are the fan-in (LeCun) scaling above, which is what we reproduce.

    All draws come, in the reference's order (W[0], B[0], W[1], B[1], ...), from one CPU
    ``torch.Generator`` seeded with ``seed``, in float32; the matrices are then moved to
    ``device`` (default :func:`fa_study.config.get_device`) and cast to ``dtype``. The values
    therefore do not depend on the device, and a float64 run starts from the float32 draws.
    """
    if len(dims) < 3:
        raise ValueError(f"dims must list at least 3 widths (depth >= 2), got {dims!r}")
    for d in dims:
        check_int("every width in dims", d, 1)
    gain = init_gain(activation)
    dev = get_device(device)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    drawn = [(torch.empty(d_out, d_in).normal_(std=gain * (1.0 / d_in) ** 0.5, generator=g),
              torch.empty(d_in, d_out).normal_(std=gain * (1.0 / d_out) ** 0.5, generator=g))
             for d_in, d_out in zip(dims[:-1], dims[1:])]  # W[0], B[0], W[1], B[1], ...
    return [w.to(dev, dtype) for w, _ in drawn], [b.to(dev, dtype) for _, b in drawn]


def apply_act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The hidden nonlinearity applied to pre-activations ``z`` ``(batch, d)``."""
    check_choice("activation", activation, ACTIVATIONS)
    return activate(z, activation)


def forward(x: torch.Tensor, W: list[torch.Tensor], activation: str = "linear",
            ln: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Forward pass of the explicit-matrix MLP.

    Args:
        x: inputs ``(batch, d_0)``.
        W: forward matrices, ``W[l]`` ``(d_{l+1}, d_l)``.
        activation: one of :data:`ACTIVATIONS`, applied after every hidden layer.
        ln: LayerNorm (no affine parameters) after each hidden activation.

    Returns:
        ``(acts, pre)``, both of length ``L + 1``: ``acts[0] = x``, ``acts[l]`` ``(batch, d_l)``
        the (normalised) output of hidden layer ``l``, ``acts[L]`` the logits; ``pre[0] = None``
        and ``pre[l] = acts[l-1] @ W[l-1].T`` the pre-activation of layer ``l``.
    """
    check_choice("activation", activation, ACTIVATIONS)
    acts: list[torch.Tensor] = [x]
    pre: list[torch.Tensor | None] = [None]
    h = x
    last = len(W) - 1
    for l, w in enumerate(W):
        h = z = h @ w.T  # the logits (l == last): no activation, no LayerNorm
        pre.append(z)
        if l < last:
            h = apply_act(z, activation)
            if ln:
                h = F.layer_norm(h, h.shape[-1:])
        acts.append(h)
    return acts, pre


def output_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``logits`` ``(batch, K)`` against labels ``y`` ``(batch,)`` and its
    gradient with respect to the logits, ``(softmax(logits) - onehot(y)) / batch``.

    Returns ``(loss, grad_top)``: a 0-dim tensor (no host sync) and ``(batch, K)``.
    """
    return F.cross_entropy(logits, y), output_error(logits, y) / logits.shape[0]


# --------------------------------------------------------------------------------------------
# Updates of W (BP or FA) and of B (reverse task, reconstruction, combination)
# --------------------------------------------------------------------------------------------

def w_grads(acts: list[torch.Tensor], pre: list[torch.Tensor | None], grad_top: torch.Tensor,
            W: list[torch.Tensor], B: list[torch.Tensor], use_bp: bool,
            activation: str = "linear", return_signals: bool = False):
    """Updates of every ``W[l]`` by backpropagation (``use_bp``) or feedback alignment through B.

    Starting from ``grad_top`` ``(batch, d_L)`` (the loss gradient at the logits), the error
    ``delta_l`` ``(batch, d_{l+1})`` at the pre-activation of layer ``l + 1`` gives
    ``grad W[l] = delta_lᵀ acts[l]`` ``(d_{l+1}, d_l)``; it is carried one layer down by
    ``delta_l W[l]`` (BP) or ``delta_l B[l]ᵀ`` (FA), then multiplied by the activation
    derivative at ``pre[l]``.

    The LayerNorm derivative is ignored, as in the reference: the error passes through each
    LayerNorm as if it were the identity, in both arms, so that BP and FA differ only in the
    feedback matrix. Consequences: with ``ln=False`` the BP arm is exact backpropagation (it
    equals autograd of the loss); with ``ln=True`` it is *not* the true gradient of the
    network that :func:`forward` computes, but the gradient of the same network with the
    LayerNorms' Jacobians replaced by the identity. With ``B[l] = W[l]ᵀ`` FA equals this BP
    arm in both cases.

    Returns: a list of ``L`` tensors, ``grads[l]`` with the shape of ``W[l]``; with
    ``return_signals`` also the errors ``[grad_a_1 .. grad_a_{L-1}]`` carried down to the hidden
    outputs ``acts[1..L-1]`` (the rule's credit at the hidden states).
    """
    L = len(W)
    grads: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    signals: list[torch.Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    delta = grad_top
    for l in reversed(range(L)):
        grads[l] = delta.T @ acts[l]
        if l > 0:
            grad_a = delta @ W[l] if use_bp else delta @ B[l].T
            signals[l - 1] = grad_a
            delta = grad_a * act_deriv(pre[l], activation)
    return (grads, signals) if return_signals else grads


LN_EPS = 1e-5  # F.layer_norm's default


def layer_norm_stats(h: torch.Tensor, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(h), 1 / sigma)`` of ``F.layer_norm`` (no affine) at ``h`` ``(n, d)``: ``(n, d)`` and
    ``(n, 1)``, from LayerNorm's own fused kernel (torch's ``var`` along the last dimension takes
    ten times as long at these sizes)."""
    y, _, inv = torch.ops.aten.native_layer_norm(h, [h.shape[-1]], None, None, eps)
    return y, inv


def layer_norm_backward(h: torch.Tensor, g: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """The vector-Jacobian product of ``F.layer_norm`` (no affine) at the input ``h`` ``(n, d)``
    with the upstream gradient ``g``, ``(g - mean(g) - y mean(g y)) / sigma`` with ``y = LN(h)``:
    LayerNorm's own backward kernel (the one autograd runs)."""
    d = [h.shape[-1]]
    _, mean, inv = torch.ops.aten.native_layer_norm(h, d, None, None, eps)
    return torch.ops.aten.native_layer_norm_backward(g, h, d, mean, inv, None, None, [True, False, False])[0]


def b_grads_rev(acts: list[torch.Tensor], x: torch.Tensor, W: list[torch.Tensor],
                B: list[torch.Tensor], ln_b: bool = True, *, forward_ln: list[torch.Tensor] | None = None,
                ln_derivative: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reverse-task updates of every ``B[l]``: the B pathway reconstructs x from the logits.

    The B pathway runs top-down and is linear: ``b_L = acts[L]`` (the logits, a constant here),
    ``b_{l-1} = LN(b_l B[l-1]ᵀ)`` for ``l > 1`` (LayerNorm only when ``ln_b``; it mirrors the
    forward pathway's LayerNorm, for stability) and ``b_0 = b_1 B[0]ᵀ`` ``(batch, d_0)`` with no
    LayerNorm, since it targets x directly. Its loss is

        rev_loss = 0.5 * mean_batch ||b_0 - x||²

    (the reference logs ``mean_batch ||b_0 - x||²``, twice this; its update is the gradient of
    the half, which is the loss we report so that loss and update agree).

    The error is sent up the B pathway by feedback alignment with W as the feedback matrices:
    ``eta_0 = (b_0 - x) / batch`` and ``eta_l = eta_{l-1} W[l-1]ᵀ``, where backpropagation
    would use ``B[l-1]``; LayerNorm derivatives are ignored. The update is
    ``grad B[l] = eta_lᵀ b_{l+1}`` ``(d_l, d_{l+1})``. Hence:

    * ``grads[0]`` is always the exact gradient of ``rev_loss`` with respect to ``B[0]``;
    * all of them are the exact gradient of ``rev_loss`` when ``B[l] = W[l]ᵀ`` for every ``l``
      and ``ln_b=False`` (for any forward activation: the B pathway is linear);
    * in general they are not the gradient of any loss -- that is the point of FA.

    This is seed 001's reverse task, and it diverges for every ``lr_b > 0`` (notebook 01): the
    recursion carries ``-x`` through the raw chain ``W_0ᵀ W_1ᵀ ...``, whose scale nothing bounds
    (the forward LayerNorms make W's scale invisible to the loss), and the Hebbian update has no
    fixed point. Two options stabilise it (both off by default, i.e. the reference):

    * ``forward_ln``: the inputs of the forward pathway's LayerNorms, ``[None, z_1 .. z_{L-1}]``
      (``z_l = act(pre_l)``); the feedback then carries the forward layer's linearised scale,
      ``eta_l <- eta_l / sigma(z_l)`` per sample for the hidden layers;
    * ``ln_derivative``: the LayerNorm derivative on the B pathway (``ln_b`` must be on): the error
      at each normalised ``b_l`` is carried through LN's Jacobian at its input before it is used,
      which makes the update exact when ``B[l] = W[l]ᵀ`` and orthogonal to ``B[l]`` for ``l >= 1``.

    Returns ``(grads, rev_loss)``; ``rev_loss`` is a 0-dim tensor (no host sync).
    """
    L = len(B)
    b, pre_ln = _b_pathway(acts[L], B, ln_b)
    err = b[0] - x
    eta = err / x.shape[0]
    grads: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    for l in range(L):
        grads[l] = eta.T @ b[l + 1]
        eta = eta @ W[l].T
        if l + 1 < L:
            if forward_ln is not None:
                eta = eta * layer_norm_stats(forward_ln[l + 1])[1]
            if ln_derivative and pre_ln[l + 1] is not None:
                eta = layer_norm_backward(pre_ln[l + 1], eta)
    rev_loss = 0.5 * err.pow(2).sum(-1).mean()
    return grads, rev_loss


def _b_pathway(top: torch.Tensor, B: list[torch.Tensor], ln_b: bool):
    """The B pathway top-down from ``top`` (the logits): ``[b_0 .. b_L]`` and the inputs of
    each ``b_l``'s LayerNorm (None where there is none)."""
    L = len(B)
    b: list[torch.Tensor] = [None] * L + [top]  # type: ignore[list-item]
    pre_ln: list[torch.Tensor | None] = [None] * (L + 1)
    for l in range(L, 0, -1):
        h = b[l] @ B[l - 1].T
        if ln_b and l > 1:
            pre_ln[l - 1] = h
            h = F.layer_norm(h, h.shape[-1:])
        b[l - 1] = h
    return b, pre_ln


def b_grads_recon(acts: list[torch.Tensor], B: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Layer-local reconstruction updates of every ``B[l]``: predict ``acts[l]`` from ``acts[l+1]``.

    With residual ``r_l = acts[l+1] B[l]ᵀ - acts[l]`` ``(batch, d_l)``, the loss is

        recon_loss = sum_l 0.5 * mean_batch ||r_l||²

    and ``grads[l] = r_lᵀ acts[l+1] / batch`` ``(d_l, d_{l+1})`` is its exact gradient with
    respect to ``B[l]`` (the activations are constants). The reference logs
    ``sum_l mean_batch ||r_l||²``, twice this; its update is the gradient of the half.

    Returns ``(grads, recon_loss)``; ``recon_loss`` is a 0-dim tensor (no host sync).
    """
    n = acts[0].shape[0]
    r = [acts[l + 1] @ b.T - acts[l] for l, b in enumerate(B)]
    grads = [r_l.T @ acts[l + 1] / n for l, r_l in enumerate(r)]
    return grads, sum((0.5 * r_l.pow(2).sum(-1).mean() for r_l in r), acts[0].new_zeros(()))


# --------------------------------------------------------------------------------------------
# Read-outs
# --------------------------------------------------------------------------------------------

def _angles_deg(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Angle in degrees between the flattened tensors of each pair; NaN when either is zero.

    Uses ``2 atan2(|u - v|, |u + v|)`` on the unit vectors, which stays accurate near 0 and
    180 degrees where ``acos`` of the cosine loses half the digits. One host sync in all.
    """
    if not pairs:
        return []
    out = []
    for a, b in pairs:
        a, b = a.reshape(-1), b.reshape(-1)
        na, nb = a.norm(), b.norm()
        u, v = a / na, b / nb
        ang = 2 * torch.atan2((u - v).norm(), (u + v).norm())
        out.append(torch.where((na > 0) & (nb > 0), ang, torch.full_like(ang, math.nan)))
    return torch.rad2deg(torch.stack(out)).tolist()


def alignment(W: list[torch.Tensor], B: list[torch.Tensor]) -> list[float]:
    """Per-layer ``||B[l] - W[l]ᵀ||_F / ||W[l]||_F`` (0 when B = Wᵀ; ~1.4 for independent
    random matrices of equal scale). One host sync in all."""
    vals = [(b - w.T).norm() / (w.norm() + _ALIGN_EPS) for w, b in zip(W, B)]
    return torch.stack(vals).tolist()


def angles(W: list[torch.Tensor], B: list[torch.Tensor]) -> list[float]:
    """Per-layer angle in degrees between ``B[l]`` and ``W[l]ᵀ``, both flattened
    (0: same direction, 90: orthogonal, 180: opposite; scale-free, unlike :func:`alignment`)."""
    return _angles_deg([(b, w.T) for w, b in zip(W, B)])


def update_angles(acts: list[torch.Tensor], pre: list[torch.Tensor | None], grad_top: torch.Tensor,
                  W: list[torch.Tensor], B: list[torch.Tensor],
                  activation: str = "linear") -> list[float]:
    """Angle in degrees between the FA update and the BP update of each hidden layer's W on
    the same batch (the measure of Lillicrap et al. 2016; below 90 means FA descends).

    Only ``W[0] .. W[L-2]`` are reported: the top matrix ``W[L-1]`` gets the same update from
    both rules (its error is the loss gradient itself), so its angle is 0 by construction.
    Both updates come from :func:`w_grads` and so share its treatment of LayerNorm.

    Returns a list of ``L - 1`` floats.
    """
    g_bp = w_grads(acts, pre, grad_top, W, B, use_bp=True, activation=activation)
    g_fa = w_grads(acts, pre, grad_top, W, B, use_bp=False, activation=activation)
    return _angles_deg(list(zip(g_fa[:-1], g_bp[:-1])))


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------

class RARule(Method):
    """Base of the reciprocal-alignment rules: W by feedback alignment through the rule's own
    ``B`` (LayerNorm derivative ignored, as the reference), B by :meth:`b_grads` and plain SGD
    with step ``lr_b`` (``None``: the trainer's lr, as the reference's default).

    ``B[l] ~ N(0, gain^2 / d_{l+1})`` (each matrix scaled by its own fan-in, as the reference),
    drawn from the setup generator. Per epoch, :meth:`state` gives the mean reverse and
    reconstruction losses of the epoch's steps, and :meth:`feedback_quality` the alignment,
    angle and update-angle read-outs.
    """

    family = "ra"
    model_requirement = ("the explicit weight matrices of fa_study.models.MatrixMLP "
                         "(build_model('matrix_mlp'))")
    has_random_feedback = True

    @classmethod
    def fits(cls, model) -> bool:
        # the rule reads and updates the model's explicit weight matrices
        return callable(getattr(model, "matrices", None)) and hasattr(model, "dims")

    OPTIONS = {"lr_b": Option(None, positive_or_none, "B's SGD step (None: the trainer's lr)"),
               "b_clip": Option(None, positive_or_none,
                                "bound on each B step: ||dB_l|| <= b_clip ||B_l|| (None: unbounded, as 001)")}
    LABELS = {"lr_b": "lr_b", "b_clip": "clip"}

    def __init__(self, **options):
        super().__init__(**options)
        self.B: list[torch.Tensor] = []
        self._sums: torch.Tensor | None = None

    # ---- life cycle ----------------------------------------------------------------------

    def setup(self, model, num_classes, generator, *, train_cfg=None):
        self.check_trainable(model)
        self._dims, self._gain = list(model.dims), model.gain
        lr_b = getattr(self, "lr_b", None)
        self._lr_b = lr_b if lr_b is not None else (train_cfg.lr if train_cfg is not None else 0.05)
        self._device, self._dtype = model.matrices()[0].device, model.matrices()[0].dtype
        self.B = self.draw(generator)
        self._sums = None
        super().setup(model, num_classes, generator, train_cfg=train_cfg)

    def draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [(torch.randn(d_in, d_out, generator=generator) * (self._gain / math.sqrt(d_out)))
                .to(self._device, self._dtype) for d_in, d_out in zip(self._dims[:-1], self._dims[1:])]

    def fresh(self, generator):
        self._require_ready("fresh")
        new = copy.copy(self)
        new.B = self.draw(generator)
        new._sums = None
        return new

    # ---- the B update --------------------------------------------------------------------

    def b_grads(self, acts: list[torch.Tensor], x: torch.Tensor, W: list[torch.Tensor]
                ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
        """``(updates of B or None, rev_loss or None, recon_loss or None)`` for one batch."""
        return None, None, None

    def check_model(self, model, num_classes=None) -> None:
        """Raise when ``model``'s widths (or the data's class count) are not those the feedback
        matrices were drawn for."""
        self._require_ready("fill_grads")
        check_class_count(self, self._dims[-1], model, num_classes)
        if list(model.dims) != self._dims:
            raise ValueError(f"{self.name} was set up for widths {self._dims} but the model has "
                             f"{list(model.dims)}; call setup again")

    # ---- the two jobs --------------------------------------------------------------------

    def _forward(self, model, x, y):
        W = [w.detach() for w in model.matrices()]
        acts, pre = forward(model.as_flat(x), W, model.activation, model.ln)
        loss, grad_top = output_grad(acts[-1], y)
        return W, acts, pre, loss, grad_top

    def fill_grads(self, model, x, y):
        self.check_model(model)
        check_batch(x, y)
        with torch.no_grad():
            W, acts, pre, loss, grad_top = self._forward(model, x, y)
            grads = w_grads(acts, pre, grad_top, W, self.B, False, model.activation)
            for p, g in zip(model.matrices(), grads):
                p.grad = g
            self._pre, self._model_ln, self._activation = pre, model.ln, model.activation
            g_b, rev, recon = self.b_grads(acts, acts[0], W)
            if g_b is not None:  # from the same snapshot of W and B as W's update, as the reference
                steps = [self._lr_b * g for g in g_b]
                clip = getattr(self, "b_clip", None)
                if clip is not None:  # scaled on the device: no host sync
                    steps = [u * torch.clamp(clip * b.norm() / u.norm().clamp_min(1e-30), max=1.0)
                             for u, b in zip(steps, self.B)]
                for b, u in zip(self.B, steps):
                    b.sub_(u)
                self._last_steps = torch.stack([u.norm() for u in steps])
            self._last_rev = rev
            nan = torch.full((), math.nan, device=loss.device, dtype=loss.dtype)
            step = torch.stack([rev if rev is not None else nan, recon if recon is not None else nan,
                                torch.ones_like(loss)]) * x.shape[0]
            self._sums = step if self._sums is None else self._sums + step
        return loss.detach(), acts[-1]

    def credit(self, model, x, y):
        """The FA errors carried down to ``h_0 .. h_L`` through B (LayerNorm as identity)."""
        self._require_ready("credit")
        self.check_model(model)
        with torch.no_grad():
            W, acts, pre, _, grad_top = self._forward(model, x, y)
            _, signals = w_grads(acts, pre, grad_top, W, self.B, False, model.activation, return_signals=True)
        return signals

    # ---- read-outs -----------------------------------------------------------------------

    def state(self):
        """``rev_loss`` and ``recon_loss``: sample-weighted means over the steps since the last
        call (NaN when the rule does not compute them); one host sync."""
        if self._sums is None:  # no step yet (epoch 0): the columns exist from the first row
            return {"rev_loss": math.nan, "recon_loss": math.nan}
        rev, recon, n = self._sums.tolist()
        self._sums = None
        return {"rev_loss": rev / n, "recon_loss": recon / n}

    def trace(self, model) -> dict[str, float]:
        """Per-step read-outs for diagnosing divergence (one host sync): ``W_l`` and ``B_l``
        (Frobenius norms), ``dB_l`` (the norm of the last B step) and ``rev_loss`` (the reverse
        task's error on the last batch, for the rules that have one)."""
        out = {f"W_{l}": w.detach().norm() for l, w in enumerate(model.matrices())}
        out.update({f"B_{l}": b.norm() for l, b in enumerate(self.B)})
        steps, rev = getattr(self, "_last_steps", None), getattr(self, "_last_rev", None)
        if steps is not None:
            out.update({f"dB_{l}": u for l, u in enumerate(steps)})
        if rev is not None:
            out["rev_loss"] = rev.detach()  # 0.5 * mean ||b_0 - x||^2 of the last step
        return dict(zip(out, torch.stack(list(out.values())).tolist()))

    def feedback_quality(self, model, x, y):
        """``align_l`` (||B_l - W_l^T|| / ||W_l||), ``angle_l`` (B_l vs W_l^T, degrees) for every
        matrix and ``update_angle_l`` (FA vs BP update of the hidden W_l, degrees) on ``x``, ``y``."""
        with torch.no_grad():
            W, acts, pre, _, grad_top = self._forward(model, x, y)
            updates = update_angles(acts, pre, grad_top, W, self.B, model.activation)
            read = (("align", alignment(W, self.B)), ("angle", angles(W, self.B)), ("update_angle", updates))
        return {f"{prefix}_{l}": v for prefix, vals in read for l, v in enumerate(vals)}


class RAFixed(RARule):
    name = "ra_fa"
    summary = "W by FA through a fixed random B (RA's control; LayerNorm as identity)"
    OPTIONS = {}
    LABELS = {}


REV_FEEDBACK: tuple[str, ...] = ("W", "forward_ln")


class RAReverse(RARule):
    """B by seed 001's reverse task (:func:`b_grads_rev`); ``rev_feedback="forward_ln"`` and
    ``ln_derivative=True`` (with ``b_clip``) are the stabilisation notebook 01 derives."""

    name = "ra_rev"
    summary = "B by the reverse task: reconstruct x down the B pathway, W as its feedback"
    learns_feedback = True
    OPTIONS = {**RARule.OPTIONS,
               "ln_b": Option(True, boolean, "LayerNorm on the B pathway (the reference: always)"),
               "rev_feedback": Option("W", choice(*REV_FEEDBACK),
                                      "the reverse error's feedback: W (001) or forward_ln (W at the forward "
                                      "LayerNorm's scale)"),
               "ln_derivative": Option(False, boolean,
                                       "LayerNorm derivative on the B pathway (001: ignored)")}
    LABELS = {"lr_b": "lr_b", "rev_feedback": "fb", "ln_derivative": "lnd", "b_clip": "clip"}

    def _rev(self, acts, x, W):
        forward_ln = None
        if self.rev_feedback == "forward_ln" and self._model_ln:
            forward_ln = [None] + [apply_act(p, self._activation) for p in self._pre[1:]]
        return b_grads_rev(acts, x, W, self.B, ln_b=self.ln_b, forward_ln=forward_ln,
                           ln_derivative=self.ln_derivative)

    def b_grads(self, acts, x, W):
        return (*self._rev(acts, x, W), None)


class RAReconstruction(RARule):
    name = "ra_recon"
    summary = "B by layer-local reconstruction of a_l from a_{l+1}"
    learns_feedback = True

    def b_grads(self, acts, x, W):
        g, recon = b_grads_recon(acts, self.B)
        return g, None, recon


class RACombined(RAReverse):
    name = "ra_comb"
    summary = "B by (1 - lam) reverse task + lam reconstruction"
    OPTIONS = {**RAReverse.OPTIONS,
               "lam": Option(0.5, fraction,
                             "weight of the reconstruction term (0: reverse only, 1: reconstruction only)")}
    LABELS = {**RAReverse.LABELS, "lam": "λ"}

    def b_grads(self, acts, x, W):
        g_rev, rev = self._rev(acts, x, W)
        g_rec, recon = b_grads_recon(acts, self.B)
        return [torch.lerp(a, b, self.lam) for a, b in zip(g_rev, g_rec)], rev, recon  # (1 - lam) a + lam b
