"""GPTLightningModule: next-token training of `GPT` with AdamW decay groups and warmup + cosine LR."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from lightning_modules.common.batch import report_batch
from lightning_modules.common.optim import (
    build_optimizer,
    decay_param_groups,
    default_adamw,
    warmup_cosine_lambda,
)
from lightning_modules.common.paths import run_dir
from lightning_modules.gpt.checkpoint import load_gpt_weights, training_fields
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT

log = logging.getLogger(__name__)


def training_flops(config: GPTConfig, shape: tuple[int, int]) -> int:
    """Forward + backward FLOPs of one (batch, seq) batch, counted by FlopCounterMode on a meta-device copy
    of the model (gradient checkpointing's recompute is not model FLOPs, so it is off in the copy)."""
    from lightning.fabric.utilities.throughput import measure_flops

    with torch.device("meta"):
        meta_model = GPT(dataclasses.replace(config, gradient_checkpointing=False))
        x = torch.zeros(shape, dtype=torch.long)
    return measure_flops(meta_model, lambda: meta_model(x), loss_fn=lambda logits: logits.sum())


class GPTLightningModule(pl.LightningModule):
    """Trains a GPT on (x, y) token batches of shape (batch, seq).

    Args:
        config: the model's architecture; `vocab_size` is replaced by the linked DataModule's.
        vocab_size: tokens produced by the data (linked from `data.vocab_size` by train.py).
        init_from: start from weights: a local `transformers` GPT-2 directory or one of our `.ckpt` files;
            the architecture then comes from those weights, not from `config`.
        optimizer: an optimizer factory (LightningCLI `OptimizerCallable`); weight decay applies only to
            tensors with 2+ dims; fused on CUDA.
        warmup_steps: linear warmup steps. lr_decay_steps: cosine length (None = the whole run).
        min_lr_ratio: the cosine ends at this fraction of the peak LR.
        loss_clamp: clamp each token's loss at this value before averaging (None = off); tames spikes.
        compile: `torch.compile` the inner model in configure_model (state-dict keys unchanged).
        sample_prompt / sample_tokens / sample_temperature / sample_top_k: the text sample generated and
            logged after each validation (sample_tokens 0 = off).
    """

    def __init__(
        self,
        config: GPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        optimizer: OptimizerCallable = default_adamw,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        loss_clamp: float | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        sample_prompt: str = "\n",
        sample_tokens: int = 128,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 50,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):  # as stored in a checkpoint's hyper_parameters
            config = GPTConfig(**config)
        # The config is stored as a plain dict so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "config"])
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if lr_decay_steps is not None and lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be >= 1 or None, got {lr_decay_steps}")
        if loss_clamp is not None and loss_clamp <= 0:
            raise ValueError(f"loss_clamp must be > 0 or None, got {loss_clamp}")
        self.model = self._build_model(config or GPTConfig.from_name("tiny"), vocab_size, init_from)
        self.config = self.model.config
        self.hparams["config"] = dataclasses.asdict(self.config)
        self.hparams["init_from"] = None  # the stored config now describes the weights; don't reload them
        self.optimizer_factory = optimizer
        self.val_loss = MeanMetric()  # token-weighted mean cross-entropy (weights = token counts)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self._compiled = False

    @staticmethod
    def _build_model(config: GPTConfig, vocab_size: int | None, init_from: str | None) -> GPT:
        if init_from is None:
            if vocab_size is not None and vocab_size != config.vocab_size:
                config = dataclasses.replace(config, vocab_size=vocab_size, padded_vocab_size=None)
            return GPT(config)
        model = load_gpt_weights(init_from, training_overrides=training_fields(config))
        if vocab_size is not None and vocab_size > model.config.padded_vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the model from {init_from!r} embeds only "
                f"{model.config.padded_vocab_size}; use that model's tokenizer or one with <= "
                f"{model.config.padded_vocab_size} tokens"
            )
        return model

    def configure_model(self) -> None:
        if self.hparams.compile and not self._compiled:
            self.model.compile(mode=self.hparams.compile_mode)  # in place: state-dict keys stay clean
            self._compiled = True

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        block = getattr(datamodule, "block_size", None)
        if block is not None and block > self.config.block_size:
            raise ValueError(
                f"data block_size={block} exceeds the model's positions (block_size={self.config.block_size}); "
                f"set data.init_args.block_size <= {self.config.block_size}"
            )
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.config.padded_vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model embeds {self.config.padded_vocab_size}; "
                "link data.vocab_size to the model or use a smaller tokenizer"
            )

    def on_train_start(self) -> None:
        report_batch(self.trainer, self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; logits (b, s, vocab), targets (b, s); optional per-token clamp."""
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        if self.hparams.loss_clamp is not None:
            per_token = per_token.clamp(max=self.hparams.loss_clamp)
        return per_token.mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self.model(x), y)
        self.tokens_seen += y.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens_seen", self.tokens_seen.float(), reduce_fx="max")
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        n_tokens = y.numel()
        mean_loss = self.loss(self.model(x), y)
        self.val_loss.update(mean_loss, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised across ranks by torchmetrics
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), sync_dist=False)
        if not self.trainer.sanity_checking:
            self._log_sample()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Continue each prompt in the batch ((x, y) pairs use x) with the sampling settings."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.generate(
            x, self.hparams.sample_tokens, self.hparams.sample_temperature, self.hparams.sample_top_k
        )

    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Sample max_new_tokens after prompt_ids (batch, seq); see `GPT.generate`."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.generate(prompt_ids.to(self.device), max_new_tokens, temperature, top_k)
        finally:
            self.model.train(was_training)

    @rank_zero_only
    def _log_sample(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.sample_tokens <= 0 or datamodule is None or not hasattr(datamodule, "decode"):
            return
        prompt = datamodule.encode(self.hparams.sample_prompt) or [0]
        out = self.generate(
            torch.tensor([prompt], device=self.device),
            self.hparams.sample_tokens,
            self.hparams.sample_temperature,
            self.hparams.sample_top_k,
        )
        text = datamodule.decode(out[0].tolist())
        step = self.trainer.global_step
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                # TensorBoard renders markdown: a code block keeps whitespace and newlines.
                experiment.add_text("samples/generated", f"```\n{text}\n```", global_step=step)
        directory = run_dir(self.trainer)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step} ===\n{text}\n\n")
        log.info("sample at step %d:\n%s", step, text)

    def measure_flops_per_batch(self, batch: tuple[torch.Tensor, ...]) -> int:
        """Training FLOPs (forward + backward) of one batch, counted on a meta-device copy of the model."""
        return training_flops(self.config, tuple(batch[0].shape))

    def configure_optimizers(self) -> dict[str, Any]:
        groups = decay_param_groups(self.model.named_parameters())
        optimizer = build_optimizer(self.optimizer_factory, groups, on_cuda=self.device.type == "cuda")
        total = self.hparams.lr_decay_steps or max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, max(0, total - 1))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine_lambda(warmup, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("gpt_architecture")
        if saved:
            diff = self.config.architecture_diff(saved)
            if diff:
                details = ", ".join(f"{k}: checkpoint={v[1]!r} model={v[0]!r}" for k, v in diff.items())
                raise ValueError(f"checkpoint architecture differs from the model's: {details}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gpt_architecture"] = self.config.architecture()
