"""A sharded, shuffled sampler and a DataLoader that resume mid-epoch exactly.

Lightning restores the model, optimizer, schedulers and loop counters itself, and saves a dataloader's
state when the DataLoader has `state_dict`/`load_state_dict`; it does not make a shuffled sampler resume
where it stopped. `ResumableSampler` subclasses `DistributedSampler` (so Lightning keeps it instead of
swapping in its own under DDP): its order depends only on (seed, epoch, rank), and it can start at any
position. `ResumableDataLoader` records the epoch and how many batches training consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) whose next pass can skip already-consumed samples."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0  # only the first pass after a resume is shortened
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose state (epoch, batches consumed in it) is saved in Lightning checkpoints.

    The consumed count comes from the trainer's batch progress when a trainer is attached (Lightning's
    fetcher prefetches a batch ahead, so counting yielded batches would be off by one), otherwise from
    the batches this loader yielded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(
                f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}"
            )
        self.trainer: Any = None
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def _consumed(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return self._yielded

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.sampler.epoch,
            "batches_consumed": self._consumed(),
            "batch_size": self.batch_size,
            "num_replicas": self.sampler.num_replicas,
            "seed": self.sampler.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("batch_size", "num_replicas", "seed"):
            ours = getattr(self, key, None) if key == "batch_size" else getattr(self.sampler, key)
            if state.get(key, ours) != ours:
                raise ValueError(
                    f"cannot resume the data position exactly: checkpoint has {key}={state[key]}, this run "
                    f"has {key}={ours}; use the same value or start a new run"
                )
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start_index = state["batches_consumed"] * self.batch_size
