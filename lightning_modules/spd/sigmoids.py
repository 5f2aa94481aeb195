"""Sigmoid-like maps from a CI function's raw output to causal importances in [0, 1].

SPD uses two variants of the hard sigmoid clamp(x, 0, 1):
- `lower_leaky_hard`: the clamp in the forward pass, with a custom backward that lets a little
  gradient through below 0 (only when it pushes x up) -- used for masks, reconstruction losses and L0;
- `upper_leaky_hard`: clamp below 0, 1 + alpha(x - 1) above 1 -- used only in importance minimality.
`leaky_hard` is the paper's version (alpha * x below 0 in the forward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

LEAK = 0.01


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    """clamp(x, 0, 1) forward; backward g on (0, 1], alpha*g on x <= 0 only when g < 0, 0 above 1."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        zero = torch.zeros_like(grad)
        # x <= 0: a negative grad means the loss wants x larger; let alpha * grad through (as if the
        # forward were alpha * x there). A positive grad (wants x smaller) is blocked.
        below = torch.where(grad < 0, ctx.alpha * grad, zero)
        return torch.where(x <= 0, below, torch.where(x <= 1, grad, zero)), None


def lower_leaky_hard_sigmoid(x: Tensor, alpha: float = LEAK) -> Tensor:
    """clamp(x, 0, 1) with a leaky (alpha, only for negative gradients) backward below 0."""
    return _LowerLeakyHardSigmoid.apply(x, alpha)


def upper_leaky_hard_sigmoid(x: Tensor, alpha: float = LEAK) -> Tensor:
    """0 below 0, x on [0, 1], 1 + alpha (x - 1) above 1 (ordinary autograd)."""
    return torch.where(x > 1, 1 + alpha * (x - 1), x.clamp(0.0, 1.0))


def hard_sigmoid(x: Tensor) -> Tensor:
    """clamp(x, 0, 1)."""
    return x.clamp(0.0, 1.0)


def leaky_hard_sigmoid(x: Tensor, alpha: float = LEAK) -> Tensor:
    """The paper's version: alpha * x below 0, clamp above (min(x, 1))."""
    return torch.where(x > 0, x.clamp(max=1.0), alpha * x)


def sigmoid(x: Tensor) -> Tensor:
    """The logistic sigmoid."""
    return torch.sigmoid(x)


def _swish(x: Tensor, beta: float) -> Tensor:
    """x sigmoid(beta x): -> max(x, 0) as beta -> inf."""
    return x * torch.sigmoid(beta * x)


def _upside_down_swish(x: Tensor, beta: float) -> Tensor:
    """x sigmoid(-beta x): -> min(x, 0) as beta -> inf."""
    return x * torch.sigmoid(-beta * x)


def swish_hard_sigmoid(
    x: Tensor, beta: float = 10.0, scale: float = 0.5, xshift: float = 0.5, yshift: float = 0.5
) -> Tensor:
    """The reference's swish-cornered hard sigmoid, -> clamp(x, 0, 1) as beta -> inf (defaults).

    With z = x - xshift: yshift + [uds(z - scale) - swish(z)] + [swish(z + scale) - uds(z)], where
    swish(z) = z sigmoid(beta z) and uds(z) = z sigmoid(-beta z).
    """
    z = x - xshift
    return (
        yshift
        + (_upside_down_swish(z - scale, beta) - _swish(z, beta))
        + (_swish(z + scale, beta) - _upside_down_swish(z, beta))
    )


SIGMOIDS: dict[str, Callable[[Tensor], Tensor]] = {
    "lower_leaky_hard": lower_leaky_hard_sigmoid,
    "upper_leaky_hard": upper_leaky_hard_sigmoid,
    "hard": hard_sigmoid,
    "leaky_hard": leaky_hard_sigmoid,
    "sigmoid": sigmoid,
    "swish_hard": swish_hard_sigmoid,
}


def get_sigmoid(name: str) -> Callable[[Tensor], Tensor]:
    """Look up a sigmoid by name; ValueError listing the valid names otherwise."""
    try:
        return SIGMOIDS[name]
    except KeyError:
        raise ValueError(f"unknown sigmoid {name!r}; valid names: {sorted(SIGMOIDS)}") from None
