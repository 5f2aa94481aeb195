"""Run-directory lookup that is safe to call from one rank only."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory, without a collective.

    `trainer.log_dir` broadcasts from rank 0, so calling it inside rank-zero-only code hangs under DDP while
    the other ranks wait in a different collective. Every rank's logger already knows the directory."""
    logger = trainer.logger
    directory = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(directory or trainer.default_root_dir)
