"""The two checkpoints every run writes: the best by a monitored metric, and the newest by steps / minutes.

`BestCheckpoint` is Lightning's ModelCheckpoint with two corrections: a filename never shows a metric that
was not computed (Lightning writes 0 for it: `step20-val0.000.ckpt` from a save before any validation), and
a resumed fit finds its own state again when the run directory is spelled differently (a relative and an
absolute path to the same directory: Lightning compares the strings and starts a `last-v1.ckpt`).

`PeriodicCheckpoint`: Lightning's ModelCheckpoint with a monitored metric (the shipped `val/loss`) saves only
when that metric has been computed, i.e. at validation; its `every_n_train_steps` then defers to the next
validation. A long run wants both: the best checkpoint by validation loss (`--checkpoint.*`) and a periodic
one that a crash or a pre-emption can resume from (`--periodic_checkpoint.*`). This callback is the second:
the newest `keep` files, named by step only, written by steps, by wall time (whichever comes first) and
once more when training ends.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

_FIELD = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")


def _split_outside_braces(template: str) -> list[str]:
    """Split on "-" / "_" outside {...} fields, keeping the separators as items."""
    parts, current, depth = [], "", 0
    for char in template:
        depth += (char == "{") - (char == "}")
        if depth == 0 and char in "-_":
            parts += [current, char]
            current = ""
        else:
            current += char
    return [*parts, current]


def drop_missing_fields(filename: str, metrics: dict[str, Tensor]) -> str:
    """The filename template without the parts ("-" or "_" separated) that name a metric not in `metrics`:
    "step{step}-val{val/loss:.3f}" stays whole after validation and becomes "step{step}" before it."""
    kept: list[str] = []
    for part in _split_outside_braces(filename):
        names = _FIELD.findall(part)
        if names and any(name not in metrics for name in names):
            if kept and kept[-1] in ("-", "_"):
                kept.pop()  # its separator goes with it
            continue
        kept.append(part)
    while kept and kept[0] in ("-", "_"):
        kept.pop(0)
    return "".join(kept) or filename


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose names leave out metrics that were not computed, and whose resumed state is
    found again whatever the spelling of the run directory (see the module docstring)."""

    def _format_checkpoint_name(
        self,
        filename: str | None,
        metrics: dict[str, Tensor],
        prefix: str | None = None,
        auto_insert_metric_name: bool = True,
    ) -> str:
        if filename:
            filename = drop_missing_fields(filename, metrics)
        return super()._format_checkpoint_name(filename, metrics, prefix, auto_insert_metric_name)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if (
            saved
            and self.dirpath
            and saved != self.dirpath
            and Path(saved).resolve() == Path(self.dirpath).resolve()
        ):

            def respell(path: str) -> str:
                return os.path.join(self.dirpath, os.path.relpath(path, saved)) if path else path

            state_dict = {**state_dict, "dirpath": self.dirpath}
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state_dict:
                    state_dict[key] = respell(state_dict[key])
            if "best_k_models" in state_dict:
                state_dict["best_k_models"] = {respell(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)


class PeriodicCheckpoint(BestCheckpoint):
    """Save `periodic-step{N}.ckpt` every `every_n_train_steps` optimizer steps and every `every_n_minutes`
    of training, and at the end of training; keep the newest `keep` (0 = never save: the callback is off).

    Args:
        every_n_train_steps: save when global_step is a multiple of this (None: not by steps).
        every_n_minutes: save when this much wall time passed since the last save (None: not by time).
        keep: how many periodic checkpoints to keep (the newest); 0 turns the callback off.
        filename: the checkpoint name pattern (Lightning's format keys: {step}, {epoch}).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = 30.0,
        keep: int = 1,
        filename: str = "periodic-step{step}",
        dirpath: str | None = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"periodic_checkpoint.every_n_train_steps must be >= 1 or null, got {every_n_train_steps}"
            )
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(
                f"periodic_checkpoint.every_n_minutes must be > 0 or null, got {every_n_minutes}"
            )
        if keep < 0:
            raise ValueError(f"periodic_checkpoint.keep must be >= 0 (0 = off), got {keep}")
        # Lightning's own step / time triggers are left off (0 / None): they are handled below, together.
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",  # newest `keep` by global step (Lightning needs a monitor for top-k > 1)
            mode="max",
            save_top_k=keep,
            save_last=False,
            every_n_epochs=0,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
        )
        self.every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self.keep = keep
        self._last_save_time: float | None = None
        self._last_saved_step = -1

    @property
    def state_key(self) -> str:
        return f"PeriodicCheckpoint{{'filename': {self.filename!r}}}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save_time = time.monotonic()
        self._last_saved_step = trainer.global_step  # a resumed run has that state on disk already
        self._adopt_files_on_disk()

    def _adopt_files_on_disk(self) -> None:
        """Count the periodic files already in the directory towards `keep` (a resumed run's checkpoint may
        predate the newest of them, so its saved list can miss some)."""
        if not self.dirpath or not Path(self.dirpath).is_dir() or "{step}" not in self.filename:
            return
        head, _, tail = self.filename.partition("{step}")
        pattern = re.compile(
            re.escape(head) + r"(\d+)" + re.escape(tail) + re.escape(self.FILE_EXTENSION) + "$"
        )
        for path in Path(self.dirpath).iterdir():
            match = pattern.match(path.name)
            if match:
                self.best_k_models.setdefault(
                    str(Path(self.dirpath) / path.name), torch.tensor(int(match[1]))
                )
        if self.best_k_models:
            newest = max(self.best_k_models, key=lambda k: float(self.best_k_models[k]))
            oldest = min(self.best_k_models, key=lambda k: float(self.best_k_models[k]))
            self.best_model_path, self.best_model_score = newest, self.best_k_models[newest]
            self.kth_best_model_path, self.kth_value = oldest, self.best_k_models[oldest]

    def _due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        if self.keep == 0 or step == self._last_saved_step:
            return False
        by_steps = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        by_time = False
        if self.every_n_minutes is not None and self._last_save_time is not None:
            by_time = time.monotonic() - self._last_save_time >= 60.0 * self.every_n_minutes
            by_time = bool(trainer.strategy.broadcast(by_time))  # rank 0 decides: ranks' clocks differ
        return by_steps or by_time

    def _save_now(self, trainer: pl.Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_saved_step = trainer.global_step
        self._last_save_time = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due(trainer):
            self._save_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keep and trainer.global_step != self._last_saved_step:
            self._save_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch ends are no trigger here."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation is no trigger here (the best-by-val checkpoint saves there)."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """No save on exceptions: the state may be the cause (NaN); the last periodic file stays."""
