"""Updates of a learned feedback matrix B: Kolen-Pollack, weight mirror, GrAPE (one step).

Each function updates ``B`` in place from quantities a synapse could see locally, never from a
transposed read of W in a backward pass. ``B`` and ``W`` have the same shape (``(out, in)``, or
a convolution kernel ``(out, in/groups, kh, kw)`` seen as its ``(out, fan_in)`` patch map), and
the backward uses ``grad_x = grad_out . B``, so "B aligned with W" means the backward is BP's.
None of them synchronises with the host.
"""
from __future__ import annotations

import torch

from ..config import check_float


@torch.no_grad()
def kolen_pollack_step(B: torch.Tensor, grad_w: torch.Tensor, lr_b: float, decay: float = 0.0) -> None:
    """Kolen-Pollack: ``B <- (1 - decay) B - lr_b grad_W``.

    B receives W's own gradient (the same pre/post-synaptic product delta x^T). If W is trained
    by plain SGD with the same step and the same multiplicative decay
    (``W <- (1 - decay) W - lr_b grad_W``, i.e. SGD with ``lr = lr_b`` and
    ``weight_decay = decay / lr_b``), then ``B - W <- (1 - decay)(B - W)``: with ``decay > 0``
    the two converge geometrically whatever the gradients are. Under another optimizer (Adam)
    B follows the gradient direction only approximately.
    """
    if decay:
        B.mul_(1.0 - decay)
    B.add_(grad_w.reshape(B.shape).to(B.dtype), alpha=-lr_b)


def _probes(weight: torch.Tensor, n: int, generator: torch.Generator | None):
    """W's ``(out, fan_in)`` view and ``N(0, I)`` probes ``(n, fan_in)`` in its dtype, drawn on the
    generator's device (default W's) and moved to W's."""
    w2 = weight.detach().reshape(weight.shape[0], -1)
    gen_device = generator.device if generator is not None else w2.device
    x = torch.randn(n, w2.shape[1], generator=generator, device=gen_device, dtype=w2.dtype)
    return w2, x.to(w2.device)


@torch.no_grad()
def weight_mirror_step(B: torch.Tensor, weight: torch.Tensor, lr_b: float, decay: float | None,
                       sigma: float = 1.0, n: int = 64,
                       generator: torch.Generator | None = None) -> None:
    """Weight mirror (Akrout et al. 2019): learn B from the layer's response to injected noise.

    Draw ``x ~ N(0, sigma^2 I)`` of shape ``(n, fan_in)``, let the layer respond ``y = x W^T``
    (a forward pass), and apply ``B <- (1 - decay) B + lr_b * y^T x / n``. Since
    ``E[y^T x / n] = sigma^2 W``, the fixed point is ``B* = (lr_b sigma^2 / decay) W``; the
    default ``decay = lr_b sigma^2`` makes it ``W`` itself.
    """
    if decay is None:
        decay = lr_b * sigma ** 2
    w2, x = _probes(weight, n, generator)
    y = x.mul_(sigma) @ w2.t()
    B.view(B.shape[0], -1).addmm_(y.t().to(B.dtype), x.to(B.dtype), beta=1.0 - decay, alpha=lr_b / n)


@torch.no_grad()
def probe_jacobian(weight: torch.Tensor, n_probe: int = 32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """GrAPE's forward-probed Jacobian estimate of a linear map, W's ``(out, fan_in)`` view.

    With probes ``p ~ N(0, I)`` ``(n_probe, fan_in)`` and their JVPs ``g = p W^T`` (a forward
    pass: no transposed read of W), ``J_hat = g^T p / n_probe``, whose expectation is W. The
    probes come from ``generator`` (on its own device, then moved to W's).
    """
    w2, p = _probes(weight, n_probe, generator)
    return (p @ w2.t()).t() @ p / n_probe


@torch.no_grad()
def grape_step(B: torch.Tensor, target: torch.Tensor, rate: float, *,
               scale_free: bool = True) -> torch.Tensor:
    """One GrAPE step on ``1 - cos(B, T)`` in place; returns ``cos(B, T)`` *before* the step.

    ``target`` T has B's number of elements (it is viewed as B's shape). With
    ``grad = d(1 - cos)/dB = -T / (|B||T|) + cos B / |B|^2`` (Frobenius norms):

    * ``scale_free=True`` (default): ``B' = B - rate |B|^2 grad = B + rate (|B|/|T| T - cos B)``,
      then rescaled to B's norm: ``B <- |B| B' / |B'|``, a pure rotation toward T. The cosine is
      scale-free, so its gradient shrinks as ``1/|B|``; this learning rate makes ``rate`` the
      fraction of a small angle closed per step, whatever the size of B or T. The rescaling keeps
      the feedback's magnitude where it was drawn: without it every step toward a noisy target
      (GrAPE's rank-n_probe estimate) adds a component orthogonal to B and |B| grows as
      ``(1 + rate^2)^(steps/2)`` -- threefold in a thousand steps at rate 0.05, until the backward
      blows up (seen in notebook 00's default runs).
    * ``scale_free=False``: the reference's plain step ``B <- B - rate grad``, whose effect
      depends on ``|B|``.

    A zero B or T leaves B unchanged (and the returned cosine is 0); a non-finite T (a
    diverged W's) passes into B, whose backward then makes the run stop as diverged. The cosine is a 0-d
    tensor on B's device: nothing synchronises with the host.
    """
    rate = check_float("rate", rate, 0.0)
    B2 = B.view(-1)
    t = target.detach().reshape(-1).to(device=B.device, dtype=B.dtype)
    if t.numel() != B2.numel():
        raise ValueError(f"target has {t.numel()} elements but B {tuple(B.shape)} has {B2.numel()}")
    # B - lr grad = c_b B + c_t T with c_b = 1 - lr cos / |B|^2, c_t = lr / (|B||T|): two passes
    # over B (and one more for the rescaling), where the gradient written out took ten
    b_norm, t_norm = B2.norm(), t.norm()
    ok = (b_norm > 1e-12) & (t_norm > 1e-12)
    b_safe = torch.where(ok, b_norm, torch.ones_like(b_norm))
    bt = b_safe * torch.where(ok, t_norm, torch.ones_like(t_norm))
    cos = torch.where(ok, (B2 @ t) / bt, torch.zeros_like(b_norm))
    lr = torch.where(ok, rate * b_safe ** 2 if scale_free else torch.full_like(b_norm, float(rate)), 0.0)
    B2.mul_(1.0 - lr * cos / b_safe ** 2).add_(t * (lr / bt))
    if scale_free:
        B2.mul_(torch.where(ok, b_norm / B2.norm().clamp_min(1e-30), torch.ones_like(b_norm)))
    return cos
