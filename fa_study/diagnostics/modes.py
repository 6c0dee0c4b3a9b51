"""Model state a diagnostic must leave as it found: train/eval flags and buffers."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode; afterwards each module's own flag is restored (so BatchNorm
    pinned to eval inside frozen blocks stays so)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextmanager
def buffers_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards when any module is training, so a diagnostic forward
    never moves BatchNorm running statistics."""
    if not any(m.training for m in model.modules()):
        yield
        return
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])
