"""Routers: which positions of which modules run through their components in a routed forward.

A router maps (module names, leading shape (...), device, generator) to {module: (...) bool}: True routes
that position of that module to its (masked) components, False keeps the target's output there. The
subset terms (stochastic_recon_subset, ci_masked_recon_subset, pgd_recon_subset and the multi-batch PGD
evaluation's subset variant) take theirs from `ObjectiveConfig.subset_routing`:
- 'uniform_k_subset': per position k ~ U{1..L}, then a uniformly random k-subset of the L modules;
- 'static_probability': every (module, position) routed independently with probability p.
The layerwise terms need no router: they mask one module and leave the others out of the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from .component_model import uniform_k_subset_routing_masks
from .members import uniform

SUBSET_ROUTINGS = ("uniform_k_subset", "static_probability")


class Router(Protocol):
    """(module names, leading shape, device, generator) -> {module: (...) bool routing mask}."""

    def __call__(
        self,
        module_names: Sequence[str],
        shape: Sequence[int],
        device: torch.device | str,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]: ...


def uniform_k_subset_router(
    module_names: Sequence[str],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per position a uniformly random k-subset of the modules, k ~ U{1..n_modules}."""
    return uniform_k_subset_routing_masks(module_names, shape, device, generator)


class StaticProbabilityRouter:
    """Each module routed at each position independently with probability p (one U(0, 1) draw each)."""

    def __init__(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"static_probability routing needs p in [0, 1], got {p}")
        self.p = p

    def __call__(
        self,
        module_names: Sequence[str],
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """{module: (...) bool}, drawn module by module in the given order."""
        return {name: uniform(shape, generator, device) < self.p for name in module_names}


def make_subset_router(kind: str, p: float | None = None) -> Router:
    """The router a subset term uses: 'uniform_k_subset', or 'static_probability' with its p."""
    if kind == "uniform_k_subset":
        return uniform_k_subset_router
    if kind == "static_probability":
        if p is None:
            raise ValueError("subset_routing='static_probability' needs subset_routing_p in [0, 1]")
        return StaticProbabilityRouter(p)
    raise ValueError(f"unknown subset routing {kind!r}; valid: {list(SUBSET_ROUTINGS)}")
