"""Initial feedback matrices B (the same shape as the weight they stand in for).

All draws happen on the CPU in float32 from ``generator`` (the global CPU generator when
``None``) and are then moved to the requested device and dtype, so one seed gives the same B
on every device, in every precision and whatever torch's default dtype is (every tensor made
here names its dtype: under ``torch.set_default_dtype(torch.float64)`` an unnamed one would
be float64 and draw a different stream, or clash with a float32 one).
"""
from __future__ import annotations

import math

import torch

from ..config import check_choice
F32 = torch.float32
FA_INIT_MODES: tuple[str, ...] = ("gaussian", "orthogonal", "ortho_he", "sparse")  # init_feedback's modes


def haar_orthogonal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-distributed (semi-)orthogonal ``(rows, cols)`` matrix: orthonormal rows when
    ``rows <= cols``, orthonormal columns otherwise (the convention of ``nn.init.orthogonal_``)."""
    tall = rows >= cols
    g = torch.randn((rows, cols) if tall else (cols, rows), generator=generator, dtype=F32)
    q, r = torch.linalg.qr(g, mode="reduced")
    # The sign fix makes the distribution Haar rather than biased by QR's convention.
    d = torch.diagonal(r)
    q = q * torch.sign(d).where(d != 0, torch.ones((), dtype=F32))
    return q if tall else q.t()


def sparse_signs(rows: int, cols: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(rows, cols)`` with exactly ``k`` entries of +-1 per row at random columns, zeros elsewhere."""
    # argsort of iid uniforms gives an independent random permutation per row, without a loop.
    idx = torch.rand(rows, cols, generator=generator, dtype=F32).argsort(dim=1)[:, :k]
    signs = torch.randint(0, 2, (rows, k), generator=generator).to(F32) * 2 - 1
    return torch.zeros(rows, cols, dtype=F32).scatter_(1, idx, signs)


def init_feedback(
    shape: torch.Size | tuple[int, ...],
    mode: str = "gaussian",
    init_std: float = 0.02,
    sparse_k: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A feedback matrix of ``shape`` ``(out, *fan_in_dims)``, drawn on the ``(out, fan_in)`` view.

    Modes (as in the reference ``LocalLinear``):

    * ``gaussian``: iid N(0, init_std^2).
    * ``orthogonal``: Haar orthogonal times ``sqrt(fan_in) * init_std``, so its rows have the
      Gaussian B's expected norm when ``out <= fan_in``.
    * ``ortho_he``: Haar orthogonal times ``sqrt(2 / out)`` (He scaling of the backward signal;
      ignores ``init_std``).
    * ``sparse``: ``k`` entries of +-1 per row (default ``k = max(1, fan_in // 16)``), times
      ``init_std * sqrt(fan_in / k)`` so row norms equal the Gaussian B's expected row norm.

    The draw is float32 on the CPU; the result has ``dtype`` (default: torch's default dtype).
    """
    check_choice("fa_init_mode", mode, FA_INIT_MODES)
    out = int(shape[0])
    fan_in = math.prod(int(s) for s in shape[1:])
    if mode == "gaussian":
        b = torch.randn(out, fan_in, generator=generator, dtype=F32) * init_std
    elif mode == "orthogonal":
        b = haar_orthogonal(out, fan_in, generator) * (math.sqrt(fan_in) * init_std)
    elif mode == "ortho_he":
        b = haar_orthogonal(out, fan_in, generator) * math.sqrt(2.0 / out)
    else:
        k = sparse_k if sparse_k is not None else max(1, fan_in // 16)
        if not 1 <= k <= fan_in:
            raise ValueError(f"fa_sparse_k must lie in [1, fan_in={fan_in}], got {k}")
        b = sparse_signs(out, fan_in, k, generator) * (init_std * math.sqrt(fan_in / k))
    return b.reshape(tuple(shape)).to(device=device,
                                      dtype=torch.get_default_dtype() if dtype is None else dtype)


def weight_rms(weight: torch.Tensor) -> float:
    """``||W||_F / sqrt(numel)``: the scale a default B matches (equals W's std for zero-mean W)."""
    w = weight.detach().double()
    return float(w.norm() / math.sqrt(max(w.numel(), 1)))


def layer_std(layer, init_std: float | None) -> float:
    """``init_std``, else the RMS of the layer's weight (nn.Linear's init std
    ``1/sqrt(3 fan_in)`` for an all-zero weight): ``||B||_F ~= ||W||_F`` for a fresh layer and
    for a trained layer converted in place."""
    if init_std is not None:
        return float(init_std)
    return weight_rms(layer.weight) or 1.0 / math.sqrt(3.0 * layer.fan_in)


def draw_gaussian(shape, init_std: float, generator: torch.Generator | None,
                  like: torch.Tensor) -> torch.Tensor:
    """``N(0, init_std^2)`` of ``shape``, drawn on the CPU in float32 (one seed gives the same
    matrix on every device) and moved to ``like``'s device and dtype."""
    return init_feedback(shape, "gaussian", init_std, None, generator, like.device, like.dtype)
