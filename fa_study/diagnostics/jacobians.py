"""Forward-mode readings of a block model: block Jacobians, per-sample gradients, and how close
a rule's feedback matrices are to the ones that would make its credit BP's.

* :func:`block_jvp` / :func:`jvp_jacobian_estimate`: ``pool(J_l p)`` through one block and
  GrAPE's probe estimate of the block's mean Jacobian (forward mode only: GrAPE-FA learns from
  it, so it is mechanism as well as a reading);
* :func:`mean_block_jacobian`: the exact batch-mean Jacobian of a block;
* :func:`per_sample_gradients`: ``d loss_i / d h_l`` summed over positions;
* :func:`block_feedback_quality` / :func:`direct_feedback_quality`: ``fb_align_<l>``, the
  cosine between each feedback matrix and the matrix that would make the credit BP's.

These read the block interface of the package's models (``step``, ``pool``, ``broadcast``):
they answer questions about the package's block rules. Forward-mode passes run with
BatchNorm in eval mode, the math attention kernel and no MultiheadAttention fast path (the
CPU flash kernel and the fast path have no forward-mode derivative).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .signals import buffers_preserved, eval_mode
from .updates import cosine
from .taps import BlockStates


@contextlib.contextmanager
def forward_mode_safe(model: nn.Module) -> Iterator[None]:
    """BatchNorm in eval mode, the math attention kernel and no MultiheadAttention fast path,
    for ``torch.func.jvp`` through any block (each module's mode restored afterwards)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bns = [(m, m.training) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        for m, _ in bns:
            m.training = False
        torch.backends.mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, was in bns:
            m.training = was


def block_jvp(model, l: int, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``pool(J_l p)``: the change of ``pool(h_{l+1})`` when ``h_l`` moves along ``p``.

    ``h`` is the block's input ``h_l``; ``p`` ``(n, d)`` is broadcast over positions (so the
    probed map is the one a ``(batch, d)`` FA signal travels through). Forward mode only
    (``torch.func.jvp`` through ``model.step(l, .)``); returns ``(n, d)``.
    """
    tangent = model.broadcast(p, h).contiguous()
    with torch.no_grad(), forward_mode_safe(model):
        _, jp = torch.func.jvp(lambda t: model.pool(model.step(l, t)), (h,), (tangent,))
    return jp


def jvp_jacobian_estimate(model, l: int, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """GrAPE's ``J_hat = (1/n) sum_i (J_l(h_i) p_i) p_i^T`` ``(d, d)`` from probes ``p`` ``(n, d)``
    at the inputs ``h`` (``n`` samples); ``E_p[J_hat]`` is the batch-mean Jacobian (row = output)."""
    jp = block_jvp(model, l, h, p)
    return jp.t() @ p / p.shape[0]


def mean_block_jacobian(model, l: int, h: torch.Tensor, chunk_rows: int = 8192) -> torch.Tensor:
    """The exact batch-mean Jacobian ``(1/n) sum_i d pool(h_{l+1,i}) / d h_{l,i}`` ``(d, d)``
    (rows: outputs) at the block inputs ``h`` (``n`` samples): one forward-mode pass per group
    of basis directions, each over ``chunk_rows`` rows at most."""
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


def per_sample_gradients(model, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Exact ``d loss_i / d h_l`` ``(n, d)`` (summed over positions: the gradient along the
    broadcast direction) at every hidden state, by autograd through the BP twin."""
    from .signals import bp_reference

    states = BlockStates(model)
    _, grads, _ = bp_reference(model, x, y, hidden=states)
    # bp_reference differentiates the batch mean: the per-sample loss's gradient is n times it
    return [states.position_sum(g) * x.shape[0] for g in grads]


def block_feedback_quality(B: Sequence[torch.Tensor], model, x: torch.Tensor,
                           y: torch.Tensor) -> dict[str, float]:
    """``fb_align_<l>`` = cos(B_l, J_l) for each block's pass-down matrix ``B_l`` ``(d, d)``, ``J_l``
    the exact batch-mean Jacobian of block l (the matrix that would make FA's pass-down BP's).
    Eval mode; buffers left as they were."""
    with eval_mode(model), buffers_preserved(model):
        with torch.no_grad():
            _, hiddens = model(x, return_hidden=True)
        return {f"fb_align_{l}": cosine(B_l, mean_block_jacobian(model, l, hiddens[l]).to(B_l.dtype))
                for l, B_l in enumerate(B)}


def direct_feedback_quality(matrices: Sequence[torch.Tensor], model, x: torch.Tensor,
                            y: torch.Tensor) -> dict[str, float]:
    """``fb_align_<l>`` = cos(M_l, E[g_l e^T]) for every hidden state, ``M_l`` ``(d, C)`` the matrix
    that maps the output error to ``a_l`` and ``g_l`` the per-sample BP gradient at ``h_l``: the
    direction a linear feedback from ``e`` should take."""
    with eval_mode(model), buffers_preserved(model):
        grads = per_sample_gradients(model, x, y)
        with torch.no_grad():
            logits = model(x)
            e = torch.softmax(logits, dim=-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        n = x.shape[0]
        return {f"fb_align_{l}": cosine(M, (g.t() @ e / n).to(M.dtype))
                for l, (M, g) in enumerate(zip(matrices, grads))}
