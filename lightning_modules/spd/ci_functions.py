"""Causal-importance (CI) functions: small networks giving one pre-sigmoid importance per component.

- `mlp`: C independent MLPs, component c's sees only its scalar act g_c = (x V)_c (1 -> hidden -> 1);
- `vector_mlp`: C independent MLPs, each on the module's whole input vector (d_in -> hidden -> 1);
- `shared_mlp`: one MLP d_in -> hidden -> C.
The C independent MLPs are batched: stacked weights (C, a, b) applied with one einsum per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

CI_FN_KINDS = ("mlp", "vector_mlp", "shared_mlp")


def _kaiming_(weight: Tensor, fan_in: int, gain: float) -> None:
    """In place N(0, gain^2 / fan_in)."""
    with torch.no_grad():
        weight.normal_(0.0, gain / math.sqrt(fan_in))


class _ParallelMLP(nn.Module):
    """C independent MLPs with layer sizes dims[0] -> ... -> dims[-1] = 1, GELU between layers."""

    def __init__(self, C: int, dims: Sequence[int]) -> None:
        super().__init__()
        self.C = C
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        n_layers = len(dims) - 1
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = nn.Parameter(torch.empty(C, a, b))  # (C, in, out)
            _kaiming_(w, a, math.sqrt(2.0) if i < n_layers - 1 else 1.0)
            self.weights.append(w)
            self.biases.append(nn.Parameter(torch.zeros(C, b)))  # (C, out)

    def _layers(self, h: Tensor, start: int) -> Tensor:
        """Apply layers start.. to h (..., C, in) -> (..., C) (GELU before every layer after the first)."""
        for i in range(start, len(self.weights)):
            if i > 0:
                h = nn.functional.gelu(h)
            w = self.weights[i]  # (C, in, out)
            if w.shape[-1] == 1:  # the output layer: a per-component dot product, cheaper than a bmm
                h = (h * w[..., 0]).sum(-1, keepdim=True) + self.biases[i]
            else:
                h = torch.einsum("...ci,cio->...co", h, w) + self.biases[i]
        return h.squeeze(-1)


class MLPCiFn(_ParallelMLP):
    """C independent scalar MLPs: g (..., C) -> pre-sigmoid CI (..., C)."""

    takes_component_acts = True

    def __init__(self, C: int, hidden_dims: Sequence[int]) -> None:
        super().__init__(C, [1, *hidden_dims, 1])

    def forward(self, g: Tensor) -> Tensor:
        """g (..., C) -> (..., C)."""
        # First layer has fan-in 1: an elementwise affine map per (component, hidden unit).
        h = g.unsqueeze(-1) * self.weights[0][:, 0, :] + self.biases[0]  # (..., C, h0)
        return self._layers(h, start=1)


class VectorMLPCiFn(_ParallelMLP):
    """C independent MLPs on the module input: x (..., d_in) -> pre-sigmoid CI (..., C)."""

    takes_component_acts = False

    def __init__(self, C: int, d_in: int, hidden_dims: Sequence[int]) -> None:
        super().__init__(C, [d_in, *hidden_dims, 1])

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> (..., C)."""
        x = x.to(self.weights[0].dtype)
        h = torch.einsum("...i,cio->...co", x, self.weights[0]) + self.biases[0]  # (..., C, h0)
        return self._layers(h, start=1)


class SharedMLPCiFn(nn.Module):
    """One MLP on the module input: x (..., d_in) -> hidden -> pre-sigmoid CI (..., C)."""

    takes_component_acts = False

    def __init__(self, C: int, d_in: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        dims = [d_in, *hidden_dims, C]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(nn.GELU())
            lin = nn.Linear(a, b)
            _kaiming_(lin.weight, a, math.sqrt(2.0) if i < len(dims) - 2 else 1.0)
            nn.init.zeros_(lin.bias)
            layers.append(lin)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> (..., C)."""
        return self.net(x.to(self.net[0].weight.dtype))


CiFn = MLPCiFn | VectorMLPCiFn | SharedMLPCiFn


def make_ci_fn(kind: str, C: int, d_in: int, hidden: Sequence[int]) -> CiFn:
    """Build a CI function by kind ('mlp', 'vector_mlp', 'shared_mlp'); ValueError otherwise."""
    hidden = [int(h) for h in hidden]
    if kind == "mlp":
        return MLPCiFn(C, hidden)
    if kind == "vector_mlp":
        return VectorMLPCiFn(C, d_in, hidden)
    if kind == "shared_mlp":
        return SharedMLPCiFn(C, d_in, hidden)
    raise ValueError(f"unknown CI function kind {kind!r}; valid kinds: {list(CI_FN_KINDS)}")
