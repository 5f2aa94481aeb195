"""A CSV logger (configs/loggers/csv.yaml) whose resumed runs keep the rows they logged before.

Lightning's `CSVLogger` deletes `metrics.csv` when it finds its run directory not empty, and a fit resumed
from a checkpoint continues in its own run directory (train.py's `place_logger`), so every row logged
before the checkpoint would be lost. This one appends to the file and keeps its columns.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing metrics.csv is kept and appended to."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir=log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))  # rows are written with these columns

    def _check_log_dir_exists(self) -> None:
        """Keep what the run wrote before it was resumed (Lightning's writer deletes it here)."""


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose metrics.csv survives a resume in the same run directory
    (rows of steps after the checkpoint that the interrupted run had logged appear again, as in TensorBoard)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        """The writer, created on first use."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
