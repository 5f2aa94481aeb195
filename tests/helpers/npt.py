"""Tiny NPT fixtures shared by the NPT test files: a converted 3-layer GPT, random token batches, a Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.npt.module import NPTLightningModule
from tests.helpers.trainers import quiet_trainer

TINY_GPT = dict(block_size=32, n_layer=3, n_head=2, n_embd=32)
VOCAB = 64


def tiny_npt_module(**kwargs: Any) -> NPTLightningModule:
    """A fresh tiny GPT with layers 1 and 2 converted (k 2, r 4); keyword arguments override."""
    args = dict(target_config=TINY_GPT, vocab_size=VOCAB, layers="1:3", rank=4, num_ranks=2, warmup_steps=2)
    return NPTLightningModule(**{**args, **kwargs})


def token_loader(n: int, seq: int = 16, batch: int = 8) -> DataLoader:
    """n seeded random sequences as (x, y) next-token pairs of length seq."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch)


def npt_trainer(tmp_path: Path, steps: int, **kwargs: Any) -> pl.Trainer:
    """quiet_trainer for max_steps steps, logging every step, no sanity validation."""
    args = dict(max_steps=steps, log_every_n_steps=1, num_sanity_val_steps=0)
    return quiet_trainer(tmp_path, **{**args, **kwargs})
