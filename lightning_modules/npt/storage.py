"""Low-precision storage of the frozen base weights: kept in bf16, cast to the compute dtype at each use.

NPT trains only the NP components, so every base weight is read-only. :func:`store_frozen` keeps each
frozen floating parameter in ``storage`` (e.g. bfloat16, half the bytes of float32) and registers a
parametrization that returns it cast to ``compute`` (float32) whenever a module reads it, so every
matmul, norm and embedding still runs in the compute dtype (unlike ``target_dtype``, no mixed precision
is needed, and it works on a CPU). The cast copy lives only while the op that reads it needs it. The
only error is the rounding of the weights to bf16 (8 mantissa bits). Weights shared by several modules
(tied embeddings) stay one tensor. Pure PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class CastTo(nn.Module):
    """Parametrization: the stored tensor cast to ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        """``dtype``: the compute dtype the parametrized weight reads as."""
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: Tensor) -> Tensor:
        """(any shape) stored tensor -> the same values in the compute dtype."""
        return stored.to(self.dtype)

    def extra_repr(self) -> str:
        """The compute dtype."""
        return f"dtype={self.dtype}"


def store_frozen(
    model: nn.Module, storage: torch.dtype, compute: torch.dtype = torch.float32, skip: set[int] | None = None
) -> int:
    """Store every frozen floating parameter of ``model`` (except ids in ``skip``) in ``storage``.

    Returns the number of distinct tensors converted. Each (module, name) that holds one reads it through
    :class:`CastTo` (``compute``); the tensor keeps its identity, so tied weights stay tied.
    """
    skip = skip or set()
    holders = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad or id(p) in skip or not p.is_floating_point():
                continue
            holders.append((module, name, p))
    converted: set[int] = set()
    for _, _, p in holders:
        if id(p) not in converted:
            p.data = p.data.to(storage)
            converted.add(id(p))
    for module, name, _ in holders:
        parametrize.register_parametrization(module, name, CastTo(compute), unsafe=True)
    return len(converted)


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the distinct frozen parameters of ``model`` (parametrized ones counted as stored)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if not p.requires_grad:
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())
