"""A Trainer for in-process tests: CPU, no logger, no checkpoints, no progress output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def quiet_trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    """pl.Trainer with test defaults; keyword arguments override them."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})
