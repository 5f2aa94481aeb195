"""Float32 matmul precision for a run (TF32 tensor cores on NVIDIA GPUs), set from a config.

PyTorch keeps float32 matmuls in full float32 by default (`torch.set_float32_matmul_precision("highest")`);
on an Ampere or newer GPU, "high" runs them on TF32 tensor cores (10-bit mantissa inputs, float32
accumulation), several times faster for float32 models. Lightning has no Trainer flag for it (it only
prints a hint), so this callback sets it for the fit and puts the previous value back at teardown:

    trainer.callbacks: [{class_path: callbacks.Float32MatmulPrecision, init_args: {precision: high}}]
    (or compose configs/callbacks/tf32.yaml)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

PRECISIONS = ("highest", "high", "medium")


class Float32MatmulPrecision(Callback):
    """torch.set_float32_matmul_precision(precision) from setup to teardown (each rank, each stage)."""

    def __init__(self, precision: str = "high") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._previous: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: D102
        self._previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: D102
        if self._previous is not None:
            torch.set_float32_matmul_precision(self._previous)
            self._previous = None
