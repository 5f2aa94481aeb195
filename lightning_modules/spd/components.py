"""Rank-one subcomponents V[:, c] U[c, :] that together replace one weight matrix of a target model.

Layouts: a decomposed linear map has V (d_in, C) and U (C, d_out); its weight (V U)^T is in
nn.Linear's (d_out, d_in) layout. HF GPT-2's `Conv1D` stores its weight (d_in, d_out), so
`target_weight` transposes it. An embedding has V (vocab, C), U (C, d) and weight V U (vocab, d).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def module_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (transformers' Conv1D, matched by class name), 'embedding', or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return "conv1d"
    return None


def target_weight(module: nn.Module) -> Tensor:
    """The module's weight as (d_out, d_in) for Linear / Conv1D, (vocab, d) for Embedding."""
    kind = module_kind(module)
    if kind in ("linear", "embedding"):
        return module.weight
    if kind == "conv1d":
        return module.weight.t()  # Conv1D computes x @ W + b with W (d_in, d_out)
    raise ValueError(f"cannot decompose module of type {type(module).__name__}")


def module_in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear / Conv1D, or (vocab, d) of an Embedding."""
    rows, cols = target_weight(module).shape
    return (rows, cols) if module_kind(module) == "embedding" else (cols, rows)


def _member_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x @ w; for members' weights w (k, a, b): x (n, a), shared by the members, or (k, n, a), one per
    member, -> (k, n, b) (members are for targets whose decomposed modules take (batch, features))."""
    if w.dim() == 3 and x.dim() not in (2, 3):
        raise ValueError(
            f"members: a module input must be (batch, d) or (members, batch, d), got {tuple(x.shape)}"
        )
    return x @ w  # (n, a) @ (k, a, b) broadcasts to (k, n, b); (k, n, a) @ (k, a, b) is a batched matmul


class LinearComponents(nn.Module):
    """C rank-one subcomponents of a linear map: y = ((x V) * mask) U + delta_mask * (x Delta^T) + b."""

    def __init__(
        self, d_in: int, d_out: int, C: int, bias: Tensor | None = None, members: int | None = None
    ) -> None:
        super().__init__()
        if C < 1:
            raise ValueError(f"C must be >= 1, got {C}")
        self.d_in, self.d_out, self.C = d_in, d_out, C
        # members k: V (k, d_in, C) and U (k, C, d_out), one decomposition per member (spd/members.py)
        lead = () if members is None else (members,)
        self.V = nn.Parameter(torch.randn(*lead, d_in, C) / math.sqrt(d_in))  # N(0, 1/d_in)
        self.U = nn.Parameter(torch.randn(*lead, C, d_out) / math.sqrt(C))  # N(0, 1/C)
        # Biases are never decomposed: a frozen copy of the target's (ComponentModel passes None and
        # adds the target module's own bias instead, so it can never go stale).
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> Tensor:
        """(V U)^T: (d_out, d_in), nn.Linear layout ((k, d_out, d_in) for k members)."""
        return (self.V @ self.U).mT

    def component_acts(self, x: Tensor) -> Tensor:
        """g = x V: (..., d_in) -> (..., C)."""
        return _member_matmul(x.to(self.V.dtype), self.V)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        weight_delta: Tensor | None = None,
        delta_mask: Tensor | None = None,
    ) -> Tensor:
        """x (..., d_in), mask (..., C) or broadcastable, weight_delta (d_out, d_in), delta_mask (...).
        With k members: V, U and weight_delta carry a leading (k) dim, x is (..., d_in) shared by the members
        or (k, ..., d_in), and the output (k, ..., d_out)."""
        x = x.to(self.V.dtype)
        acts = _member_matmul(x, self.V)  # (..., C)
        if mask is not None:
            acts = acts * mask
        out = acts @ self.U  # (..., d_out)
        if weight_delta is not None:
            if weight_delta.dim() == 2:
                delta_out = nn.functional.linear(x, weight_delta)  # (..., d_out)
            else:  # members: (k, d_out, d_in), x (k, n, d_in) or (n, d_in)
                delta_out = _member_matmul(x, weight_delta.mT)
            out = out + (delta_out if delta_mask is None else delta_mask.unsqueeze(-1) * delta_out)
        if self.bias is not None:
            out = out + self.bias
        return out


class EmbeddingComponents(nn.Module):
    """C rank-one subcomponents of an embedding table: acts = V[ids], out = (acts * mask) U (+ delta)."""

    def __init__(self, vocab_size: int, embedding_dim: int, C: int) -> None:
        super().__init__()
        if C < 1:
            raise ValueError(f"C must be >= 1, got {C}")
        self.vocab_size, self.embedding_dim, self.C = vocab_size, embedding_dim, C
        self.V = nn.Parameter(torch.randn(vocab_size, C) / math.sqrt(vocab_size))  # N(0, 1/vocab)
        self.U = nn.Parameter(torch.randn(C, embedding_dim) / math.sqrt(C))  # N(0, 1/C)

    @property
    def weight(self) -> Tensor:
        """V U: (vocab, d), nn.Embedding layout."""
        return self.V @ self.U

    def component_acts(self, ids: Tensor) -> Tensor:
        """g = V[ids]: (...) int -> (..., C)."""
        return self.V[ids]

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        weight_delta: Tensor | None = None,
        delta_mask: Tensor | None = None,
    ) -> Tensor:
        """ids (...) int, mask (..., C), weight_delta (vocab, d), delta_mask (...) -> (..., d)."""
        acts = self.V[ids]  # (..., C)
        if mask is not None:
            acts = acts * mask
        out = acts @ self.U  # (..., d)
        if weight_delta is not None:
            delta_out = weight_delta[ids]  # (..., d)
            out = out + (delta_out if delta_mask is None else delta_mask.unsqueeze(-1) * delta_out)
        return out


Components = LinearComponents | EmbeddingComponents


def make_components(module: nn.Module, C: int, members: int | None = None) -> Components:
    """Components shaped for a Linear / Conv1D / Embedding target (bias left to the caller); `members`:
    that many stacked sets (Linear / Conv1D only)."""
    d_a, d_b = module_in_out(module)
    if module_kind(module) == "embedding":
        if members is not None:
            raise ValueError("members: an Embedding cannot be decomposed in a member ensemble")
        return EmbeddingComponents(d_a, d_b, C)
    return LinearComponents(d_a, d_b, C, members=members)
