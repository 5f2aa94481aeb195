"""Logging without the Lightning warnings that do not apply to our modules."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn


def log_rank_reduced(
    module: pl.LightningModule,
    figures: Mapping[str, Tensor | float],
    prog_bar: Collection[str] = (),
    **kwargs: Any,
) -> None:
    """Log epoch-end figures that are the same on every rank (a torchmetrics `compute()`, which reduces
    across ranks, or a function of such values).

    Lightning cannot tell that a value is already reduced: it warns about every tensor logged at epoch
    level in a distributed run without sync_dist (ten warnings per NPT validation). sync_dist=True costs one
    scalar all-reduce per figure per validation and averages values that are equal, so it changes nothing
    but the warning. Names in prog_bar also go to the progress bar."""
    for name, value in figures.items():
        module.log(name, value, sync_dist=True, prog_bar=name in prog_bar, **kwargs)


def expect_frozen_eval_modules(module: pl.LightningModule, frozen: nn.Module) -> None:
    """Call in on_fit_start of a module whose frozen part (a target model) stays in eval mode on purpose.

    Lightning warns at the start of every fit that it found modules in eval mode. For a frozen target
    that is the design, and the warning on every NPT and SPD run only teaches users to skip warnings. The
    filter names the exact count, so the warning still shows when any module outside `frozen` is in eval
    mode too."""
    n_eval = sum(1 for m in module.modules() if not m.training)
    if n_eval and n_eval == sum(1 for m in frozen.modules() if not m.training):
        warnings.filterwarnings(
            "ignore",
            message=rf"Found {n_eval} module\(s\) in eval mode at the start of training",
            category=PossibleUserWarning,
        )
