"""Would stacking the seeds of one rule into one model pay? K ResidualMLPs as one stacked model
against the package's own training step, side by side.

The stacked model holds every parameter with a leading model axis (weights ``(K, in, out)``,
biases and LayerNorm affines ``(K, 1, d)``) and runs the same computation as
``fa_study.models.ResidualMLP`` (embed, pre-LN blocks ``h + W2 GELU(W1 LN(h))``, final LN, head)
with batched products (``baddbmm``); its loss is the sum of the K models' mean cross-entropies,
so each model receives its own gradient; AdamW's fused kernel steps all K at once. BP only: the
other rules would stack the same products. The package's step is ``rule.fill_grads`` +
``optimizer.step`` of one model (``fa_study.train.make_optimizer``), as in ``bench_step``.

Reported: samples/s of the K models together for K = 1, 2, 4, 8 and their ratio to the
package's step at the same thread count (above 1: stacking pays), median over ``--repeats``
interleaved rounds after a warm-up round. At n threads the package's alternative is n one-thread
units in n processes (``fa_study.units``), which the last column estimates as n times its
one-thread step.

    python benchmarks/bench_stack.py [--steps 30] [--repeats 3] [--threads 1,2] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fa_study.models import build_model
from fa_study.rules import build_rule
from fa_study.train import TrainConfig, make_optimizer

D, L, C, BATCH, IN = 256, 4, 10, 128, 3 * 32 * 32


def stacked_params(K: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The K models' parameters, initialised at the scales of ``ResidualMLP``."""
    P = {"embed_w": torch.randn(K, IN, D, generator=g) * IN ** -0.5, "embed_b": torch.zeros(K, 1, D)}
    for l in range(L):
        P |= {f"ln{l}_w": torch.ones(K, 1, D), f"ln{l}_b": torch.zeros(K, 1, D),
              f"w1_{l}": torch.randn(K, D, D, generator=g) * D ** -0.5, f"b1_{l}": torch.zeros(K, 1, D),
              f"w2_{l}": torch.randn(K, D, D, generator=g) * 0.01, f"b2_{l}": torch.zeros(K, 1, D)}
    P |= {"ln_w": torch.ones(K, 1, D), "ln_b": torch.zeros(K, 1, D),
          "head_w": torch.randn(K, D, C, generator=g) * D ** -0.5, "head_b": torch.zeros(K, 1, C)}
    return {k: v.requires_grad_(True) for k, v in P.items()}


def stacked_loss(P: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the K models of their mean cross-entropy; ``x`` ``(K, batch, IN)``, ``y`` ``(K, batch)``."""
    def ln(h, name):
        return F.layer_norm(h, (D,)) * P[f"{name}_w"] + P[f"{name}_b"]

    h = torch.baddbmm(P["embed_b"], x, P["embed_w"])
    for l in range(L):
        z = torch.baddbmm(P[f"b1_{l}"], ln(h, f"ln{l}"), P[f"w1_{l}"])
        h = h + torch.baddbmm(P[f"b2_{l}"], F.gelu(z), P[f"w2_{l}"])
    logits = torch.baddbmm(P["head_b"], ln(h, "ln"), P["head_w"])
    return F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="sum") / x.shape[1]


def stacked_rate(K: int, steps: int) -> float:
    """Samples/s of K stacked models together (one warm-up step)."""
    g = torch.Generator().manual_seed(0)
    P = stacked_params(K, g)
    opt = torch.optim.AdamW(P.values(), lr=1e-3, weight_decay=0.05, fused=True)
    x, y = torch.randn(K, BATCH, IN, generator=g), torch.randint(0, C, (K, BATCH), generator=g)

    def step():
        opt.zero_grad(set_to_none=False)
        stacked_loss(P, x, y).backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * K / (time.perf_counter() - start)


def package_rate(steps: int) -> float:
    """Samples/s of the package's BP step on one ResidualMLP (one warm-up step)."""
    torch.manual_seed(0)
    model = build_model("resmlp", input_shape=(3, 32, 32), num_classes=C, d=D, num_blocks=L)
    rule = build_rule("bp")
    rule.setup(model, C, torch.Generator().manual_seed(0))
    opt = make_optimizer(rule.param_groups(model), TrainConfig())
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, C, (BATCH,))
    rule.fill_grads(model, x, y)
    opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        rule.fill_grads(model, x, y)
        opt.step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median counts")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                   help="torch thread counts to measure (default: one and all)")
    p.add_argument("--quick", action="store_true", help="5 steps, 1 round: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.steps, a.repeats = 5, 1
    threads, ks = sorted({int(t) for t in a.threads.split(",")}), (1, 2, 4, 8)
    res: dict[tuple, list[float]] = {}
    for round_ in range(a.repeats + 1):  # round 0 warms up
        for t in threads:
            torch.set_num_threads(t)
            got = {("package", t): package_rate(a.steps)} | {(k, t): stacked_rate(k, a.steps) for k in ks}
            for key, value in got.items():
                if round_:
                    res.setdefault(key, []).append(value)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"BP on ResidualMLP d={D} L={L}, batch {BATCH}, CIFAR-shaped inputs, CPU, torch "
          f"{torch.__version__}, {a.steps} steps, median of {a.repeats} rounds; samples/s")
    for t in threads:
        base = med[("package", t)]
        cells = "  ".join(f"K={k} {med[(k, t)]:,.0f} ({med[(k, t)] / base:.2f}x)" for k in ks)
        units = (f"; {t} one-thread units: {t * med[('package', 1)]:,.0f}"
                 if t > 1 and ("package", 1) in med else "")
        print(f"{t} thread{'s' if t > 1 else ''}: package step {base:,.0f}; stacked: {cells}{units}")


if __name__ == "__main__":
    main()
