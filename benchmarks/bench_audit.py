"""One ``fa_study.diagnostics.audit`` on this machine, and ||g_l|| from fa_study against autograd
and against reference 003's ``FAProtocol._compute_bp_grad_norms``.

1. Time of one ``audit`` (median of ``--repeats`` after a warm-up; hidden states found, BP twin
   built, one forward and backward): torchvision ``resnet18(num_classes=10)`` on 128 images
   3x32x32, and the reference-layout ResidualMLP (d=256, L=4) on 128 MNIST-shaped inputs.
2. Per model of ``tests/test_diagnostics_any_model.py`` (the models a user writes there, at their
   toy sizes, float64, eval mode, at initialisation), the median per-sample ||g_l|| (pooled as the
   audit pools: row, cls token, global average) from
   * ``fa_study``: ``audit(model, x, y).grad_norms``,
   * ``autograd``: the test file's independent computation (the model's own forward, or its
     modules called one by one, ``retain_grad`` on each h_l; plain BP for foreign FA layers),
   * ``003 (defective)``: the reference's method re-implemented here for comparison only: it
     rebuilds ``h_{l+1} = h_l + block(h_l)`` from h_0 for every shape-preserving block (its
     ``_block_has_internal_skip`` returns False), through the blocks' own backward, and needs
     ``.blocks``, ``.out_head`` and ``forward(x, return_hidden=True)``.
3. The same at 003's sizes (ViTMini d=128 4 blocks, SmallResNet d=64 4 blocks, ResidualMLP d=256
   L=4; 128 CIFAR-shaped inputs, float32, at initialisation).

    python benchmarks/bench_audit.py [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

from fa_study.diagnostics import audit

# The user-written models and the independent computation live in the test file.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_diagnostics_any_model as T  # noqa: E402


# --------------------------------------------------------------------------------------------
# 003's method, re-implemented for comparison only (FAProtocol._compute_bp_grad_norms)
# --------------------------------------------------------------------------------------------

def reference_defective_grad_norms(model, x, y) -> list[float] | None:
    """003's ``_compute_bp_grad_norms`` (DEFECTIVE: it adds the skip again after blocks that
    already add it, and differentiates the blocks' own backward). None where the model lacks
    the interface it needs."""
    if not (hasattr(model, "blocks") and hasattr(model, "out_head")):
        return None
    with torch.no_grad():
        try:
            _, hiddens = model(x, return_hidden=True)
        except TypeError:
            return None
    hs = [hiddens[0].detach().clone().requires_grad_(True)]
    with torch.enable_grad():
        for block in model.blocks:
            h_next = block(hs[-1])
            if h_next.shape == hs[-1].shape:  # and not _block_has_internal_skip(block): always
                h_next = hs[-1] + h_next
            hs.append(h_next)
        h = hs[-1]
        if h.dim() == 4:
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        elif h.dim() == 3:
            h = h[:, 0]
        if hasattr(model, "out_ln"):
            h = model.out_ln(h)
        grads = torch.autograd.grad(F.cross_entropy(model.out_head(h), y), hs, allow_unused=True)
    norms = []
    for g in grads:
        if g.dim() == 4:
            g = F.adaptive_avg_pool2d(g, 1).flatten(1)
        elif g.dim() == 3:
            g = g[:, 0]
        norms.append(float(g.norm(dim=-1).median()))
    return norms


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def time_audit(model, x, y, repeats: int) -> float:
    audit(model, x, y)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        audit(model, x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_table(repeats: int, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rn = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x_rn = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    mlp = T.ResidualMLP(784, 256, 10, 4).eval()
    x_mlp = torch.randn(n, 1, 28, 28, generator=g)
    print(f"1. One audit, float32, batch {n}, median of {repeats} after a warm-up "
          f"(torch threads={torch.get_num_threads()})")
    print(f"{'model':<48}{'seconds':>10}")
    for name, model, x in (("torchvision resnet18, 3x32x32", rn, x_rn),
                           ("reference-layout ResidualMLP d=256 L=4, 1x28x28", mlp, x_mlp)):
        print(f"{name:<48}{time_audit(model, x, y, repeats):>10.3f}")


# --------------------------------------------------------------------------------------------
# ||g_l|| tables
# --------------------------------------------------------------------------------------------

def norms_table(title: str, model, x, y, states_fn, bp_model=None, hidden=None, pool="flat") -> None:
    """fa_study, the independent autograd and 003's method, one row per hidden state."""
    model.eval()
    report = audit(model, x, y, hidden=hidden)
    _, ref_g, _ = T.independent(states_fn, bp_model if bp_model is not None else model, x, y)
    auto = T._median_norms(ref_g, pool)
    theirs = reference_defective_grad_norms(model, x, y)
    print(f"\n{title}  [{report.hidden_how}; BP on {report.twin.split(':')[0]}]")
    print(f"  {'l':<3}{'h_l read':<42}{'fa_study':>11}{'autograd':>11}{'003 (defective)':>17}"
          f"{'003/ours':>10}")
    for l, (read, ours, a) in enumerate(zip(report.hidden_read, report.grad_norms, auto)):
        ref = f"{theirs[l]:>17.3e}{theirs[l] / ours:>10.3f}" if theirs else f"{'n/a':>17}{'':>10}"
        print(f"  {l:<3}{read[:41]:<42}{ours:>11.3e}{a:>11.3e}{ref}")
    worst = max(abs(o - a) / a for o, a in zip(report.grad_norms, auto))
    note = ("003 cannot run: no .blocks / .out_head / forward(x, return_hidden=True)" if theirs is None
            else f"003 off by up to {max(max(t / o, o / t) for t, o in zip(theirs, report.grad_norms)):.2f}x")
    print(f"  fa_study vs autograd: max relative difference {worst:.1e}; {note}")


def test_model_tables() -> None:
    print("\n2. Median ||g_l|| on the models of tests/test_diagnostics_any_model.py "
          "(toy sizes, float64, eval, at initialisation)")
    for case, (_, _, _, states_fn, hidden, pool, _) in T.CASES.items():
        model, x, y = T.make(case)
        norms_table(case, model, x, y, states_fn, hidden=hidden, pool=pool)
    plain, fa, x, y = T._fa_resmlp()
    norms_table("resmlp_add with foreign FA layers (w1, w2 of every block)", fa, x, y,
                T._states_from_forward, bp_model=plain, pool="flat")
    for case, build in T.DEFECT_MODELS.items():
        _, x, y = T.make(case)
        torch.manual_seed(0)
        norms_table(f"{case}, 4 blocks (003's depth)", build().double(), x, y,
                    T._states_from_forward, pool=T.CASES[case][5])


def reference_size_tables(n: int) -> None:
    print(f"\n3. Median ||g_l|| at 003's sizes ({n} CIFAR-shaped inputs, float32, eval, at initialisation)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    builds = {
        "ViTMini d=128, 4 heads, 4 blocks, patch 4 (65 tokens)":
            (lambda: T.ViTMini(image_size=32, patch_size=4, d=128, heads=4, num_blocks=4,
                               num_classes=10), "cls"),
        "SmallResNet d=64, 4 blocks": (lambda: T.SmallResNet(d=64, num_blocks=4, num_classes=10), "mean"),
        "ResidualMLP d=256, L=4 (residual_add=True)": (lambda: T.ResidualMLP(3072, 256, 10, 4), "flat"),
    }
    for title, (build, pool) in builds.items():
        norms_table(title, build(), x, y, T._states_from_forward, pool=pool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    a = p.parse_args()
    if a.quick:
        a.repeats, a.batch = 1, 16
    timing_table(a.repeats, a.batch)
    test_model_tables()
    reference_size_tables(a.batch)


if __name__ == "__main__":
    main()
