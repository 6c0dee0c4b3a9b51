"""Stiefel feedback: orthonormality, the clamp on alpha, frozen mode, input shapes."""
import copy

import pytest
import torch

from fa_study.feedback import StiefelExpander, StiefelFeedback, row_orthonormal
from fa_study.feedback.stiefel import DIAGNOSTIC_KEYS


def test_compressor_is_row_orthonormal():
    C = row_orthonormal(5, 12, torch.Generator().manual_seed(0))
    torch.testing.assert_close(C @ C.t(), torch.eye(5), atol=1e-6, rtol=0)
    fb = StiefelFeedback(10, [12, 10], rank=32)
    assert fb.rank == 10  # capped at the error dimension
    with pytest.raises(ValueError, match="St"):
        StiefelFeedback(10, [8], rank=9)  # d_l < rank


def test_u_stays_on_the_stiefel_manifold_after_1000_updates():
    g = torch.Generator().manual_seed(0)
    fb = StiefelFeedback(12, [16, 10], rank=4, generator=g)
    start = [layer.U.clone() for layer in fb.layers]
    for _ in range(1000):
        e = torch.randn(8, 12, generator=g)
        c = fb.compress(e)
        g_hats = [torch.randn(8, d, generator=g) + 3 * (c @ torch.ones(4, d) / 4) for d in (16, 10)]
        fb.update(g_hats, c, eta=5.0, tau=0.9, max_step_frob=0.5)
    for layer, U0 in zip(fb.layers, start):
        err = torch.linalg.norm(layer.U.t() @ layer.U - torch.eye(4))
        assert err < 1e-5
        assert not torch.allclose(layer.U, U0, atol=1e-2)  # it did move


def test_u_aligns_with_the_signal_subspace():
    # g_hat = 2.5 c M^T for an orthonormal M: U should rotate into span(M), and the
    # correlation estimate of the gain should recover 2.5.
    g = torch.Generator().manual_seed(1)
    layer = StiefelExpander(12, 3, alpha_init=1.0, generator=g)
    M = torch.linalg.qr(torch.randn(12, 3, generator=g))[0]
    before = torch.linalg.norm(M.t() @ layer.U).item() ** 2 / 3
    for _ in range(60):
        c = torch.randn(32, 3, generator=g)
        stats = layer.update(2.5 * c @ M.t(), c, eta=0.3, tau=0.5)
    after = torch.linalg.norm(M.t() @ layer.U).item() ** 2 / 3  # 1 = same subspace
    assert before < 0.6 and after > 0.99
    assert stats["rho"] > 0.5
    assert stats["alpha_star"] == pytest.approx(2.5, rel=1e-3)


@pytest.mark.parametrize("scale", [100.0, -100.0, 1e-6])
def test_alpha_stays_inside_its_clamp(scale):
    g = torch.Generator().manual_seed(2)
    layer = StiefelExpander(8, 2, alpha_init=0.1, generator=g)
    lo, hi = 0.05, 0.2
    for _ in range(200):
        c = torch.randn(16, 2, generator=g)
        stats = layer.update(scale * (c @ layer.U.t()), c, alpha_min=lo, alpha_max=hi,
                             beta_alpha=0.3, eta=0.1)
        # (float32 bounds: 0.2 is stored as 0.2000000030)
        assert lo * (1 - 1e-6) <= stats["alpha_star"] <= hi * (1 + 1e-6)
        assert lo * (1 - 1e-6) <= stats["alpha"] <= hi * (1 + 1e-6)
    # a strong signal pushes alpha to the upper bound, an anti-correlated or tiny one to the lower
    assert stats["alpha"] == pytest.approx(hi if scale == 100.0 else lo, rel=1e-3)


def test_frozen_mode_changes_only_the_ema():
    g = torch.Generator().manual_seed(3)
    layer = StiefelExpander(6, 2, generator=g)
    layer.ema_G.normal_(generator=g)
    U, alpha, ema = layer.U.clone(), layer.alpha.clone(), layer.ema_G.clone()
    g_hat, c = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 2, generator=g)
    stats = layer.update(g_hat, c, frozen=True, tau=0.9)
    assert torch.equal(layer.U, U) and torch.equal(layer.alpha, alpha)
    G = g_hat.reshape(-1, 6).t() @ c.reshape(-1, 2) / 20
    torch.testing.assert_close(layer.ema_G, 0.9 * ema + 0.1 * G)
    assert stats["frozen"] == 1.0 and stats["alpha"] == pytest.approx(alpha.item())


def test_time_axis_is_the_same_as_flattening_it():
    g = torch.Generator().manual_seed(4)
    fb = StiefelFeedback(9, [7, 5], rank=3, generator=g)
    twin = copy.deepcopy(fb)
    e = torch.randn(2, 6, 9, generator=g)
    c = fb.compress(e)
    assert c.shape == (2, 6, 3)
    assert [d.shape for d in fb.deltas(c)] == [(2, 6, 7), (2, 6, 5)]
    g_hats = [torch.randn(2, 6, d, generator=g) for d in (7, 5)]
    s3 = fb.update(g_hats, c, eta=0.5)
    s2 = twin.update([h.reshape(12, -1) for h in g_hats], c.reshape(12, 3), eta=0.5)
    for a, b in zip(fb.layers, twin.layers):
        torch.testing.assert_close(a.U, b.U)
        torch.testing.assert_close(a.alpha, b.alpha)
    assert s3[0].keys() == set(DIAGNOSTIC_KEYS)
    assert all(type(v) is float for d in s3 for v in d.values())
    assert s3[0]["alpha"] == pytest.approx(s2[0]["alpha"])


def test_delta_formula_and_bad_shapes():
    layer = StiefelExpander(5, 2, alpha_init=0.3)
    c = torch.randn(4, 2)
    torch.testing.assert_close(layer.delta(c), 0.3 * c @ layer.U.t())
    with pytest.raises(ValueError, match=r"\(batch, 5\)"):
        layer.update(torch.randn(4, 6), c)
    with pytest.raises(ValueError, match="leading"):
        layer.update(torch.randn(3, 5), c)
    with pytest.raises(ValueError, match="local signals"):
        StiefelFeedback(4, [4, 4], rank=2).update([torch.randn(2, 4)], torch.randn(2, 2))


def test_retraction_is_the_qr_factor_with_positive_diagonal_so_a_small_step_moves_u_little():
    """U <- Q of U + eta alpha Delta = Q R with diag(R) > 0 (the sign fix): the retracted U is
    continuous in the step, so a tiny step leaves U almost where it was (a raw QR factor may
    flip the sign of whole columns)."""
    g = torch.Generator().manual_seed(5)
    layer = StiefelExpander(10, 4, alpha_init=0.7, generator=g, dtype=torch.float64)
    # any point of St(10, 4): here the drawn U with two columns negated
    layer.U.mul_(torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    U0, alpha = layer.U.clone(), layer.alpha.clone()
    g_hat = torch.randn(16, 10, generator=g, dtype=torch.float64)
    c = torch.randn(16, 4, generator=g, dtype=torch.float64)
    layer.update(g_hat, c, eta=1e-4, tau=0.5, max_step_frob=None)
    ema = 0.5 * (g_hat.t() @ c / 16)  # the EMA started at zero
    sym = U0.t() @ ema
    M = U0 + 1e-4 * alpha * (ema - U0 @ (0.5 * (sym + sym.t())))
    R = layer.U.t() @ M
    torch.testing.assert_close(layer.U @ R, M, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tril(R, -1), torch.zeros_like(R), rtol=0, atol=1e-12)
    assert (torch.diagonal(R) > 0).all()
    assert torch.linalg.norm(layer.U - U0) < 1e-3
