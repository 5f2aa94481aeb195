"""`SparseFeatureDataModule`: batches of sparse synthetic features for the SPD toy models (TMS, ResidMLP).

Each feature is on independently with probability `feature_prob`, with a value drawn uniformly from
`value_range`. Items are whole batches (batch_size, n_features), each generated from its own seed
(seed, rank, split, index), so data is reproducible, differs between DDP ranks and between epochs, and
costs nothing to store. Labels are not produced: SPD reconstructs the target's output, and the toy-target
trainer asks its model for the labels (`model.labels(x)`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_modules.spd.toy_models import sparse_feature_batch

_SPLIT_SALT = {"train": 0, "val": 1}


def _item_seed(seed: int, rank: int, split: str, index: int) -> int:
    """A distinct 63-bit seed per (seed, rank, split, index)."""
    mixed = (seed * 1_000_003 + rank) * 1_000_033 + _SPLIT_SALT[split]
    return (mixed * 2_147_483_659 + index) % (2**63 - 1)


class SparseFeatureBatches(Dataset):
    """Item i is a (batch_size, n_features) batch generated from seed (seed, rank, split, i)."""

    def __init__(
        self,
        n_features: int,
        feature_prob: float,
        batch_size: int,
        length: int,
        seed: int,
        rank: int = 0,
        split: str = "train",
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.n_features, self.feature_prob, self.batch_size = n_features, feature_prob, batch_size
        self.length, self.seed, self.rank, self.split = length, seed, rank, split
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        """(batch_size, n_features) float32; any index >= 0 is valid (later epochs use larger ones)."""
        gen = torch.Generator().manual_seed(_item_seed(self.seed, self.rank, self.split, int(index)))
        return sparse_feature_batch(
            self.batch_size, self.n_features, self.feature_prob, gen, value_range=self.value_range
        )


class EpochOffsetSampler(Sampler[int]):
    """Yields epoch * length + 0..length-1, so every epoch draws fresh batches.

    Lightning calls set_epoch before each epoch; when it cannot (under DDP it wraps this sampler in its
    DistributedSamplerWrapper, which does not forward set_epoch), each pass advances the epoch itself."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.length
        self.epoch += 1
        return iter(range(start, start + self.length))

    def __len__(self) -> int:
        return self.length


class SparseFeatureDataModule(LightningDataModule):
    """Sparse feature batches (batch_size, n_features) for toy-model training and decomposition.

    Args:
        n_features: features per example.
        feature_prob: probability that a feature is on.
        batch_size: examples per batch.
        steps_per_epoch: training batches per epoch (each epoch's batches are new).
        val_batches: validation batches (the same every validation).
        value_range: a feature's value when on, uniform in [low, high]: TMS (0, 1), ResidMLP (-1, 1).
        seed: base seed; the DDP rank is mixed in, so ranks see different data.
        num_workers: DataLoader workers (generation is cheap: 0 is usually fastest).
    """

    vocab_size = None  # not token data: train.py links this (None) into the model

    def __init__(
        self,
        n_features: int = 5,
        feature_prob: float = 0.05,
        batch_size: int = 1024,
        steps_per_epoch: int = 1000,
        val_batches: int = 4,
        value_range: tuple[float, float] = (0.0, 1.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_features", n_features),
            ("batch_size", batch_size),
            ("steps_per_epoch", steps_per_epoch),
            ("val_batches", val_batches),
        ):
            if value < 1:
                raise ValueError(f"{name}={value!r} must be >= 1")
        if not 0.0 < feature_prob <= 1.0:
            raise ValueError(f"feature_prob={feature_prob!r} must be in (0, 1]")
        if len(value_range) != 2 or value_range[0] >= value_range[1]:
            raise ValueError(f"value_range={value_range!r} must be (low, high) with low < high")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be >= 0")
        self.save_hyperparameters()
        self.n_features, self.feature_prob, self.batch_size = n_features, feature_prob, batch_size
        self.steps_per_epoch, self.val_batches = steps_per_epoch, val_batches
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.seed, self.num_workers = seed, num_workers

    def _rank(self) -> int:
        """The global rank when attached to a Trainer, else 0."""
        return self.trainer.global_rank if self.trainer is not None else 0

    def _dataset(self, split: str, length: int) -> SparseFeatureBatches:
        return SparseFeatureBatches(
            self.n_features,
            self.feature_prob,
            self.batch_size,
            length,
            self.seed,
            self._rank(),
            split,
            self.value_range,
        )

    def train_dataloader(self) -> DataLoader:
        """steps_per_epoch fresh batches per epoch (batch_size=None: items are already batches)."""
        return DataLoader(
            self._dataset("train", self.steps_per_epoch),
            batch_size=None,
            sampler=EpochOffsetSampler(self.steps_per_epoch),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """val_batches fixed batches."""
        return DataLoader(
            self._dataset("val", self.val_batches), batch_size=None, num_workers=self.num_workers
        )
