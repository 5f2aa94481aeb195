"""`TextPredictionWriter`: what `trainer.predict` returns, written as text to the run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from callbacks.paths import run_dir


def prediction_texts(batch_output: Any) -> list[str]:
    """One text per example of a predict_step output: a string, a list of strings, or anything else (a
    tensor's rows as token-id lists, other values as their str)."""
    if isinstance(batch_output, str):
        return [batch_output]
    if isinstance(batch_output, torch.Tensor):
        rows = batch_output.tolist() if batch_output.dim() > 1 else [batch_output.tolist()]
        return [str(row) for row in rows]
    if isinstance(batch_output, Sequence):
        return [item if isinstance(item, str) else str(item) for item in batch_output]
    return [str(batch_output)]


class TextPredictionWriter(BasePredictionWriter):
    """Writes every prediction of a `predict` run to `<run dir>/<filename>`, in dataset order, each under a
    `=== prediction N ===` line (N = its index in the predict dataset).

    predict_step returns the texts of a batch (a string or a list of strings, one per example). Under
    several processes the ranks' predictions are gathered and rank 0 writes the one file.
    """

    def __init__(self, filename: str = "predictions.txt") -> None:
        super().__init__(write_interval="epoch")
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename={filename!r} must be a plain file name, e.g. 'predictions.txt'")
        self.filename = filename
        self.path: Path | None = None  # where the last run wrote them

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # predictions: the batch outputs (one dataloader) or one such list per dataloader; batch_indices:
        # always one list per dataloader of each batch's dataset indices (empty when they are unknown).
        several = trainer.predict_loop.num_dataloaders > 1
        outputs_per_loader = predictions if several else [predictions]
        numbered = []  # (dataloader, index in its dataset, text)
        for loader, outputs in enumerate(outputs_per_loader):
            indices = batch_indices[loader] if loader < len(batch_indices) else []
            count = 0
            for b, output in enumerate(outputs):
                texts = prediction_texts(output)
                ids = list(indices[b]) if b < len(indices) and len(indices[b]) == len(texts) else None
                for i, text in enumerate(texts):
                    numbered.append((loader, ids[i] if ids is not None else count, text))
                    count += 1
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, numbered)
            numbered = [item for part in gathered for item in part]
        # Dataset order; a distributed sampler repeats a few examples to even out the ranks: keep one each.
        unique = {(loader, index): text for loader, index, text in numbered}
        if not trainer.is_global_zero:
            return
        directory = run_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.filename
        blocks = [
            f"=== prediction {f'{loader}.{index}' if several else index} ===\n{text}\n"
            for (loader, index), text in sorted(unique.items())
        ]
        self.path.write_text("\n".join(blocks), encoding="utf-8")
        rank_zero_info(f"predict: {len(blocks)} prediction(s) written to {self.path}")
