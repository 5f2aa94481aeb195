"""What a run prints: a step-based progress bar, a model summary without a zero FLOP count, and a report
of where the run's files are when it ends.

Lightning's TQDMProgressBar counts batches per epoch ("Epoch 0/-2" when training by max_steps) and shows the
logger version as "v_num"; its ModelSummary prints "Total FLOPs: 0" for modules without an example input.
Both are replaced here; `train.py` adds them unless the run turns the bar / summary off.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.model_summary import log
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from callbacks.checkpoints import PeriodicCheckpoint
from callbacks.paths import run_dir

# Lightning notices that say nothing about the run: an advertisement, and a note that our own ModelSummary
# replaced the default one.
NOISE = ("💡 Tip:", "Trainer already configured with model summary callbacks")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def quiet_lightning_notices() -> None:
    """Drop the NOISE notices from Lightning's rank-zero logger, and Lightning's own use of torch's
    deprecated `LeafSpec` (a FutureWarning that every run printed once, about code no user can change)
    (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def batch_items(batch: Any) -> tuple[int, str]:
    """(count, unit) of one micro-batch: tokens of an (x, y) token batch, else examples (rows)."""
    pair = isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)
    if pair and not batch[1].is_floating_point():
        return batch[1].numel(), "tokens"
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return (int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1), "examples"


class StepRate:
    """Items per second over training micro-batches, validation pauses excluded (median of the last N)."""

    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self.rates: list[float] = []
        self.unit = "tokens"
        self._last: float | None = None

    def restart(self) -> None:
        """Forget the previous timestamp (after validation or at the start)."""
        self._last = None

    def update(self, batch: Any, world_size: int) -> None:
        now = time.perf_counter()
        count, self.unit = batch_items(batch)
        if self._last is not None and now > self._last:
            self.rates.append(count * world_size / (now - self._last))
            del self.rates[: -self.window]
        self._last = now

    def median(self, last: int | None = None) -> float | None:
        rates = self.rates[-last:] if last else self.rates
        return statistics.median(rates) if rates else None


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: optimizer step / max_steps, ETA, loss, tokens (or examples) per second."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.rate = StepRate(window=50)

    @property
    def train_description(self) -> str:
        return "step"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        rate = self.rate.median()
        if rate is not None:
            metrics[f"{'tok' if self.rate.unit == 'tokens' else 'ex'}/s"] = f"{rate:,.0f}"
        return metrics

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.n = trainer.global_step
        self.rate.restart()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """One bar across epochs: nothing to reset."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.rate.update(batch, trainer.world_size)
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.rate.restart()


class QuietModelSummary(ModelSummary):
    """Lightning's ModelSummary without the "Total FLOPs: 0" line it prints when no example input exists."""

    @staticmethod
    def summarize(summary_data: Any, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:  # fmt: skip
        if not total_flops:  # no example input: Lightning's FLOP column and total would only show zeros
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters,
            trainable_parameters,
            model_size,
            total_training_modes,
            total_flops,
            *summary_data,
        )
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if "total flops" not in line.lower())
        log.info("\n" + table)


class RunReport(pl.Callback):
    """Prints the run directory (and the step a resumed run continues from) at the start, and at the end of
    fit where its checkpoints, samples and results are, the final validation loss and the median throughput.

    `enabled` exists because LightningCLI drops a forced callback that has no arguments."""

    RESULT_FILES = ("samples.txt", "spd_results.json", "npt_results.json", "target.pt", "target_checks.json")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rate = StepRate()
        self.lines: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self.rate.restart()
        where = run_dir(trainer)
        if trainer.ckpt_path:
            rank_zero_info(f"resuming from {trainer.ckpt_path} at step {trainer.global_step}; logs: {where}")
        else:
            rank_zero_info(f"run directory: {where}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:  # fmt: skip
        if self.enabled:
            self.rate.update(batch, trainer.world_size)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rate.restart()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # teardown, not on_train_end: modules write their result files in their own on_train_end, which
        # runs after the callbacks' on_train_end.
        if not self.enabled or stage != "fit" or not trainer.is_global_zero:
            return
        self.lines = self.summary(trainer)
        print("\n".join(self.lines), flush=True)

    def summary(self, trainer: pl.Trainer) -> list[str]:
        """The end-of-fit lines (also kept in `self.lines` for tests)."""
        finished = trainer.state.status.value != "interrupted"  # teardown runs before "finished" is set
        head = f"run {'finished' if finished else 'stopped'} at step {trainer.global_step}"
        metrics = trainer.callback_metrics
        if "val/loss" in metrics:
            loss = float(metrics["val/loss"])
            head += f", val/loss {loss:.4f}"
            if "val/ppl" in metrics:
                head += f" (ppl {float(metrics['val/ppl']):.2f})"
        rate = self.rate.median()
        if rate is not None:
            head += f", median {rate:,.0f} {self.rate.unit}/s"
        directory = run_dir(trainer)
        rows = [("run directory", directory)]
        seen: set[str] = set()
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            best = (
                "newest periodic checkpoint"
                if isinstance(callback, PeriodicCheckpoint)
                else "best checkpoint"
            )
            for label, path in (
                (best, callback.best_model_path),
                ("last checkpoint", callback.last_model_path),
            ):
                if path and path not in seen and Path(path).exists():
                    seen.add(path)
                    rows.append((label, Path(path)))
        rows += [(name, directory / name) for name in self.RESULT_FILES if (directory / name).exists()]
        width = max(len(label) for label, _ in rows)
        lines = [head] + [f"  {label:<{width}}  {path}" for label, path in rows]
        if any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            lines.append(f"  {'TensorBoard':<{width}}  tensorboard --logdir {directory.parent}")
        return lines
