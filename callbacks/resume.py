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
    """Save the global RNG states with every checkpoint and restore them on resume.

    The states are applied at the first training batch after the resume, not when the checkpoint is
    read: between those two points Lightning creates dataloader iterators and may run the sanity check,
    and both draw from the global RNG (the uninterrupted run never made those draws at this step)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_as_tensors(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.enabled:
            self._pending = state_dict

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            state_dict, self._pending = self._pending, None
            _restore(state_dict)


def _restore(state_dict: dict[str, Any]) -> None:
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
