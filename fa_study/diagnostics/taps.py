"""Where a network's hidden states ``h_0 .. h_L`` are: found once, read by forward hooks.

Every reading of :mod:`fa_study.diagnostics` looks at a classifier through a
:class:`HiddenStates`: an object that runs the model on a batch and hands back the logits and
the hidden states *with their autograd graph*, so ``dL/dh_l`` is one ``torch.autograd.grad``
away, whichever backward the model runs. Two kinds exist:

* :class:`BlockStates` for the package's own models (:class:`fa_study.models.BlockModel`): the
  states their ``forward(x, return_hidden=True)`` returns (``h_0 = embed(x)``,
  ``h_{l+1} = step(l, h_l)``), pooled by the model's own ``pool``. (A hook could not read them
  all: ViTMini adds each block's skip and pools the class token outside any module, so its
  ``h_L`` is never a module's input or output.)
* :class:`HookedStates` for any other ``nn.Module``: forward (pre-)hooks on named modules,
  each tap reading a module's output (``"blocks.0"``) or input (``"out_ln:input"``).

:func:`find_hidden_states` resolves a model: the package's models; then a block container (an
``nn.ModuleList`` / ``nn.Sequential`` whose name ends in ``blocks`` or ``layers``, as in the
reference's layout or torchvision's ``VisionTransformer.encoder.layers``) or ResNet stages
(``layer1``, ``layer2``, ...). One probe forward tells whether the blocks return the whole
update (``h_{l+1}`` is the block's output) or only the residual branch (the model adds the
skip: ``h_l`` is block ``l``'s input and ``h_L`` the input of the first module after the
blocks). Anything else is named by the user: ``hidden=["features.2", "features.5", "fc1"]``.

Pooling (the per-sample vector that norms are taken of): ``(batch, d)`` as it is; tokens
``(batch, T, d)`` by the class token when the model has one (a parameter named ``cls_token`` /
``class_token``), else the mean over tokens; spatial ``(batch, C, H, W)`` by the global
average. ``pool="cls" | "mean" | "flat"`` or a callable overrides it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .modes import buffers_preserved, eval_mode

POOLS: tuple[str, ...] = ("auto", "cls", "mean", "flat")
SIDES: tuple[str, ...] = ("output", "input")
CONTAINER_NAMES: tuple[str, ...] = ("blocks", "layers")  # block containers found automatically
_KIND = {"output": "out", "input": "in"}  # a tap's side -> its event in _recorded


@dataclass(frozen=True)
class Tap:
    """One hidden state: the output (or input) of the module called ``module``."""

    module: str  # dotted name as in model.named_modules()
    side: str = "output"  # "output" or "input"

    @classmethod
    def parse(cls, text: str) -> "Tap":
        """``"blocks.0"`` (its output) or ``"out_ln:input"`` (its input)."""
        if not isinstance(text, str):
            raise ValueError(f"a hidden state is named by a module name (str), got {text!r}")
        name, _, side = text.partition(":")
        side = side or "output"
        if side not in SIDES:
            raise ValueError(f"hidden state {text!r}: the part after ':' must be one of "
                             f"{', '.join(SIDES)}, got {side!r}")
        return cls(name, side)

    def __str__(self) -> str:
        return self.module if self.side == "output" else f"{self.module}:input"

    def describe(self) -> str:
        return f"{self.side} of {self.module or '<model>'}"


class HiddenStates:
    """How a model's hidden states are read (see the module doc)."""

    def labels(self) -> list[str]:
        """One line per hidden state saying what was read, e.g. ``"output of blocks.0"``."""
        raise NotImplementedError

    def run(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(logits (batch, C), [h_0 .. h_L])`` with the autograd graph from ``x`` kept.

        ``x`` is made a leaf that requires grad (when it is floating point), so every state
        downstream of it has a gradient even when the layers before it are frozen."""
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """The per-sample vector ``(batch, d)`` of a hidden state."""
        raise NotImplementedError

    def position_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``(batch, d)``: ``t`` summed over positions (tokens, pixels); for a gradient, the
        gradient along a position-constant direction."""
        raise NotImplementedError

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules between ``h_0`` and ``h_L`` (frozen by the depth-utility baseline)."""
        raise NotImplementedError

    def norms(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """Median over the batch of the per-sample L2 norm of ``pool(t)``, for each tensor."""
        with torch.no_grad():
            meds = [torch.linalg.vector_norm(self.pool(t).double(), dim=-1).median() for t in tensors]
            return [float(v) for v in torch.stack(meds).cpu()] if meds else []

    @property
    def num_states(self) -> int:
        return len(self.labels())


def _check_pool(pool):
    if not (callable(pool) or pool in POOLS):
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or a callable, got {pool!r}")
    return pool


def _graph_input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True) if x.is_floating_point() else x


def _logits(out, model: nn.Module) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise ValueError(f"{type(model).__name__} must map a batch to logits (batch, classes); its "
                         f"forward returned {what}. Wrap it in a module whose forward returns the "
                         "logits tensor")
    return out


class BlockStates(HiddenStates):
    """The package's models: ``h_0 = embed(x)``, ``h_{l+1} = step(l, h_l)`` (their own forward)."""

    def __init__(self, model: nn.Module):
        self.model, self.num_blocks = model, model.num_blocks

    def labels(self) -> list[str]:
        return ["embed(x)"] + [f"step {l} (blocks.{l}, skip included)" for l in range(self.num_blocks)]

    def run(self, model, x):
        logits, hiddens = model(_graph_input(x), return_hidden=True)
        return logits, list(hiddens)

    def pool(self, h):
        return self.model.pool(h)

    def position_sum(self, t):
        if t.dim() == 2:
            return t
        with torch.enable_grad():
            v = torch.zeros(t.shape[0], self.model.width, device=t.device, dtype=t.dtype,
                            requires_grad=True)
            out, = torch.autograd.grad((self.model.broadcast(v, t) * t.detach()).sum(), v)
        return out

    def block_modules(self, model):
        return list(model.blocks)


def pool_by_rank(h: torch.Tensor, pool: str | Callable) -> torch.Tensor:
    """``(batch, d)`` from a ``(batch, d)``, ``(batch, T, d)`` or ``(batch, C, H, W)`` state."""
    if callable(pool):
        return pool(h)
    if pool == "flat" or h.dim() == 2:
        return h.reshape(h.shape[0], -1)
    if h.dim() == 3:
        return h[:, 0] if pool == "cls" else h.mean(dim=1)
    return h.mean(dim=tuple(range(2, h.dim())))


def sum_positions(t: torch.Tensor) -> torch.Tensor:
    """``(batch, d)``: tokens summed over dim 1, spatial maps over their trailing dims."""
    return t if t.dim() == 2 else t.sum(dim=1 if t.dim() == 3 else tuple(range(2, t.dim())))


class HookedStates(HiddenStates):
    """Hidden states read by hooks on named modules of any ``nn.Module``.

    ``taps``: one :class:`Tap` (or ``"name"`` / ``"name:input"``) per hidden state ``h_0 ..
    h_L``; ``pool``: one of :data:`POOLS` or a callable ``(batch, ...) -> (batch, d)``;
    ``blocks``: names of the modules between ``h_0`` and ``h_L`` (default: the modules whose
    outputs are ``h_1 .. h_L``); ``how``: how the taps were found (shown in reports).
    """

    def __init__(self, taps: Sequence[Tap | str], pool: str | Callable = "cls", *,
                 blocks: Sequence[str] | None = None, how: str = "named by the user"):
        self.taps = [t if isinstance(t, Tap) else Tap.parse(t) for t in taps]
        if not self.taps:
            raise ValueError("name at least one hidden state (a module whose output is h_0)")
        self._pool = "cls" if _check_pool(pool) == "auto" else pool
        self.blocks = list(blocks) if blocks is not None else [t.module for t in self.taps[1:]]
        self.how = how

    def labels(self):
        return [t.describe() for t in self.taps]

    def check(self, model: nn.Module) -> None:
        """ValueError naming a tap that is not a module of ``model``, with the names it has."""
        names = dict(model.named_modules())
        for t in self.taps:
            if t.module not in names:
                raise ValueError(f"hidden state {str(t)!r}: {type(model).__name__} has no module "
                                 f"{t.module!r}; {_candidates_text(model)}")

    def run(self, model, x):
        self.check(model)
        with _recorded(model, [t.module for t in self.taps]) as events:
            logits = _logits(model(_graph_input(x)), model)
        hiddens = []
        for tap in self.taps:
            seen = [t for n, k, t in events if n == tap.module and k == _KIND[tap.side]]
            if len(seen) != 1:
                raise ValueError(f"hidden state {str(tap)!r}: module {tap.module!r} ran {len(seen)} "
                                 "times in one forward; name a module that runs exactly once")
            h = seen[0]
            if not isinstance(h, torch.Tensor):
                raise ValueError(f"hidden state {str(tap)!r}: the {tap.side} of {tap.module!r} is a "
                                 f"{type(h).__name__}, not a tensor; name another module")
            hiddens.append(h)
        return logits, hiddens

    def pool(self, h):
        return pool_by_rank(h, self._pool)

    def position_sum(self, t):
        return sum_positions(t)

    def block_modules(self, model):
        return [model.get_submodule(n) for n in self.blocks]


# --------------------------------------------------------------------------------------------
# Finding the hidden states of a model
# --------------------------------------------------------------------------------------------

def _containers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Candidate block lists: ``(how, [module names])``, the shallowest first."""
    found = sorted(((n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in CONTAINER_NAMES
                    and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m)),
                   key=lambda t: t[0].count("."))  # the shallowest first (a stable sort)
    out = [(f"the blocks of {name!r}", [f"{name}.{c}" for c, _ in m.named_children()]) for name, m in found]
    stages = []
    children = dict(model.named_children())
    while f"layer{len(stages) + 1}" in children:
        stages.append(f"layer{len(stages) + 1}")
    if stages:
        out.insert(0, ("the ResNet stages " + ", ".join(stages), stages))
    return out


def _has_class_token(model: nn.Module) -> bool:
    return any(n.rsplit(".", 1)[-1] in ("cls_token", "class_token", "cls")
               for n, _ in model.named_parameters())


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
        a is b or (a.shape == b.shape and torch.equal(a, b)))


@contextmanager
def _recorded(model: nn.Module, names: Sequence[str]) -> Iterator[list]:
    """While inside, every call of the modules ``names`` of ``model``, in call order:
    ``(name, "in" | "out", its first input | its output)``; the hooks are removed after."""
    events: list[tuple[str, str, object]] = []
    handles = []
    for name in dict.fromkeys(names):
        m = model.get_submodule(name)
        handles += [
            m.register_forward_pre_hook(lambda _, a, n=name: events.append((n, "in", a[0] if a else None))),
            m.register_forward_hook(lambda _, a, out, n=name: events.append((n, "out", out)))]
    try:
        yield events
    finally:
        for h in handles:
            h.remove()


def _probe(model: nn.Module, x: torch.Tensor):
    """Run the model once recording, in call order, every module's input and output."""
    with _recorded(model, [n for n, _ in model.named_modules()]) as events, torch.no_grad(), \
            eval_mode(model), buffers_preserved(model):
        model(x)
    return events


def _block_taps(model: nn.Module, x: torch.Tensor, blocks: list[str], how: str) -> list[Tap]:
    events = _probe(model, x)
    calls = {b: [i for i, (n, kind, _) in enumerate(events) if n == b and kind == "in"] for b in blocks}
    for b, idx in calls.items():
        if len(idx) != 1:
            raise ValueError(f"{how}: block {b!r} ran {len(idx)} times in one forward; name the "
                             "hidden states yourself with hidden=[...]")
    ins = [events[calls[b][0]][2] for b in blocks]
    out_at = [next(i for i, (n, kind, _) in enumerate(events) if n == b and kind == "out") for b in blocks]
    outs = [events[i][2] for i in out_at]
    last = blocks[-1]
    # the first module called after the last block, outside it: its input is h_L when the
    # model adds the skip itself (the reference's out_ln)
    post = next(((n, t) for n, kind, t in events[out_at[-1] + 1:]
                 if kind == "in" and n != last and not n.startswith(last + ".")), (None, None))
    whole = [_same(outs[l], ins[l + 1]) for l in range(len(blocks) - 1)]
    post_name, post_in = post
    same_shape = (isinstance(post_in, torch.Tensor) and isinstance(ins[-1], torch.Tensor)
                  and post_in.shape == ins[-1].shape)
    whole.append(_same(outs[-1], post_in) or not same_shape)
    if all(whole):
        return [Tap(blocks[0], "input")] + [Tap(b) for b in blocks]
    if not any(whole) and post_name is not None:
        return [Tap(b, "input") for b in blocks] + [Tap(post_name, "input")]
    raise ValueError(f"{how}: some blocks return the whole update h + f(h) and others only the "
                     f"branch f(h) (whole update: {whole}); name the hidden states with hidden=[...]")


def _modules_between(model: nn.Module, x: torch.Tensor, taps: Sequence[Tap]) -> list[str]:
    """Names of the modules holding parameters or buffers of their own that run after ``h_0``
    is produced and before ``h_L`` is (a flat CNN named ``pool1, pool2, fc1``: conv2, its
    BatchNorm and fc1)."""
    events = _probe(model, x)

    def at(tap: Tap) -> int:
        return next(i for i, (n, k, _) in enumerate(events) if n == tap.module and k == _KIND[tap.side])

    start, stop = at(taps[0]), at(taps[-1])
    owns = {n for n, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))}
    names = []
    for i, (n, k, _) in enumerate(events):
        if k == "in" and start < i and n in owns and n not in names:
            end = next(j for j in range(i, len(events)) if events[j][0] == n and events[j][1] == "out")
            if end <= stop:
                names.append(n)
    return names


def _candidates_text(model: nn.Module, limit: int = 24) -> str:
    rows = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and n.count(".") < 2]
    more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
    return "modules found: " + ", ".join(rows[:limit]) + more


def find_hidden_states(model: nn.Module, x: torch.Tensor | None = None, *,
                       hidden: HiddenStates | Sequence[str] | None = None,
                       pool: str | Callable = "auto") -> HiddenStates:
    """The :class:`HiddenStates` of ``model`` (see the module doc for the search order).

    ``x``: a batch the model accepts (two samples are run once to see how its blocks are
    wired; needed unless ``model`` is one of the package's or ``hidden`` names the states);
    ``hidden``: a :class:`HiddenStates`, or module names whose outputs are ``h_0 .. h_L``
    (``"name:input"`` reads a module's input); ``pool``: see the module doc.

    Raises ``ValueError`` listing the modules it found, and how to name them, when the model
    has no block structure it recognises.
    """
    from ..models.base import BlockModel

    if isinstance(hidden, HiddenStates):
        return hidden
    if _check_pool(pool) == "auto":
        pool = "cls" if _has_class_token(model) else "mean"
    if hidden is not None:
        if isinstance(hidden, str):
            raise ValueError(f"hidden takes a list of module names (one per h_l), got the string "
                             f"{hidden!r}; write hidden=[{hidden!r}, ...]")
        states = HookedStates(list(hidden), pool)
        states.check(model)
        if x is not None:  # the modules that run between h_0 and h_L, not only the named ones
            states.blocks = _modules_between(model, x[:2], states.taps)
        return states
    if isinstance(model, BlockModel):
        return BlockStates(model)
    candidates = _containers(model)
    if not candidates:
        raise ValueError(
            f"fa_study found no hidden states in {type(model).__name__}: no block container (an "
            f"nn.ModuleList / nn.Sequential named {' or '.join(map(repr, CONTAINER_NAMES))}) and no "
            "ResNet stages (layer1, layer2, ...). Name the modules whose outputs are h_0 .. h_L, "
            "e.g. hidden=['features.2', 'features.5', 'fc1'] (append ':input' to read a module's "
            f"input) and, for token or spatial states, pool='cls' | 'mean'; {_candidates_text(model)}")
    if x is None:
        raise ValueError("finding the hidden states of a model fa_study did not build needs an "
                         "example batch x (one forward of two samples shows how its blocks are wired)")
    how, blocks = candidates[0]
    taps = _block_taps(model, x[:2], blocks, how)
    return HookedStates(taps, pool, blocks=blocks, how=f"found automatically: {how}")
