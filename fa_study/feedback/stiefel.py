"""Factored feedback subspace: a fixed compressor C and per-layer Stiefel expanders U_l.

The feedback to layer l is ``delta_l = alpha_l * c U_l^T`` with ``c = e C^T``, where

* ``C`` ``(r, V)`` is a fixed row-orthonormal compressor (``C C^T = I_r``) of the output error;
* ``U_l`` ``(d_l, r)`` has orthonormal columns (a point of the Stiefel manifold St(d_l, r));
* ``alpha_l > 0`` is a scalar gain.

``U_l`` follows the EMA of the cross-covariance ``G = g_hat^T c / N`` between a local signal
``g_hat`` and the compressed error by a Riemannian step: tangent projection
``Delta = G - U sym(U^T G)``, Frobenius step clipping, ``U + eta alpha Delta``, QR retraction
with the sign fix ``diag(R) > 0``. ``alpha_l`` moves toward the correlation estimate
``alpha* = <G, U> / mean ||c||^2``, clamped to ``[alpha_min, alpha_max]``. In frozen mode only
the EMA moves. Signals may be ``(batch, d)`` or ``(batch, time, d)``; diagnostics come back as
plain floats (one device synchronisation per call).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

DIAGNOSTIC_KEYS: tuple[str, ...] = ("delta_frob", "alpha_star", "alpha", "rho", "g_frob", "frozen")


def row_orthonormal(rows: int, cols: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, cols)`` with orthonormal rows (``M M^T = I_rows``), ``rows <= cols``; drawn on
    the CPU in float64 then cast, so one seed gives the same matrix everywhere."""
    if not 1 <= rows <= cols:
        raise ValueError(f"a row-orthonormal matrix needs 1 <= rows <= cols, got {rows} x {cols}")
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64),
                           mode="reduced")
    return q.t().contiguous().to(device=device, dtype=dtype)


def _flat(t: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    if t.dim() not in (2, 3) or t.shape[-1] != dim:
        raise ValueError(f"{what} must be (batch, {dim}) or (batch, time, {dim}), "
                         f"got {tuple(t.shape)}")
    return t.reshape(-1, dim)


class StiefelExpander(nn.Module):
    """One layer's expander: ``U`` ``(d, r)`` on St(d, r), gain ``alpha``, EMA ``ema_G`` ``(d, r)``."""

    def __init__(self, d: int, r: int, alpha_init: float = 0.1,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= r <= d:
            raise ValueError(f"the Stiefel manifold St(d, r) needs 1 <= r <= d, got d={d}, r={r}")
        if not alpha_init > 0:
            raise ValueError(f"alpha_init must be positive, got {alpha_init!r}")
        self.d, self.r = d, r
        self.register_buffer("U", row_orthonormal(r, d, generator, device, dtype).t().contiguous())
        self.register_buffer("alpha", torch.tensor(float(alpha_init), device=device, dtype=dtype))
        self.register_buffer("ema_G", torch.zeros(d, r, device=device, dtype=dtype))

    def delta(self, c: torch.Tensor) -> torch.Tensor:
        """Feedback ``alpha c U^T``: ``(..., r)`` -> ``(..., d)``."""
        return self.alpha * (c @ self.U.t())

    @torch.no_grad()
    def update_tensors(self, g_hat: torch.Tensor, c: torch.Tensor, *, eta: float = 3e-5,
                       tau: float = 0.99, beta_alpha: float = 0.01, eps: float = 1e-8,
                       alpha_min: float = 1e-4, alpha_max: float = 10.0,
                       max_step_frob: float | None = 1.0,
                       frozen: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`update` without the host synchronisation: diagnostics as 0-d tensors."""
        if not 0 < alpha_min <= alpha_max:
            raise ValueError(f"need 0 < alpha_min <= alpha_max, got {alpha_min}, {alpha_max}")
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"tau must lie in [0, 1), got {tau!r}")
        g = _flat(g_hat, self.d, "g_hat")
        cf = _flat(c, self.r, "c")
        if g.shape[0] != cf.shape[0]:
            raise ValueError(f"g_hat {tuple(g_hat.shape)} and c {tuple(c.shape)} must share "
                             "their leading (batch[, time]) dimensions")
        n = max(g.shape[0], 1)
        G = (g.t() @ cf) / n
        self.ema_G.mul_(tau).add_(G, alpha=1.0 - tau)
        g_frob = torch.linalg.norm(G)
        if frozen:
            delta_frob = alpha_star = torch.full_like(g_frob, float("nan"))
        else:
            utg = self.U.t() @ self.ema_G
            step = self.ema_G - self.U @ (0.5 * (utg + utg.t()))  # tangent projection
            delta_frob = torch.linalg.norm(step)
            if max_step_frob is not None:
                scale = torch.where(delta_frob > max_step_frob, max_step_frob / (delta_frob + eps),
                                    torch.ones_like(delta_frob))
                step = step * scale
            q, r = torch.linalg.qr(self.U + (eta * self.alpha) * step, mode="reduced")
            s = torch.sign(torch.diagonal(r))
            s = torch.where(s == 0, torch.ones_like(s), s)
            self.U.copy_(q * s.unsqueeze(0))

            c2_mean = cf.square().sum() / n
            alpha_star = ((self.U * G).sum() / (c2_mean + eps)).clamp(min=alpha_min, max=alpha_max)
            self.alpha.mul_(1.0 - beta_alpha).add_(beta_alpha * alpha_star)
        rho = (G * self.U).sum() / (g_frob * self.r ** 0.5 + eps)  # with the updated U
        return {"delta_frob": delta_frob, "alpha_star": alpha_star, "alpha": self.alpha.clone(),
                "rho": rho, "g_frob": g_frob, "frozen": torch.full_like(g_frob, float(frozen))}

    def update(self, g_hat: torch.Tensor, c: torch.Tensor, **kwargs) -> dict[str, float]:
        """Update U and alpha from a local signal ``g_hat`` ``(batch[, time], d)`` and the
        compressed error ``c`` ``(batch[, time], r)``; see :meth:`update_tensors` for the
        keyword arguments. Returns :data:`DIAGNOSTIC_KEYS` as floats (``frozen`` 1.0/0.0;
        ``delta_frob`` and ``alpha_star`` NaN when frozen)."""
        return _floats([self.update_tensors(g_hat, c, **kwargs)])[0]


def _floats(stats: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    if not stats:
        return []
    table = torch.stack([torch.stack([s[k].float() for k in DIAGNOSTIC_KEYS]) for s in stats])
    return [dict(zip(DIAGNOSTIC_KEYS, row)) for row in table.tolist()]


class StiefelFeedback(nn.Module):
    """The whole system: compressor ``C`` ``(r, V)`` and one :class:`StiefelExpander` per layer.

    error_dim: V, the output error's dimension. layer_dims: d_l for each layer. rank: r, capped
    at ``error_dim`` (the reference's rule); every d_l must be at least the rank.
    """

    def __init__(self, error_dim: int, layer_dims: Sequence[int], rank: int = 128, *,
                 alpha_init: float = 0.1, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.rank = min(int(rank), int(error_dim))
        self.register_buffer("C", row_orthonormal(self.rank, error_dim, generator, device, dtype))
        self.layers = nn.ModuleList(
            StiefelExpander(d, self.rank, alpha_init, generator, device, dtype) for d in layer_dims)

    def compress(self, e: torch.Tensor) -> torch.Tensor:
        """``c = e C^T``: ``(batch[, time], V)`` -> ``(batch[, time], r)``."""
        return e @ self.C.t()

    def deltas(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer feedback ``alpha_l c U_l^T``, each ``(batch[, time], d_l)``."""
        return [layer.delta(c) for layer in self.layers]

    def update(self, g_hats: Sequence[torch.Tensor], c: torch.Tensor, *, frozen: bool = False,
               **kwargs) -> list[dict[str, float]]:
        """Update every layer (``g_hats[l]`` ``(batch[, time], d_l)``); one dict of floats per
        layer, with a single device synchronisation for all of them."""
        if len(g_hats) != len(self.layers):
            raise ValueError(f"got {len(g_hats)} local signals for {len(self.layers)} layers")
        return _floats([layer.update_tensors(g, c, frozen=frozen, **kwargs)
                        for layer, g in zip(self.layers, g_hats)])
