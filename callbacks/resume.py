"""Random-number-generator state in checkpoints, so a resumed run continues the same random stream.

Lightning restores model, optimizer, schedulers, loop counters and (with a stateful DataLoader such as
`datamodules.resumable.ResumableDataLoader`) the data position, but not the global RNGs that dropout and
sampling draw from. This callback saves and restores them (torch CPU, every CUDA device, numpy, python)."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


class ExactResume(pl.Callback):
    """Save the global RNG states with every checkpoint and restore them on resume (per rank)."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_as_tensors(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _numpy_state_as_tensors() -> tuple[Any, ...]:
    """numpy's RNG state with its key array as a tensor, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)
