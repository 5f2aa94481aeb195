"""Report the per-device and global batch (sequences and tokens per optimizer step) once per run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


def describe_batch(trainer: pl.Trainer) -> dict[str, Any] | None:
    """Per-device batch, world size, accumulation and the resulting global batch; None without a datamodule."""
    datamodule = getattr(trainer, "datamodule", None)
    per_device = getattr(datamodule, "batch_size", None)
    if not per_device:
        return None
    info: dict[str, Any] = {
        "per_device_batch": int(per_device),
        "world_size": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
    }
    info["global_batch"] = info["per_device_batch"] * info["world_size"] * info["accumulate_grad_batches"]
    block = getattr(datamodule, "block_size", None)
    if block:
        info["tokens_per_step"] = info["global_batch"] * int(block)
    return info


def report_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Print the batch description and log it as TensorBoard text at the start of training."""
    info = describe_batch(trainer)
    if info is None:
        return
    text = (
        f"batch: {info['per_device_batch']} per device x {info['world_size']} device(s) x "
        f"{info['accumulate_grad_batches']} accumulation = {info['global_batch']} sequences per optimizer step"
        + (f" ({info['tokens_per_step']:,} tokens)" if "tokens_per_step" in info else "")
    )
    rank_zero_info(text)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_text"):
            experiment.add_text("run/batch", text, global_step=trainer.global_step)
