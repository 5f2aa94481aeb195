"""Loading GPT weights from our Lightning checkpoints (no Lightning import). Every other format, and the
choice between them, goes through `lightning_modules.common.targets.load_target_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.gpt.config import TRAINING_ONLY_FIELDS, GPTConfig
from lightning_modules.gpt.model import GPT


def training_fields(config: GPTConfig) -> dict[str, Any]:
    """The training-only switches of a config (never part of a checkpoint)."""
    return {name: getattr(config, name) for name in TRAINING_ONLY_FIELDS}


def load_gpt_weights(path: str, training_overrides: dict[str, Any] | None = None) -> GPT:
    """A GPT from one of our Lightning `.ckpt` files (training-only switches from `training_overrides`)."""
    source = Path(path)
    overrides = training_overrides or {}
    if not source.is_file():
        raise FileNotFoundError(f"{path!r} is not a file; give one of our Lightning .ckpt files")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    arch = checkpoint.get("gpt_architecture")
    if arch is None:
        raise ValueError(f"{path!r} is not a GPT checkpoint of this project (no 'gpt_architecture' saved)")
    model = GPT(GPTConfig(**{**arch, **overrides}))
    state = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    model.load_state_dict(state)
    return model
