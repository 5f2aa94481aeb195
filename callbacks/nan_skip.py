"""Skip optimisation steps whose loss or gradients are not finite, agreed across all ranks.

Why a callback and not `return None` from training_step: under DDP that raises (Lightning >= 2.3) and a
rank that skips backward alone would hang the others. Here every rank runs backward as usual; just before
the optimizer step the ranks agree (`reduce_boolean_decision`) whether ANY of them saw a non-finite loss
or gradient, and if so all of them drop their gradients, so weights and optimizer state stay untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.paths import run_dir

log = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


class SkipNonFiniteSteps(pl.Callback):
    """Drop the optimizer step when the loss or any gradient is NaN/Inf.

    Args:
        max_consecutive_skips: after this many skipped steps in a row, save a checkpoint and stop with
            an error naming the step and the non-finite tensors (0 = never stop).
        check_loss: also check each micro-batch's loss (before backward).
        abort_checkpoint: file name of the checkpoint saved before stopping (in the run's log directory).

    Logged: `train/skipped_steps` (total) and `train/consecutive_skips`. The LR scheduler still advances on
    a skipped step (the schedule counts optimizer calls, not successful updates).
    """

    def __init__(
        self,
        max_consecutive_skips: int = 10,
        check_loss: bool = True,
        abort_checkpoint: str = "nonfinite_abort.ckpt",
    ) -> None:
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.check_loss = check_loss
        self.abort_checkpoint = abort_checkpoint
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._loss_finite = True

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.check_loss:
            self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_finite, grads_finite = self._loss_finite, _all_finite(grads)
        self._loss_finite = True
        # Every rank takes part in the reduction every step, so no rank can wait on another.
        all_ok = trainer.strategy.reduce_boolean_decision(loss_finite and grads_finite, all=True)
        if all_ok:
            self.consecutive_skips = 0
        else:
            culprits = ([] if loss_finite else ["loss"]) + (
                [] if grads_finite else _non_finite_grads(pl_module)
            )
            self._skip(trainer, optimizer, culprits)
        pl_module.log("train/skipped_steps", float(self.skipped_steps), reduce_fx="max")
        pl_module.log("train/consecutive_skips", float(self.consecutive_skips), reduce_fx="max")

    def _skip(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, culprits: list[str]) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        where = f"rank {trainer.global_rank}: {', '.join(culprits[:8])}" if culprits else "another rank"
        log.warning(
            "step %d: non-finite loss/gradients (%s); skipping the update", trainer.global_step, where
        )
        # Torch optimizers skip parameters without gradients, so the step changes neither weights nor
        # optimizer state. With 16-mixed, GradScaler has already unscaled and recorded its inf check
        # before this hook, so its step also becomes a no-op (and it lowers its scale if it saw the inf).
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            path = run_dir(trainer) / self.abort_checkpoint
            trainer.save_checkpoint(path)
            raise NonFiniteStepError(
                f"{self.consecutive_skips} consecutive non-finite steps up to step {trainer.global_step} "
                f"({where}); saved {path}. Lower the learning rate, enable gradient clipping or loss_clamp, "
                "or check the data around this step"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive_skips = state_dict.get("consecutive_skips", 0)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One reduction for all tensors: a norm is NaN/Inf exactly when some element is."""
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))


def _non_finite_grads(pl_module: pl.LightningModule) -> list[str]:
    return [
        f"grad of {n}"
        for n, p in pl_module.named_parameters()
        if p.grad is not None and not p.grad.isfinite().all()
    ]
