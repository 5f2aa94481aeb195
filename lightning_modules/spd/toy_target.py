"""ToyTargetLightningModule: trains a TMS / ResidMLP target through train.py and saves it for SPD.

At the end of fit (rank zero) the target is written as a plain toy target file (see `targets.py`) to
`save_path` (the path the decomposition config's `target` names) and to `<log_dir>/target.pt`, with the
TMS sanity checks (`check_tms_target`) stored beside the weights and in `<log_dir>/target_checks.json`.
The module's Lightning checkpoints carry the same information, so SPD can load them as well.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only

from callbacks.paths import run_dir
from datamodules.sparse_features import sparse_feature_batch
from lightning_modules.common.optim import adamw, check_schedule_args, configure_optimizer

from .targets import TOY_KEY, build_toy_model, save_toy_target
from .toy_models import TMSModel, check_tms_target

log = logging.getLogger(__name__)


TOY_ADAMW = adamw(lr=5e-3, weight_decay=0.01, betas=(0.9, 0.999), module=__name__)  # the default optimizer


class ToyTargetLightningModule(pl.LightningModule):
    """MSE(model(x), model.labels(x)) on sparse feature batches x (batch, n_features).

    Args:
        model_type: "tms" or "resid_mlp". model_kwargs: that class's constructor arguments.
        vocab_size: linked from the data by train.py; must be None (sparse features are not tokens).
        optimizer: OptimizerCallable (default AdamW lr 5e-3, wd 0.01, betas (0.9, 0.999)), one parameter
            group: weight decay applies to every parameter.
        warmup_steps / lr_decay_steps / min_lr_ratio: linear warmup, then cosine to min_lr_ratio of the peak
            at lr_decay_steps (None: the end of the run; min_lr_ratio 1.0 = constant LR).
        save_path: where to write the target file at the end of fit (None: only `<log_dir>/target.pt`).
        n_eval: examples for the final MSE / TMS checks.
        cpu_threads: torch.set_num_threads for CPU runs (None: leave it); toys run fastest on 1 thread.
    """

    def __init__(
        self,
        model_type: Literal["tms", "resid_mlp"] = "tms",
        model_kwargs: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        optimizer: OptimizerCallable = TOY_ADAMW,
        warmup_steps: int = 0,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 1.0,
        save_path: str | None = None,
        n_eval: int = 20_000,
        cpu_threads: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size is not None:
            raise ValueError(f"toy targets take sparse feature data, not tokens (vocab_size={vocab_size})")
        check_schedule_args(warmup_steps, lr_decay_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model_kwargs = dict(model_kwargs or {"n_features": 5, "n_hidden": 2})
        self.model = build_toy_model(model_type, self.model_kwargs)
        self.optimizer_factory = optimizer
        self.checks: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        if self.hparams.cpu_threads and self.trainer.strategy.root_device.type == "cpu":
            torch.set_num_threads(self.hparams.cpu_threads)
        datamodule = getattr(self.trainer, "datamodule", None)
        n_data = getattr(datamodule, "n_features", None)
        if n_data is not None and n_data != self.model.n_features:
            raise ValueError(
                f"data.n_features={n_data} but the {self.hparams.model_type} target has "
                f"{self.model.n_features} features; make them equal"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, n_features) -> (batch, n_features)."""
        return self.model(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.model(batch), self.model.labels(batch))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", F.mse_loss(self.model(batch), self.model.labels(batch)), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return configure_optimizer(
            self, self.optimizer_factory, self.model.named_parameters(), hp.warmup_steps, hp.min_lr_ratio,
            hp.lr_decay_steps, decay_groups=False,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(self, feature_prob: float, seed: int = 1234) -> dict[str, Any]:
        """Held-out MSE; for TMS also the target checks (feature norms, one-hot diagonal, MSE)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if isinstance(self.model, TMSModel):
                return check_tms_target(self.model, feature_prob, self.hparams.n_eval, seed)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            x = sparse_feature_batch(
                self.hparams.n_eval,
                self.model.n_features,
                feature_prob,
                gen,
                self.device,
                self.model.value_range,
            )
            return {"mse": F.mse_loss(self.model(x), self.model.labels(x)).item()}
        finally:
            self.model.train(was_training)

    def on_train_end(self) -> None:
        # not on_fit_end: the strategy's teardown (module to CPU) runs before it; evaluate where it trained
        feature_prob = getattr(getattr(self.trainer, "datamodule", None), "feature_prob", 0.05)
        self.checks = self.evaluate(feature_prob)
        self._save()

    @rank_zero_only
    def _save(self) -> None:
        kind, kwargs = self.hparams.model_type, self.model_kwargs
        paths = [Path(self.hparams.save_path)] if self.hparams.save_path else []
        log_dir = run_dir(self.trainer)  # no collective: this runs on rank 0 only
        paths.append(log_dir / "target.pt")
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "target_checks.json").write_text(json.dumps(self.checks, indent=2))
        for path in paths:
            save_toy_target(path, self.model, kind, kwargs, self.checks)
        status = "" if "passed" not in self.checks else f" (TMS checks passed: {self.checks['passed']})"
        log.info("toy target saved to %s%s", [str(p) for p in paths], status)
        print(f"toy target: {json.dumps(self.checks)}\nsaved to {[str(p) for p in paths]}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TOY_KEY] = {"model_type": self.hparams.model_type, "model_kwargs": self.model_kwargs}
