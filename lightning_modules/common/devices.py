"""Choosing the device for the commands that run a trained model outside train.py."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else the CPU) or a torch device name; ValueError for an unusable one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available here; valid: auto, cpu")
    return device
