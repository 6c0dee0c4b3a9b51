"""How close a training step comes to its own matrix multiplications: the tight bound and each
rule's fraction of it, at one thread and at all threads.

The bound is the throughput of the matrix products alone of one training step of ResidualMLP
d=256 L=4 (CIFAR-shaped inputs, 10 classes, batch 128), run as the model's layers run them:
the forward (``addmm`` with the bias, every linear layer), the weight gradients (every layer)
and the input gradients (every layer but the embedding, whose input needs none). Nothing else
of a step (activations, LayerNorm, the loss, the optimizer, Python) is in it, so no rule can
reach it; the fraction says how much of a step is its matmuls.

The floor adds what no implementation of this model and optimizer can skip: the bound's
matmuls, the elementwise math of the layers (GELU and LayerNorm, forward and backward, as
torch's own kernels compute them) and one step of the trainer's optimizer (AdamW's fused
kernel) over all the parameters. What a step spends beyond the floor is the cost of running it
(autograd, the loss, the residual adds, Python); the floor's own rate says how far the bound is
out of reach for any rule trained with that optimizer.

For every rule two throughputs are measured, in samples/s:

* ``step``: ``rule.fill_grads`` + ``optimizer.step`` in a bare loop over ready batches, the
  optimizer being the one the trainer builds (``fa_study.train.make_optimizer``);
* ``trainer``: one epoch of ``fa_study.train.train`` (batches drawn and shuffled by its
  ``BatchIterator``, divergence check, end-of-epoch evaluation on a 128-sample test set), from
  ``history.attrs["epoch_seconds"]``; ``--augment`` adds the random crop + flip.

``ops/step`` counts the operators one step dispatches (forward, backward, optimizer): on a GPU
each is at least one kernel launch, which is what a small model's step costs there.

Variants are interleaved within each round (so load from other processes hits them alike) and
the median over ``--repeats`` rounds is reported, after a warm-up round.

    python benchmarks/bench_step.py [--steps 60] [--repeats 5] [--rules bp,fa,dfa,oracle]
                                    [--threads 1,2] [--augment] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fa_study import data
from fa_study.config import seed_everything, stream_generator
from fa_study.models import build_model
from fa_study.rules import build_rule
from fa_study.train import TrainConfig, make_optimizer, train

D, L, C, BATCH, SHAPE = 256, 4, 10, 128, (3, 32, 32)


def bound_step(model, x: torch.Tensor, g_hidden: torch.Tensor, g_out: torch.Tensor) -> None:
    """The matrix products of one training step of ``model`` (see the module doc)."""
    layers = [model.embed_linear] + [lin for b in model.blocks for lin in (b.w1, b.w2)] + [model.out_head]
    h = torch.zeros(x.shape[0], D)
    for i, lin in enumerate(layers):  # forward: every layer, with its bias
        F.linear(x if i == 0 else h, lin.weight, lin.bias)
    for i, lin in enumerate(layers):  # weight gradients: every layer
        g = g_out if lin is model.out_head else g_hidden
        torch.mm(g.t(), x if i == 0 else h)
    for lin in layers[1:]:  # input gradients: all but the embedding's
        torch.mm(g_out if lin is model.out_head else g_hidden, lin.weight)


def layer_math(model, h: torch.Tensor, g: torch.Tensor) -> None:
    """The elementwise kernels of one step of ``model`` (``h``, ``g`` ``(batch, d)``): every
    LayerNorm and GELU forward and backward (see the module doc)."""
    lns = [b.ln for b in model.blocks] + [model.out_ln]
    for ln in lns:
        out, mean, rstd = torch.ops.aten.native_layer_norm(h, [D], ln.weight, ln.bias, ln.eps)
        torch.ops.aten.native_layer_norm_backward(g, h, [D], mean, rstd, ln.weight, ln.bias,
                                                  [True, True, True])
    for _ in model.blocks:
        torch.ops.aten.gelu_backward(g, torch.nn.functional.gelu(h))


def bound_rate(steps: int, floor: bool = False) -> float:
    """Samples/s of the bound's matmuls; ``floor``: with the layers' elementwise math and one
    step of the trainer's optimizer over every parameter (gradients set once, as random)."""
    model = build_model("resmlp", input_shape=SHAPE, num_classes=C, d=D, num_blocks=L)
    x = torch.randn(BATCH, model.input_dim)
    g_hidden, g_out = torch.randn(BATCH, D), torch.randn(BATCH, C)
    opt = None
    if floor:
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = make_optimizer([{"params": list(model.parameters())}], TrainConfig())

    def one():
        bound_step(model, x, g_hidden, g_out)
        if opt is not None:
            layer_math(model, g_hidden, g_hidden)
            opt.step()

    with torch.no_grad():
        one()
        start = time.perf_counter()
        for _ in range(steps):
            one()
    return steps * BATCH / (time.perf_counter() - start)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ready(rule_name: str):
    seed_everything(0)
    model = build_model("resmlp", input_shape=SHAPE, num_classes=C, d=D, num_blocks=L)
    rule = build_rule(rule_name)
    rule.setup(model, C, stream_generator(0, "feedback"), train_cfg=TrainConfig())
    return model, rule, make_optimizer(rule.param_groups(model), TrainConfig())


def step_rate(rule_name: str, batches) -> float:
    """Samples/s of ``fill_grads`` + ``optimizer.step`` over ready batches (one warm-up step)."""
    model, rule, opt = _ready(rule_name)
    rule.fill_grads(model, *batches[0])
    opt.step()
    start = time.perf_counter()
    for xb, yb in batches:
        rule.fill_grads(model, xb, yb)
        opt.step()
    return len(batches) * BATCH / (time.perf_counter() - start)


def ops_per_step(rule_name: str, batch) -> int:
    model, rule, opt = _ready(rule_name)
    rule.fill_grads(model, *batch)
    opt.step()
    with _CountOps() as count:
        rule.fill_grads(model, *batch)
        opt.step()
    return count.n


def trainer_rate(rule_name: str, train_ds, test_ds, augment: bool) -> float:
    seed_everything(0)
    model = build_model("resmlp", input_shape=SHAPE, num_classes=C, d=D, num_blocks=L)
    steps = len(train_ds) // BATCH
    cfg = TrainConfig(epochs=1, batch_size=BATCH, augment=augment, eval_batch=128, seed=0, log_every=steps)
    hist = train(model, build_rule(rule_name), train_ds, test_ds, cfg)
    if hist.attrs["status"] != "ok":
        raise RuntimeError(f"{rule_name} diverged during the benchmark")
    return steps * BATCH / hist.attrs["epoch_seconds"][1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median counts")
    p.add_argument("--rules", default="bp,fa,dfa,oracle")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                   help="torch thread counts to measure (default: one and all)")
    p.add_argument("--augment", action="store_true", help="the trainer's runs with random crop + flip")
    p.add_argument("--quick", action="store_true", help="10 steps, 1 round: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.steps, a.repeats = 10, 1
    rules = [r.strip() for r in a.rules.split(",") if r.strip()]
    threads = sorted({int(t) for t in a.threads.split(",")})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.steps * BATCH, *SHAPE, generator=g)
    y = torch.randint(0, C, (a.steps * BATCH,), generator=g)
    mk = lambda xs, ys, split: data.Dataset("cifar10", split, xs, ys, "random", C, (0.0,) * 3, (1.0,) * 3)  # noqa: E731
    train_ds, test_ds = mk(x, y, "train"), mk(x[:128], y[:128], "test")
    batches = [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(a.steps)]
    ops = {rule: ops_per_step(rule, batches[0]) for rule in rules}

    res: dict[tuple, list[float]] = {}
    for round_ in range(a.repeats + 1):  # round 0 warms up
        for t in threads:
            torch.set_num_threads(t)
            got = {("bound", t): bound_rate(a.steps), ("floor", t): bound_rate(a.steps, floor=True)}
            for rule in rules:
                got[(rule, "step", t)] = step_rate(rule, batches)
                got[(rule, "trainer", t)] = trainer_rate(rule, train_ds, test_ds, a.augment)
            for key, value in got.items():
                if round_:
                    res.setdefault(key, []).append(value)
    med = {k: statistics.median(v) for k, v in res.items()}

    aug = ", trainer with augmentation" if a.augment else ""
    print(f"ResidualMLP d={D} L={L}, batch {BATCH}, CIFAR-shaped inputs, CPU, torch {torch.__version__}, "
          f"{a.steps} steps, median of {a.repeats} rounds{aug}")
    for t in threads:
        bound, floor = med[("bound", t)], med[("floor", t)]
        print(f"\n{t} thread{'s' if t > 1 else ''}: tight bound (the step's matmuls) {bound:,.0f} samples/s; "
              f"floor (+ GELU, LayerNorm, AdamW's kernel) {floor:,.0f} = {floor / bound:.2f} of the bound")
        print(f"{'rule':<10}{'ops/step':>9}{'step samples/s':>16}{'of bound':>10}{'of floor':>10}"
              f"{'trainer samples/s':>19}{'of bound':>10}{'of floor':>10}")
        for rule in rules:
            s, tr = med[(rule, "step", t)], med[(rule, "trainer", t)]
            print(f"{rule:<10}{ops[rule]:>9}{s:>16,.0f}{s / bound:>10.2f}{s / floor:>10.2f}"
                  f"{tr:>19,.0f}{tr / bound:>10.2f}{tr / floor:>10.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores "
          "(absolute numbers mean something only when it is below the core count; the fractions "
          "are of a bound measured in the same round)")


if __name__ == "__main__":
    main()
