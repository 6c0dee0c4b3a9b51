"""Updates of a learned feedback matrix B: Kolen-Pollack, weight mirror, GrAPE.

Each function updates ``B`` in place from quantities a synapse could see locally, never from a
transposed read of W in a backward pass. ``B`` and ``W`` have the same shape (``(out, in)``, or
a convolution kernel ``(out, in/groups, kh, kw)`` seen as its ``(out, fan_in)`` patch map), and
the backward uses ``grad_x = grad_out . B``, so "B aligned with W" means the backward is BP's.
None of them synchronises with the host.
"""
from __future__ import annotations

import torch


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
    w2 = weight.detach().reshape(weight.shape[0], -1)
    gen_device = generator.device if generator is not None else w2.device
    x = torch.randn(n, w2.shape[1], generator=generator, device=gen_device, dtype=w2.dtype)
    x = x.to(w2.device).mul_(sigma)
    y = x @ w2.t()
    B2 = B.view(B.shape[0], -1)
    if decay:
        B2.mul_(1.0 - decay)
    B2.add_((y.t() @ x).to(B.dtype), alpha=lr_b / n)


@torch.no_grad()
def grape_align_step(B: torch.Tensor, weight: torch.Tensor, lr_b: float = 0.01, n_probe: int = 32,
                     normalize_columns: bool = False,
                     generator: torch.Generator | None = None) -> None:
    """GrAPE (Caillon et al.): move B toward the forward-probed Jacobian by cosine alignment.

    With probes ``p ~ N(0, I)`` ``(n_probe, fan_in)``, JVPs ``g = p W^T`` (forward only) give
    ``J_hat = g^T p / n_probe`` (-> W). B takes one gradient step on ``1 - cos(B, J_hat)``:
    ``grad = -J_hat / (|B||J_hat|) + cos * B / |B|^2``. ``normalize_columns`` rescales every
    column of B to unit norm afterwards (the paper's Eq. 6; off by default because a per-layer
    FA backward needs B to match W's magnitude too). A zero B or J_hat leaves B unchanged.
    """
    w2 = weight.detach().reshape(weight.shape[0], -1)
    gen_device = generator.device if generator is not None else w2.device
    p = torch.randn(n_probe, w2.shape[1], generator=generator, device=gen_device, dtype=w2.dtype)
    p = p.to(w2.device)
    j_hat = ((p @ w2.t()).t() @ p) / n_probe
    B2 = B.view(B.shape[0], -1)
    b_norm = B2.norm()
    j_norm = j_hat.norm()
    ok = (b_norm > 1e-8) & (j_norm > 1e-8)
    b_safe = torch.where(ok, b_norm, torch.ones_like(b_norm))
    j_safe = torch.where(ok, j_norm, torch.ones_like(j_norm))
    cos = (B2 * j_hat).sum() / (b_safe * j_safe)
    grad = -j_hat / (b_safe * j_safe) + cos * B2 / b_safe ** 2
    B2.sub_(torch.where(ok, grad, torch.zeros_like(grad)).to(B.dtype), alpha=lr_b)
    if normalize_columns:
        B2.div_(B2.norm(dim=0, keepdim=True).clamp_min(1e-8))
