"""Optimizer helpers shared by every LightningModule: decay groups, fused AdamW, LR schedule."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def default_adamw(params: Iterable[Any]) -> torch.optim.Optimizer:
    """AdamW with GPT-2-style defaults (lr 6e-4, betas (0.9, 0.95), weight decay 0.1)."""
    return torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


def decay_param_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Two groups: tensors of 2+ dims get the optimizer's weight decay, the rest (biases, norms) none."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    factory: OptimizerFactory, groups: list[dict[str, Any]], on_cuda: bool
) -> torch.optim.Optimizer:
    """Call the (CLI-provided) optimizer factory; ask for the fused kernel on CUDA when it exists.

    `OptimizerCallable` from LightningCLI is a partial of the optimizer class, so a `fused` keyword can be
    added unless the user set it already."""
    target = factory.func if isinstance(factory, partial) else factory
    accepts_fused = inspect.isclass(target) and "fused" in inspect.signature(target).parameters
    already_set = isinstance(factory, partial) and "fused" in factory.keywords
    if on_cuda and accepts_fused and not already_set:
        return factory(groups, fused=True)
    return factory(groups)


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over warmup_steps, then cosine decay to min_lr_ratio at total_steps."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
