"""Tokens/s, samples/s and MFU per device, on top of Lightning's `ThroughputMonitor`.

What we add to the built-in, and why:
- YAML-friendly: the built-in needs `batch_size_fn`/`length_fn` callables (a lambda also breaks pickling
  under ddp_spawn); ours reads (x, ...) token batches directly.
- Our own peak-FLOPs table (dense tensor-core figures; Lightning 2.6.6 lists H200 at a sparse 2.0e15 and
  may not match real device names) with a `peak_flops` override for any other device, CPUs included.
- FLOPs counted once, on the first batch, by `torch.utils.flop_counter` on a meta-device copy of the
  model (`measure_flops`), through the module's `measure_flops_per_batch(batch)`.
Correct under gradient accumulation (counts micro-batches) and DDP (per-device figures; global ones are
multiplied by the world size by Lightning's `Throughput`).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype  # private, stable in 2.x
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device by compute dtype (vendor datasheets, without sparsity).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "h100 nvl": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "h100 pcie": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "h100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "a10g": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "rtx 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
}


def dtype_key(dtype: torch.dtype) -> str:
    """Our table's key for a compute dtype (fp32 matmuls count as tf32 when TF32 is allowed)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops_for(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of `device` for `dtype` from PEAK_FLOPS, or None when unknown (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, table in PEAK_FLOPS.items():  # ordered: specific names before their family
        if key in name:
            return table.get(dtype_key(dtype))
    return None


def _batch_size(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.size(0))


def _batch_tokens(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """Logs `train/device/items_per_sec` (tokens/s), samples/s, FLOP/s and MFU; see the module docstring.

    Args:
        peak_flops: peak FLOP/s of ONE device for MFU; None = look the device up in PEAK_FLOPS.
        window_size: batches in the moving window the rates are computed over.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 50) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 or None, got {peak_flops}")
        super().__init__(batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size)
        self.peak_flops = peak_flops
        self._flops_measured = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        self.available_flops = self.peak_flops or peak_flops_for(trainer.strategy.root_device, dtype)
        if self.available_flops is None:
            log.info(
                "MFU not logged: peak FLOP/s of %s unknown; set peak_flops", trainer.strategy.root_device
            )
        make = lambda: Throughput(  # noqa: E731
            available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs
        )
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            self._throughputs[RunningStage.VALIDATING] = make()
        self._throughputs[trainer.state.stage] = make()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._flops_measured:
            self._flops_measured = True
            measure = getattr(pl_module, "measure_flops_per_batch", None)
            if measure is not None and not hasattr(pl_module, "flops_per_batch"):
                pl_module.flops_per_batch = int(measure(batch))
                log.info("FLOPs per batch (forward + backward): %.3e", pl_module.flops_per_batch)
