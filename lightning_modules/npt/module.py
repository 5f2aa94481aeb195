"""NPTLightningModule: equivalence pre-training of NPT layers converted from a frozen target LM.

Loss = mean_l L_l + fidelity_weight · F + reg_weight · mean_l R_l, where for converted layer l
``L_l = mean((y_l - t_l)²) / mean(t_l²)``: the MSE between the NPT layer's output y_l and the original
layer's output t_l on the same input, divided by the mean square (RMS²) of that target output (the full
residual stream h + a + MLP, detached); F = KL(teacher ‖ NPT) over the real vocabulary, mean over tokens
("kl"), or the logits' MSE ("mse"); R_l = NPComponent.regularization (mean of v²). One no-grad teacher pass
gives the hidden states, targets and logits; see NPTModel.student_forward for the two training modes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from lightning_modules.common.compat import check_data_fits, datamodule_of
from lightning_modules.common.optim import adamw, check_schedule_args, configure_optimizer
from lightning_modules.npt.convert import convert, load_target

FIDELITY = ("kl", "mse")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((output - target)²) / mean(target²), in float32; target detached."""
    target = target.detach().float()
    return (output.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)


NPT_ADAMW = adamw(lr=3e-4, weight_decay=0.01, module=__name__)  # the default optimizer


class NPTLightningModule(pl.LightningModule):
    """Trains only the NP components of a converted target; the target itself stays frozen.

    Args:
        target_path: our GPT ``.ckpt``, a local transformers dir (gpt2 / llama), or None for a fresh tiny
            target of ``target_family`` built from ``target_config``.
        target_family: 'gpt', 'gpt2' or 'llama' (None: from target_path; 'gpt' without one).
        target_config: fresh target: config overrides; loaded target: fields that must match it.
        vocab_size: tokens of the data (linked by train.py); must fit the target's embedding.
        layers: converted layers: None (upper half), 'all', 'a:b', '1,3' or a list.
        rank / num_ranks / np_mode / init_scale / np_seed: NPComponent settings per layer.
        teacher_forced: each NPT layer reads the teacher's hidden state (else the previous NPT output).
        fidelity / fidelity_weight: 'kl' or 'mse' on final logits, and its weight.
        reg_weight: λ on the mean v² regulariser.
        stats_every_n_steps: compute |v_a|, |v_b|, |u ΔW|, cos(v_a, a), modulation_gap at step 0 and every N
            steps (align with trainer.log_every_n_steps; Lightning re-logs the last value in between).
        target_dtype: load the target in this dtype (NP params stay float32; needs mixed precision).
        load_in_8bit: 8-bit base weights (transformers target, CUDA + bitsandbytes only).
        optimizer / warmup_steps / lr_decay_steps / min_lr_ratio: the optimizer over NP params (default AdamW lr
            3e-4, betas (0.9, 0.95), weight decay 0.01 on 2+-dim tensors), linear warmup then cosine to min_lr_ratio of the peak.
    """

    def __init__(
        self,
        target_path: str | None = None,
        target_family: str | None = None,
        target_config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        layers: str | int | list[int] | None = None,
        rank: int = 8,
        num_ranks: int = 4,
        np_mode: str = "single",
        init_scale: float = 0.01,
        np_seed: int | None = 0,
        teacher_forced: bool = True,
        fidelity: str = "kl",
        fidelity_weight: float = 0.1,
        reg_weight: float = 0.01,
        stats_every_n_steps: int = 50,
        target_dtype: str | None = None,
        load_in_8bit: bool = False,
        optimizer: OptimizerCallable = NPT_ADAMW,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if fidelity not in FIDELITY:
            raise ValueError(f"fidelity={fidelity!r}; valid: {FIDELITY}")
        check_schedule_args(warmup_steps, lr_decay_steps, min_lr_ratio)
        for name in ("fidelity_weight", "reg_weight"):
            if getattr(self.hparams, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self.hparams, name)}")
        if stats_every_n_steps < 1:
            raise ValueError(f"stats_every_n_steps must be >= 1, got {stats_every_n_steps}")
        if target_dtype is not None and target_dtype not in DTYPES:
            raise ValueError(f"target_dtype={target_dtype!r}; valid: {sorted(DTYPES)} or null")
        config = dict(target_config or {})
        if target_path is None and vocab_size is not None:
            config["vocab_size"] = vocab_size  # a fresh target is sized to the data
        model, family = load_target(
            target_path, target_family, config, DTYPES.get(target_dtype or ""), load_in_8bit
        )
        self.npt = convert(model, layers, rank, num_ranks, np_mode, init_scale, np_seed)
        check_data_fits(f"the {family} target", vocab_size, self.npt.embed_size)
        self.optimizer_factory = optimizer
        self.val_ce_npt, self.val_ce_original = MeanMetric(), MeanMetric()

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        datamodule = datamodule_of(self)
        check_data_fits(
            "the target",
            block_size=getattr(datamodule, "block_size", None),
            max_positions=self.npt.max_seq_len,
        )
        precision = str(self.trainer.precision)
        if self.hparams.target_dtype not in (None, "float32") and "mixed" not in precision:
            raise ValueError(
                f"target_dtype={self.hparams.target_dtype!r} with float32 NP params needs mixed precision; "
                f"trainer.precision={precision!r}; valid: bf16-mixed / 16-mixed, or target_dtype null"
            )

    # ------------------------------------------------------------------ losses
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """NPT logits (b, s, vocab)."""
        return self.npt(idx)

    def fidelity(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ NPT) per token or logit MSE, over the real vocabulary; logits (b, s, vocab)."""
        v = self.npt.vocab_size
        s, t = logits[..., :v].float().flatten(0, 1), teacher[..., :v].float().flatten(0, 1)
        if self.hparams.fidelity == "mse":
            return F.mse_loss(s, t)
        return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")

    def losses(self, x: torch.Tensor, teacher_forced: bool) -> dict[str, Any]:
        """Teacher pass (no grad), student pass, then every loss term; x (b, s) token ids."""
        teacher = self.npt.teacher_forward(x)
        logits, outputs, targets = self.npt.student_forward(x, teacher_forced)
        per_layer = [relative_mse(o, t) for o, t in zip(outputs, targets)]
        equiv = torch.stack(per_layer).mean()
        regs = [layer.np.regularization(None, z=layer.io["z"]) for layer in self.npt.npt_layers]
        reg = torch.stack(regs).mean()
        fid = self.fidelity(logits, teacher)
        hp = self.hparams
        total = equiv + hp.fidelity_weight * fid + hp.reg_weight * reg
        return dict(
            loss=total, equiv=equiv, fidelity=fid, reg=reg, layers=per_layer, logits=logits, teacher=teacher
        )

    def _log_terms(self, prefix: str, out: dict[str, Any], **kw: Any) -> None:
        for name in ("loss", "equiv", "fidelity", "reg"):
            self.log(f"{prefix}/{name}", out[name].detach(), prog_bar=name in ("loss", "equiv"), **kw)
        for i, value in zip(self.npt.indices, out["layers"]):
            self.log(f"{prefix}/layer{i}", value.detach(), **kw)

    def _log_stats(self, prefix: str, **kw: Any) -> None:
        """Per-layer NP statistics and exact-patch gap, and their means over layers."""
        stats = self.npt.layer_stats()
        for name in next(iter(stats.values())):
            per_layer = {i: s[name] for i, s in stats.items() if name in s}
            for i, value in per_layer.items():
                self.log(f"{prefix}/layer{i}/{name}", value, **kw)
            self.log(f"{prefix}/{name}", torch.stack(list(per_layer.values())).mean(), **kw)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        out = self.losses(x, self.hparams.teacher_forced)
        self._log_terms("train", out)
        if (self.global_step + 1) % self.hparams.stats_every_n_steps == 0 or self.global_step == 0:
            self._log_stats("stats")
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.npt.clear()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self.losses(x, teacher_forced=False)  # the deployed condition: NPT layers feed each other
        self._log_terms("val", out, on_epoch=True)
        self._log_stats("val_stats", on_epoch=True)
        v = self.npt.vocab_size
        for metric, logits in ((self.val_ce_npt, out["logits"]), (self.val_ce_original, out["teacher"])):
            metric.update(
                F.cross_entropy(logits[..., :v].flatten(0, 1).float(), y.flatten()), weight=y.numel()
            )
        self.npt.clear()

    def on_validation_epoch_end(self) -> None:
        for name, metric in (("npt", self.val_ce_npt), ("original", self.val_ce_original)):
            ce = metric.compute()
            metric.reset()
            self.log(f"val/ce_{name}", ce)
            self.log(f"val/ppl_{name}", torch.exp(ce))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return configure_optimizer(
            self,
            self.optimizer_factory,
            self.npt.np_named_parameters(),
            hp.warmup_steps,
            hp.min_lr_ratio,
            hp.lr_decay_steps,
        )  # fmt: skip  (NP parameters only: the target stays frozen)

    # ------------------------------------------------------------------ checkpoints: NP parameters only
    def _np_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self._np_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["npt_layers"] = list(self.npt.indices)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("npt_layers")
        if saved is not None and list(saved) != self.npt.indices:
            raise ValueError(
                f"checkpoint converts layers {saved}, this model {self.npt.indices}; set layers to match"
            )
        state, own = checkpoint.get("state_dict", {}), dict(self.named_parameters())
        keys = self._np_keys()
        missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
        common = sorted(keys & set(state))
        bad = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in common
            if state[k].shape != own[k].shape
        ]
        if missing or unexpected or bad:
            raise ValueError(
                f"checkpoint NP parameters do not match this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, shapes checkpoint vs model {bad[:3]}); rank/num_ranks/np_mode/layers must match"
            )
        # only NP parameters are saved: the frozen target comes from target_path, so loading stays strict
        checkpoint["state_dict"] = {**self.state_dict(), **state}
