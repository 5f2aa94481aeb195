"""Test-only callbacks, loaded by train.py from YAML: inject non-finite gradients, record losses/weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class PoisonGradients(pl.Callback):
    """After backward at the given optimizer steps (on one rank, or all when rank is None), fill one
    gradient with NaN. Runs after DDP's all-reduce, so only this rank sees the NaN."""

    def __init__(self, steps: list[int], rank: int | None = None, value: float = float("nan")) -> None:
        self.steps, self.rank, self.value = set(steps), rank, value

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(self.value)


class RecordTraining(pl.Callback):
    """Write {step: loss}, {step: weight checksum after the step}, {step: checkpoint files present} and
    the last validation's logged metrics {name: value} to <out_dir>/rank<r>.json, and every parameter
    tensor at the start and end of fit to <out_dir>/rank<r>_params_{start,end}.pt."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: dict[int, float] = {}
        self.checksums: dict[int, float] = {}
        self.checkpoints: dict[int, list[str]] = {}
        self.val_metrics: dict[str, float] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        step = trainer.global_step  # already incremented: this is the step just taken
        self.losses[step] = float(outputs["loss"])
        self.checksums[step] = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        self.checkpoints[step] = sorted(os.listdir(dirpath)) if dirpath and os.path.isdir(dirpath) else []
        self._write(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.val_metrics = {k: float(v) for k, v in metrics.items() if k.startswith("val")}
        self._write(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_params(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_params(trainer, pl_module, "end")

    def _save_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        params = {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters()}
        torch.save(params, self.out_dir / f"rank{trainer.global_rank}_params_{when}.pt")

    def _write(self, trainer: pl.Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        finite = all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
        tmp.write_text(
            json.dumps(
                {
                    "losses": self.losses,
                    "checksums": self.checksums,
                    "checkpoints": self.checkpoints,
                    "val_metrics": self.val_metrics,
                    "finite": bool(finite),
                }
            )
        )
        os.replace(tmp, path)


def read_record(out_dir: Path, rank: int = 0) -> dict:
    """The RecordTraining output of one rank, with integer step keys."""
    data = json.loads((Path(out_dir) / f"rank{rank}.json").read_text())
    data["losses"] = {int(k): v for k, v in data["losses"].items()}
    data["checksums"] = {int(k): v for k, v in data["checksums"].items()}
    data["checkpoints"] = {int(k): v for k, v in data.get("checkpoints", {}).items()}
    return data


def read_params(out_dir: Path, rank: int = 0, when: str = "end") -> dict[str, torch.Tensor]:
    """The parameters {name: tensor} one rank held at the "start" or "end" of fit (from RecordTraining)."""
    return torch.load(Path(out_dir) / f"rank{rank}_params_{when}.pt", weights_only=True)


def record_yaml(run_dir: Path) -> Path:
    """A config file that appends RecordTraining (writing to <run_dir>/record) to trainer.callbacks."""
    path = Path(run_dir) / "rec.yaml"
    path.write_text(
        "trainer:\n  callbacks+:\n    - class_path: tests.helpers.fault_injection.RecordTraining\n"
        f"      init_args:\n        out_dir: {Path(run_dir) / 'record'}\n"
    )
    return path
