"""GPTLightningModule: next-token training of `GPT` with AdamW decay groups and warmup + cosine LR."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric, SumMetric

from callbacks.paths import run_dir
from callbacks.prediction_writer import TextPredictionWriter
from lightning_modules.common.batch import report_batch
from lightning_modules.common.compat import check_data_fits, datamodule_of
from lightning_modules.common.optim import adamw, check_schedule_args, configure_optimizer
from lightning_modules.common.quiet_logging import log_rank_reduced
from lightning_modules.common.targets import load_target_model
from lightning_modules.gpt.checkpoint import training_fields
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT

log = logging.getLogger(__name__)


GPT_ADAMW = adamw(lr=6e-4, weight_decay=0.1, module=__name__)  # the default optimizer (GPT-2 recipe)


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
        init_from: start from weights: a local `transformers` GPT-2 / Llama directory or one of our `.ckpt` files;
            the architecture then comes from those weights, not from `config`.
        optimizer: an optimizer factory (LightningCLI `OptimizerCallable`; default AdamW lr 6e-4, betas
            (0.9, 0.95), weight decay 0.1); weight decay applies only to tensors with 2+ dims; fused on CUDA.
        warmup_steps: linear warmup steps. lr_decay_steps: cosine length (None = the whole run).
        min_lr_ratio: the cosine ends at this fraction of the peak LR.
        loss_clamp: clamp each token's loss at this value before averaging (None = off); tames spikes.
        compile: `torch.compile` the inner model in configure_model (state-dict keys unchanged).
        sample_prompt / sample_tokens / sample_temperature / sample_top_k: the text sample generated and
            logged after each validation (sample_tokens 0 = off); sample_prompt None: the DataModule's
            `sample_prompt()` (a line of the validation data), or a newline when it has none.
        attention_figures: after each validation, log the attention patterns of the first and last layer's
            first heads on the first validation sequence (TensorBoard `figures/attention`; gpt/figures.py).

    Validation and test log `loss`, `ppl` and, when the DataModule has `token_bytes` (the UTF-8 length of
    each token id), `bpb`: bits per byte, (sum of per-token cross-entropy in nats, not clamped) /
    (ln 2 * sum of the target tokens' bytes), comparable across tokenizers.
    """

    def __init__(
        self,
        config: GPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        optimizer: OptimizerCallable = GPT_ADAMW,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        loss_clamp: float | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        sample_prompt: str | None = None,
        sample_tokens: int = 128,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 50,
        attention_figures: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):  # as stored in a checkpoint's hyper_parameters
            config = GPTConfig(**config)
        # The config is stored as a plain dict so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "config"])
        check_schedule_args(warmup_steps, lr_decay_steps, min_lr_ratio)
        if loss_clamp is not None and loss_clamp <= 0:
            raise ValueError(f"loss_clamp must be > 0 or None, got {loss_clamp}")
        self.model = self._build_model(config or GPTConfig.from_name("tiny"), vocab_size, init_from)
        self.config = self.model.config
        self.hparams["config"] = dataclasses.asdict(self.config)
        self.hparams["init_from"] = None  # the stored config now describes the weights; don't reload them
        self.optimizer_factory = optimizer
        self.val_loss = MeanMetric()  # token-weighted mean cross-entropy (weights = token counts)
        self.val_nats = SumMetric()  # bits per byte: summed cross-entropy (nats) ...
        self.val_bytes = SumMetric()  # ... over the summed UTF-8 bytes of the target tokens
        self._token_bytes: tuple[torch.Tensor, torch.Tensor] | None = None  # (the data's, on this device)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self._compiled = False
        self._attention_sample: tuple[dict, list[int]] | None = None  # (patterns, token ids), see figures.py

    @staticmethod
    def _build_model(config: GPTConfig, vocab_size: int | None, init_from: str | None) -> GPT:
        if init_from is None:
            if vocab_size is not None and vocab_size != config.vocab_size:
                config = dataclasses.replace(config, vocab_size=vocab_size, padded_vocab_size=None)
            return GPT(config)
        model, _ = load_target_model(init_from, "gpt", config=training_fields(config))
        check_data_fits(f"the model from {init_from!r}", vocab_size, model.config.padded_vocab_size)
        return model

    def configure_model(self) -> None:
        if self.hparams.compile and not self._compiled:
            self.model.compile(mode=self.hparams.compile_mode)  # in place: state-dict keys stay clean
            self._compiled = True

    def setup(self, stage: str) -> None:
        datamodule = datamodule_of(self)
        check_data_fits(
            "the model",
            vocab_size=getattr(datamodule, "vocab_size", None),
            embed_rows=self.config.padded_vocab_size,
            block_size=getattr(datamodule, "block_size", None),
            max_positions=self.config.block_size,
        )

    def on_train_start(self) -> None:
        report_batch(self.trainer, self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; logits (b, s, vocab), targets (b, s); optional per-token clamp."""
        return self._clamped_mean(self._token_losses(logits, targets))

    @staticmethod
    def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every token (b * s,), in float32."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")

    def _clamped_mean(self, per_token: torch.Tensor) -> torch.Tensor:
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
        per_token = self._token_losses(self.model(x), y)  # once, for the loss and the bits per byte
        if self.hparams.attention_figures and batch_idx == 0 and not self.trainer.sanity_checking:
            from lightning_modules.gpt.figures import attention_sample

            # on every rank: the extra 1 x 32-token forward may gather sharded weights (FSDP, DeepSpeed)
            self._attention_sample = attention_sample(self.model, x)
        self.val_loss.update(self._clamped_mean(per_token), weight=n_tokens)
        token_bytes = self._target_token_bytes()
        if token_bytes is not None:
            self.val_nats.update(per_token.sum())  # unclamped: bits per byte measure the model itself
            self.val_bytes.update(token_bytes[y].sum())

    def _target_token_bytes(self) -> torch.Tensor | None:
        """The DataModule's `token_bytes` (UTF-8 length per token id) on this device, or None without one."""
        datamodule = datamodule_of(self)
        source = getattr(datamodule, "token_bytes", None) if datamodule is not None else None
        if not isinstance(source, torch.Tensor):
            return None
        cached = self._token_bytes
        if cached is None or cached[0] is not source or cached[1].device != self.device:
            self._token_bytes = cached = (source, source.to(self.device))
        return cached[1]

    def _bits_per_byte(self) -> torch.Tensor | None:
        """Bits per byte of the validation/test pass (sums reduced across ranks), then reset; None without
        token_bytes."""
        if not self.val_bytes.update_called:
            return None
        bpb = self.val_nats.compute() / (math.log(2) * self.val_bytes.compute())
        self.val_nats.reset()
        self.val_bytes.reset()
        return bpb

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_figures("val")
        if not self.trainer.sanity_checking:
            self._log_sample()
            self._log_attention_figure()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_figures("test")

    def _log_epoch_figures(self, prefix: str) -> None:
        """<prefix>/loss, /ppl and (with token_bytes) /bpb of the pass, reduced across ranks by torchmetrics."""
        loss = self.val_loss.compute()
        self.val_loss.reset()
        figures = {f"{prefix}/loss": loss, f"{prefix}/ppl": torch.exp(loss)}
        bpb = self._bits_per_byte()
        if bpb is not None:
            figures[f"{prefix}/bpb"] = bpb
        log_rank_reduced(self, figures, prog_bar=["val/loss"])

    def predict_step(self, batch: Any, batch_idx: int) -> list[str] | torch.Tensor:
        """Continue each prompt in the batch ((x, y) pairs use x) with the sampling settings; returns the texts
        (prompt + continuation, the DataModule's `decode`), or the token ids (batch, seq) without one."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.generate(
            x, self.hparams.sample_tokens, self.hparams.sample_temperature, self.hparams.sample_top_k
        )
        decode = getattr(datamodule_of(self), "decode", None)
        return out if decode is None else [decode(row) for row in out.tolist()]

    def configure_callbacks(self) -> list[pl.Callback]:
        """`predict` writes its texts to predictions.txt in the run directory."""
        return [TextPredictionWriter()]

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
        text = self.hparams.sample_prompt
        if text is None:
            text = datamodule.sample_prompt() if hasattr(datamodule, "sample_prompt") else "\n"
        prompt = datamodule.encode(text) or [0]
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

    @rank_zero_only
    def _log_attention_figure(self) -> None:
        """Attention patterns of a few heads on the first validation sequence (attention_figures)."""
        if self._attention_sample is None:
            return
        from lightning_modules.common.plotting import log_figures
        from lightning_modules.gpt.figures import attention_figure

        patterns, ids = self._attention_sample
        self._attention_sample = None
        decode = getattr(datamodule_of(self), "decode", None)
        tokens = [decode([t]) for t in ids] if decode is not None else None
        step = self.trainer.global_step
        log_figures(self.loggers, {"attention": attention_figure(patterns, tokens, step)}, step)

    def measure_flops_per_batch(self, batch: tuple[torch.Tensor, ...]) -> int:
        """Training FLOPs (forward + backward) of one batch, counted on a meta-device copy of the model."""
        return training_flops(self.config, tuple(batch[0].shape))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return configure_optimizer(
            self, self.optimizer_factory, self.model.named_parameters(), hp.warmup_steps, hp.min_lr_ratio,
            hp.lr_decay_steps,
        )  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("gpt_architecture")
        if saved:
            diff = self.config.architecture_diff(saved)
            if diff:
                details = ", ".join(f"{k}: checkpoint={v[1]!r} model={v[0]!r}" for k, v in diff.items())
                raise ValueError(f"checkpoint architecture differs from the model's: {details}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gpt_architecture"] = self.config.architecture()
