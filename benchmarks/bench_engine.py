"""Training throughput (samples/s) of BP, block FA and DFA on ResidualMLP d=256 L=4, batch 128,
CIFAR-shaped data: fa_study's trainer against the reference pipeline, both measured in this run.

* ours: ``fa_study.train.train`` -- in-memory ``BatchIterator`` with batched crop + flip, one
  (fused) AdamW with parameter groups, one forward per step (FA/DFA reuse it), no host sync per
  step. The epoch time (``--steps`` steps) comes from ``history.attrs["epoch_seconds"]`` and
  includes the end-of-epoch evaluation on a 128-sample test set.
* reference (003): ``DataLoader(num_workers=2)`` over a Dataset of PIL images with RandomCrop(32,
  padding=4) + RandomHorizontalFlip + ToTensor + Normalize, one AdamW per block (plus embedding
  and head), ``.item()`` every step, and the local losses of ``003`` (a no-grad forward, then a
  separate forward per block and for the embedding), timed over an epoch of ``--steps`` steps
  (its workers started afresh, as 003's loader does every epoch).

Every number is the best of ``--repeats`` rounds after a warm-up round; the rules and the two
pipelines alternate within each round so that load from other processes hits them alike.

    python benchmarks/bench_engine.py [--steps 100] [--repeats 3] [--device cpu] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fa_study import data
from fa_study.config import seed_everything
from fa_study.models import build_model
from fa_study.rules import build_rule
from fa_study.train import TrainConfig, train

from reference_pipeline import MEAN, STD, PILCifar  # benchmarks/, on the path when run as a script

RULES = ("bp", "fa", "dfa")
D, L, C = 256, 4, 10


# --------------------------------------------------------------------------------------------
# The reference pipeline (003)
# --------------------------------------------------------------------------------------------

class ReferenceStep:
    """One training step of 003's ``train_bp`` / ``train_fa`` / ``train_dfa`` on our ResidualMLP."""

    def __init__(self, rule: str, model, device: torch.device):
        self.rule, self.model = rule, model
        adamw = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)  # noqa: E731
        if rule == "bp":
            self.opt = adamw(model.parameters())
            return
        self.block_opts = [adamw(b.parameters()) for b in model.blocks]
        self.embed_opt = adamw(model.embed_parameters())
        self.head_opt = adamw(model.head_parameters())
        g = torch.Generator().manual_seed(0)
        shape, scale = ((D, C), math.sqrt(C)) if rule == "dfa" else ((D, D), math.sqrt(D))
        self.B = [(torch.randn(*shape, generator=g) / scale).to(device) for _ in range(L)]

    @staticmethod
    def _local(f, a):
        rms = (a ** 2).mean(-1, keepdim=True).sqrt() + 1e-6
        return (f * (a / rms)).sum(-1).mean()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        m = self.model
        x = x.view(x.size(0), -1)
        if self.rule == "bp":
            logits = m(x)
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return loss.item(), (logits.argmax(1) == y).sum().item()
        with torch.no_grad():
            logits, hiddens = m(x, return_hidden=True)
            loss_val = F.cross_entropy(logits, y)
        if self.rule == "dfa":
            e = logits.softmax(-1)
            e[torch.arange(x.size(0)), y] -= 1
            self.head_opt.zero_grad()
            F.cross_entropy(m.readout(hiddens[-1].detach()), y).backward()
            self.head_opt.step()
            for l in range(L):
                f = m.blocks[l](hiddens[l].detach())
                self.block_opts[l].zero_grad()
                self._local(f, e @ self.B[l].T).backward()
                self.block_opts[l].step()
            a0 = e @ self.B[0].T
        else:  # fa: credit from the head gradient, passed down through B_l
            h = hiddens[-1].detach().requires_grad_(True)
            self.head_opt.zero_grad()
            F.cross_entropy(m.readout(h), y).backward()
            a = h.grad.detach()
            self.head_opt.step()
            for l in range(L - 1, -1, -1):
                f = m.blocks[l](hiddens[l].detach())
                self.block_opts[l].zero_grad()
                self._local(f, a).backward()
                self.block_opts[l].step()
                a = a @ self.B[l]
            a0 = a
        self.embed_opt.zero_grad()
        self._local(m.embed(x), a0).backward()
        self.embed_opt.step()
        return loss_val.item(), (logits.argmax(1) == y).sum().item()


class ReferenceRunner:
    """003's pipeline for one rule: its own model, optimisers and a persistent DataLoader."""

    def __init__(self, rule: str, u8: np.ndarray, labels: np.ndarray, device: torch.device, batch: int):
        seed_everything(0)
        self.model = build_model("resmlp", d=D, num_blocks=L).to(device)
        self.step = ReferenceStep(rule, self.model, device)
        # not persistent: as in 003, every epoch starts its workers, and no worker keeps
        # prefetching (taking CPU from the other pipeline) between the timed epochs
        self.loader = DataLoader(PILCifar(u8, labels), batch_size=batch, shuffle=True, num_workers=2,
                                 drop_last=True)
        self.device = device

    def seconds(self, steps: int) -> float:
        """Wall time of the first ``steps`` training steps of an epoch, worker start-up and data
        loading included (the workers' shut-down is not)."""
        self.model.train()
        start = time.perf_counter()
        it = iter(self.loader)
        for _ in range(steps):
            xb, yb = next(it)
            self.step(xb.to(self.device), yb.to(self.device))
        elapsed = time.perf_counter() - start
        del it
        return elapsed


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------

def ours_epoch_seconds(rule: str, train_ds, test_ds, batch: int) -> tuple[float, float]:
    """Wall and CPU time of one epoch of ``fa_study.train.train`` (training steps and its
    end-of-epoch evaluation; the epoch-0 evaluation before training is not counted)."""
    seed_everything(0)
    model = build_model("resmlp", d=D, num_blocks=L).to(train_ds.x.device)
    # log_every: one divergence check per epoch (the reference syncs every step; ours need not)
    cfg = TrainConfig(epochs=1, batch_size=batch, augment=True, eval_batch=128, seed=0,
                      log_every=max(len(train_ds) // batch, 1))
    hist = train(model, build_rule(rule), train_ds, test_ds, cfg)
    if hist.attrs["status"] != "ok":
        raise RuntimeError(f"{rule} diverged during the benchmark")
    return hist.attrs["epoch_seconds"][1], hist.attrs["epoch_cpu_seconds"][1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100,
                   help="steps per timed epoch (an epoch of steps x batch samples)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs / windows; the best counts")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the training process (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="10 steps, 1 repeat: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.steps, a.repeats = 10, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    n = a.steps * a.batch
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, C, size=n)
    x = data.normalize(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous(), MEAN, STD).to(device)
    y = torch.from_numpy(labels).to(device)
    mk = lambda xs, ys, split: data.Dataset("cifar10", split, xs, ys, "random-uint8", C, MEAN, STD)  # noqa: E731
    train_ds, test_ds = mk(x, y, "train"), mk(x[:128], y[:128], "test")

    runners = {rule: ReferenceRunner(rule, u8, labels, device, a.batch) for rule in RULES}
    ours_s = {rule: [] for rule in RULES}
    ours_cpu = {rule: [] for rule in RULES}
    ref_s = {rule: [] for rule in RULES}
    # round-robin, so that load from other processes hits every rule alike; round 0 warms up
    for round_ in range(a.repeats + 1):
        for rule in RULES:
            t_ours, cpu_ours = ours_epoch_seconds(rule, train_ds, test_ds, a.batch)
            t_ref = runners[rule].seconds(a.steps if round_ else 5)
            if round_:
                ours_s[rule].append(t_ours)
                ours_cpu[rule].append(cpu_ours)
                ref_s[rule].append(t_ref)
    ours = {rule: n / min(ours_s[rule]) for rule in RULES}
    ref = {rule: n / min(ref_s[rule]) for rule in RULES}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"ResidualMLP d={D} L={L}, batch {a.batch}, CIFAR-shaped data, device {device} ({name}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{a.steps} steps x best of {a.repeats}")
    print(f"{'rule':<6}{'ours samples/s':>16}{'reference samples/s':>21}{'ours/reference':>16}")
    for rule in RULES:
        print(f"{rule:<6}{ours[rule]:>16,.0f}{ref[rule]:>21,.0f}{ours[rule] / ref[rule]:>15.1f}x")
    print("epoch time relative to BP (ours):      "
          f"FA/BP {ours['bp'] / ours['fa']:.2f}   DFA/BP {ours['bp'] / ours['dfa']:.2f}")
    print("epoch time relative to BP (reference): "
          f"FA/BP {ref['bp'] / ref['fa']:.2f}   DFA/BP {ref['bp'] / ref['dfa']:.2f}")
    cpu = {rule: min(v) for rule, v in ours_cpu.items()}
    print("epoch CPU time relative to BP (ours):  "
          f"FA/BP {cpu['fa'] / cpu['bp']:.2f}   DFA/BP {cpu['dfa'] / cpu['bp']:.2f}   "
          f"(process CPU seconds, insensitive to other load; BP {cpu['bp']:.2f} s per epoch)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores "
          "(wall-clock numbers are only meaningful when it is below the core count)")


if __name__ == "__main__":
    main()
