"""The optimizer and LR schedule every LightningModule here uses: one function, one set of argument names.

Each module takes `optimizer` (a LightningCLI `OptimizerCallable`), `warmup_steps`, `lr_decay_steps` and
`min_lr_ratio`, checks them with `check_schedule_args` in `__init__`, and returns
`configure_optimizer(...)` from `configure_optimizers`. Defaults are built by `adamw(...)`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def adamw(
    lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), module: str | None = None
) -> OptimizerFactory:
    """An AdamW factory with these defaults, the form LightningCLI's `OptimizerCallable` takes.

    Assign it to a module-level name and pass that module's `__name__`: jsonargparse then prints the
    default (`--print_config`, `--help`) as that import path, and reads the path back as this factory."""
    factory = partial(torch.optim.AdamW, lr=lr, betas=betas, weight_decay=weight_decay)
    # jsonargparse resolves an import path to a callable only when it can see the callable's return type
    factory.__signature__ = inspect.signature(factory).replace(return_annotation=torch.optim.Optimizer)
    if module is not None:
        factory.__module__ = module  # jsonargparse looks the object up among that module's variables
    return factory


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


def check_schedule_args(warmup_steps: int, lr_decay_steps: int | None, min_lr_ratio: float) -> None:
    """ValueError naming the bad schedule argument (called from each module's __init__)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_decay_steps is not None and lr_decay_steps < 1:
        raise ValueError(f"lr_decay_steps must be >= 1 or None (the whole run), got {lr_decay_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"min_lr_ratio must be in [0, 1] (1.0 = constant LR after warmup), got {min_lr_ratio}"
        )


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


def total_training_steps(trainer: pl.Trainer, lr_decay_steps: int | None = None) -> int:
    """The schedule's length: lr_decay_steps, else the run's optimizer steps (world size, accumulation and
    max_steps / max_epochs included, as Lightning estimates them)."""
    return lr_decay_steps or max(1, int(trainer.estimated_stepping_batches))


def configure_optimizer(
    module: pl.LightningModule,
    factory: OptimizerFactory,
    named_params: Iterable[tuple[str, nn.Parameter]],
    warmup_steps: int,
    min_lr_ratio: float,
    lr_decay_steps: int | None = None,
    decay_groups: bool = True,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: the factory's optimizer over the trainable parameters (decay
    only on 2+-dim tensors when `decay_groups`, else one group), fused on CUDA, stepped every optimizer step
    by linear warmup then cosine to `min_lr_ratio` of the peak at `total_training_steps`."""
    named = [(name, p) for name, p in named_params if p.requires_grad]
    groups = decay_param_groups(named) if decay_groups else [{"params": [p for _, p in named]}]
    optimizer = build_optimizer(factory, groups, on_cuda=module.device.type == "cuda")
    total = total_training_steps(module.trainer, lr_decay_steps)
    warmup = min(warmup_steps, total - 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup, total, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
