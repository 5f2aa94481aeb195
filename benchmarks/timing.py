"""What every timed benchmark shares: waiting for the device before reading the clock."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work on `device` (nothing to wait for on a CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
