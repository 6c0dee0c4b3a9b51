"""Plain (non-residual) MLPs behind the block interface: ``MLP`` (nn.Linear layers, for the
layer-level rules) and ``MatrixMLP`` (explicit matrices, no biases, for reciprocal alignment)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_bool, check_choice
from .base import BlockModel, check_sizes

MLP_ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "identity")
MATRIX_ACTIVATIONS: tuple[str, ...] = ("linear", "relu", "tanh")
# each activation and its derivative, both elementwise at the pre-activations z; the MLP's
# "identity" and the matrix MLP's "linear" (the RA reference's name) are one map
_ACTS = {"identity": (lambda z: z, torch.ones_like),
         "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
         "tanh": (torch.tanh, lambda z: 1 - torch.tanh(z).pow(2)),
         "gelu": (F.gelu, lambda z: torch.ops.aten.gelu_backward(torch.ones_like(z), z))}
_ACTS["linear"] = _ACTS["identity"]


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` applied to ``z``, any shape."""
    return _ACTS[activation][0](z)


def act_deriv(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz, elementwise, at the pre-activations ``z`` (any shape)."""
    return _ACTS[activation][1](z)


def init_gain(activation: str) -> float:
    """The matrix MLP's initialisation gain, as in the RA reference: sqrt(2) for ReLU (Kaiming),
    1 otherwise."""
    return math.sqrt(2.0) if activation == "relu" else 1.0


class _Layer(nn.Module):
    """``act(linear(h))``: one layer of :class:`MLP`, ``(batch, d_in) -> (batch, d_out)``."""

    def __init__(self, d_in: int, d_out: int, activation: str):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return activate(self.linear(h), self.activation)


class MLP(BlockModel):
    """``x -> act(W_e x) -> act(W_1 h) ... -> W_out h``: the MLP of notebook 00.

    ``h_0 = act(W_e x)`` ``(batch, d)``; ``h_{l+1} = act(W_{l+1} h_l)`` (no skip: the branch is
    the block's net change ``step - h``); logits ``= W_out h_L``. ``num_blocks + 1`` hidden layers,
    ``num_blocks + 2`` weight matrices, all ``nn.Linear`` in construction order (the layer-level
    rules convert them).
    """

    arch = "mlp"
    embed_modules = ("embed_layer",)

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, d: int = 256,
                 num_blocks: int = 1, *, activation: str = "relu"):
        d, num_blocks = check_sizes(d, num_blocks)
        check_choice("activation", activation, MLP_ACTIVATIONS)
        super().__init__(input_shape, num_classes, d)
        self.activation = activation
        self.embed_layer = _Layer(self.input_dim, d, activation)
        self.blocks = nn.ModuleList([_Layer(d, d, activation) for _ in range(num_blocks)])
        self.out_head = nn.Linear(d, self.num_classes)

    def embed(self, x):
        return self.embed_layer(self.as_flat(x))


class _Matrix(nn.Module):
    """One explicit weight matrix ``W`` ``(d_out, d_in)`` (no bias) of :class:`MatrixMLP`."""

    def __init__(self, d_in: int, d_out: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.T


class MatrixMLP(BlockModel):
    """The explicit-matrix MLP of reciprocal alignment (reference 001): matrices ``W[l]``
    ``(d_{l+1}, d_l)`` without biases, the activation and an optional LayerNorm (no affine
    parameters) after every hidden layer, the logits ``W_last h`` without either.

    Block interface: ``h_0 = LN(act(x W_0^T))``, ``h_{l+1} = LN(act(h_l W_{l+1}^T))`` for the
    ``depth - 2`` blocks, ``logits = h_L W_last^T``; ``num_blocks = depth - 2`` (``depth``
    counts weight matrices, as in the reference). ``W[l] ~ N(0, gain^2 / d_l)`` with gain sqrt(2)
    for ReLU and 1 otherwise (:func:`init_gain`), from torch's global RNG.
    """

    arch = "matrix_mlp"
    embed_modules = ("embed_layer",)

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, d: int = 256,
                 num_blocks: int = 2, *, activation: str = "linear", ln: bool = True):
        d, num_blocks = check_sizes(d, num_blocks)
        check_choice("activation", activation, MATRIX_ACTIVATIONS)
        self_ln = check_bool("ln", ln)
        super().__init__(input_shape, num_classes, d)
        self.activation, self.ln = activation, self_ln
        self.gain = init_gain(activation)
        self.dims = [self.input_dim] + [d] * (num_blocks + 1) + [self.num_classes]
        self.embed_layer = _Matrix(self.dims[0], d, self.gain / math.sqrt(self.dims[0]))
        self.blocks = nn.ModuleList([_Matrix(d, d, self.gain / math.sqrt(d)) for _ in range(num_blocks)])
        self.out_head = _Matrix(d, self.num_classes, self.gain / math.sqrt(d))

    def matrices(self) -> list[nn.Parameter]:
        """``[W_0, ..., W_last]``, each ``(d_{l+1}, d_l)``: the reference's ``W`` list."""
        return [self.embed_layer.weight] + [b.weight for b in self.blocks] + [self.out_head.weight]

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        h = activate(z, self.activation)
        return F.layer_norm(h, h.shape[-1:]) if self.ln else h

    def embed(self, x):
        return self._hidden(self.embed_layer(self.as_flat(x)))

    def step(self, l, h):
        return self._hidden(self.blocks[l](h))
