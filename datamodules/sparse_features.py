"""`SparseFeatureDataModule`: batches of sparse synthetic features for the SPD toy models (TMS, ResidMLP).

Each feature is on independently with probability `feature_prob`, with a value drawn uniformly from
`value_range`. Items are whole batches (batch_size, n_features), each generated from its own seed
(seed, split, index), so data is reproducible, differs between epochs, and costs nothing to store. Under
DDP every rank generates the global batch (world_size x batch_size rows) and keeps its own slice: ranks
see different data, and a run on N processes sees exactly the global batches of a one-process run with
N times the batch size. Labels are not produced: SPD reconstructs the target's output, and the toy-target
trainer asks its model for the labels (`model.labels(x)`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_modules.common.seeds import mixed_seed

_SPLIT_SALT = {"train": 0, "val": 1}


def sparse_feature_batch(
    batch: int,
    n_features: int,
    feature_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """(batch, n_features): each feature on independently w.p. feature_prob with value U[value_range]."""
    lo, hi = value_range
    values = torch.rand(batch, n_features, generator=generator, device=device) * (hi - lo) + lo
    on = torch.rand(batch, n_features, generator=generator, device=device) < feature_prob
    return torch.where(on, values, torch.zeros_like(values))


class SparseFeatureBatches(Dataset):
    """Item i is this rank's (batch_size, n_features) slice of global batch i (seed (seed, split, i))."""

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
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        self.n_features, self.feature_prob, self.batch_size = n_features, feature_prob, batch_size
        self.length, self.seed, self.rank, self.split = length, seed, rank, split
        self.world_size = world_size
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        """(batch_size, n_features) float32; any index >= 0 is valid (later epochs use larger ones)."""
        gen = torch.Generator().manual_seed(mixed_seed(self.seed, 0, _SPLIT_SALT[self.split], int(index)))
        rows = self.batch_size * self.world_size  # the global batch; generation is cheap next to SPD
        batch = sparse_feature_batch(
            rows, self.n_features, self.feature_prob, gen, value_range=self.value_range
        )
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].clone()


class EpochOffsetSampler(DistributedSampler):
    """Yields epoch * length + 0..length-1, so every epoch draws fresh batches.

    A DistributedSampler over one replica: every rank walks all indices (the dataset slices each global
    batch by rank), and Lightning, which keeps DistributedSamplers as they are, does not shard the
    indices again. Lightning calls set_epoch before each epoch; a pass also advances the epoch itself."""

    def __init__(self, dataset: SparseFeatureBatches) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.length = len(dataset)
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
        batch_size: examples per batch and device (the global batch is batch_size x world size).
        steps_per_epoch: training batches per epoch (each epoch's batches are new).
        val_batches: validation batches (the same every validation).
        value_range: a feature's value when on, uniform in [low, high]: TMS (0, 1), ResidMLP (-1, 1).
        seed: base seed; under DDP each rank takes its own slice of the global batch.
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

    def _rank_and_world_size(self) -> tuple[int, int]:
        """(global rank, world size) when attached to a Trainer, else (0, 1)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _dataset(self, split: str, length: int) -> SparseFeatureBatches:
        rank, world_size = self._rank_and_world_size()
        return SparseFeatureBatches(
            self.n_features,
            self.feature_prob,
            self.batch_size,
            length,
            self.seed,
            rank,
            split,
            self.value_range,
            world_size,
        )

    def train_dataloader(self) -> DataLoader:
        """steps_per_epoch fresh batches per epoch (batch_size=None: items are already batches)."""
        dataset = self._dataset("train", self.steps_per_epoch)
        return DataLoader(
            dataset, batch_size=None, sampler=EpochOffsetSampler(dataset), num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """val_batches fixed batches (each rank its slice of every one: see EpochOffsetSampler)."""
        dataset = self._dataset("val", self.val_batches)
        in_order = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(dataset, batch_size=None, sampler=in_order, num_workers=self.num_workers)
