"""NPTLightningModule: equivalence pre-training of NPT layers converted from a frozen target LM.

Loss = mean_l L_l + fidelity_weight · F + reg_weight · mean_l R_l, where for converted layer l
``L_l = mean((y_l - t_l)²) / mean(t_l²)``: the MSE between the NPT layer's output y_l and the original
layer's output t_l on the same input, divided by the mean square (RMS²) of that target output (the full
residual stream h + a + MLP, detached); F = KL(teacher ‖ NPT) over the real vocabulary, mean over tokens
("kl"), or the logits' MSE ("mse"); R_l = NPComponent.regularization (mean of v²). One no-grad teacher pass
gives the hidden states, targets and logits; see NPTModel.student_forward for the two training modes.

Beside L_l the module logs the reference's normalisation ``equiv_rel_l = mean((y_l - t_l)²) /
mean((t_l - h_l)²)``: the error relative to what the original layer adds to its input h_l (a + MLP), the
headline figure. Validation also measures the perplexity of the original model, of the NPT model and of
the model whose converted layers drop their attention output (``dropped`` layers), and the fraction of
the drop's cost that NPT recovers. ``schedule: sequential`` trains the converted layers one at a time.
At the end of fit ``npt_results.json`` in the run directory holds the final figures and their history.
"""

from __future__ import annotations

import json
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from callbacks.paths import run_dir
from lightning_modules.common.compat import check_data_fits, datamodule_of
from lightning_modules.common.optim import (
    adamw,
    check_schedule_args,
    configure_optimizer,
    warmup_cosine_lambda,
)
from lightning_modules.common.plotting import log_figures, save_figures
from lightning_modules.common.quiet_logging import expect_frozen_eval_modules, log_rank_reduced
from lightning_modules.npt.components import INITS, MODULATIONS
from lightning_modules.npt.convert import convert, load_target
from lightning_modules.npt.figures import history_figures, modulation_norm_figure
from lightning_modules.npt.storage import STORAGE_DTYPES, store_frozen

FIDELITY = ("kl", "mse")
SCHEDULES = ("joint", "sequential")
PPL_KINDS = ("original", "npt", "attention_dropped")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((output - target)²) / mean(target²), in float32; target detached."""
    target = target.detach().float()
    return (output.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)


def update_relative_mse(
    output: torch.Tensor, target: torch.Tensor, layer_input: torch.Tensor
) -> torch.Tensor:
    """The reference's normalisation: mean((output - target)²) / mean((target - input)²), in float32.

    ``target - input`` is what the original layer adds to the residual stream (a + MLP(h + a)), so 1 means
    an error as large as the layer's whole contribution; the denominator is detached.
    """
    added = (target.detach().float() - layer_input.detach().float()).square().mean().clamp_min(1e-12)
    return (output.float() - target.detach().float()).square().mean() / added


def recovered_fraction(ppl_dropped: float, ppl_npt: float, ppl_original: float) -> float:
    """(ppl_dropped - ppl_npt) / (ppl_dropped - ppl_original): 1 = NPT as good as the original, 0 = no
    better than dropping the attention; NaN when dropping costs nothing."""
    cost = ppl_dropped - ppl_original
    return (ppl_dropped - ppl_npt) / cost if cost > 0 else float("nan")


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
        modulation: 'quadratic' (NPT: u ΔW with ΔW = Σ v_a ⊗ v_b) or 'linear' (the ablation: the same
            vectors added to the MLP input and the input projection's output; same parameter count).
        np_init: 'default' or 'identity' (identity-like W_a_up of the first component, as the reference).
        teacher_forced: each NPT layer reads the teacher's hidden state (else the previous NPT output).
        schedule: 'joint' (every converted layer every step) or 'sequential' (one layer at a time, lowest
            first, ``steps_per_layer`` optimizer steps each; trainer.max_steps must equal the total).
        steps_per_layer: the sequential step budget per layer; the LR schedule restarts for each layer.
        frozen_dtype: store the frozen base weights in this dtype ('bfloat16') and compute in float32.
        fidelity / fidelity_weight: 'kl' or 'mse' on final logits, and its weight.
        reg_weight: λ on the mean v² regulariser.
        stats_every_n_steps: compute |v_a|, |v_b|, |u ΔW|, cos(v_a, a), modulation_gap at step 0 and every N
            steps (align with trainer.log_every_n_steps; Lightning re-logs the last value in between).
        final_eval_batches: validation batches of the end-of-fit evaluation (npt_results.json).
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
        modulation: str = "quadratic",
        np_init: str = "default",
        teacher_forced: bool = True,
        schedule: str = "joint",
        steps_per_layer: int | None = None,
        frozen_dtype: str | None = None,
        fidelity: str = "kl",
        fidelity_weight: float = 0.1,
        reg_weight: float = 0.01,
        stats_every_n_steps: int = 50,
        final_eval_batches: int = 20,
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
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation={modulation!r}; valid: {MODULATIONS}")
        if np_init not in INITS:
            raise ValueError(f"np_init={np_init!r}; valid: {INITS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; valid: {SCHEDULES}")
        if schedule == "sequential" and (steps_per_layer is None or steps_per_layer < 1):
            raise ValueError(f"schedule='sequential' needs steps_per_layer >= 1, got {steps_per_layer!r}")
        if frozen_dtype is not None and frozen_dtype not in STORAGE_DTYPES:
            raise ValueError(f"frozen_dtype={frozen_dtype!r}; valid: {sorted(STORAGE_DTYPES)} or null")
        if frozen_dtype is not None and (target_dtype not in (None, "float32") or load_in_8bit):
            raise ValueError("frozen_dtype stores float32 base weights in low precision: use it without "
                             "target_dtype / load_in_8bit")  # fmt: skip
        check_schedule_args(warmup_steps, lr_decay_steps, min_lr_ratio)
        for name in ("fidelity_weight", "reg_weight"):
            if getattr(self.hparams, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self.hparams, name)}")
        for name in ("stats_every_n_steps", "final_eval_batches"):
            if getattr(self.hparams, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self.hparams, name)}")
        if target_dtype is not None and target_dtype not in DTYPES:
            raise ValueError(f"target_dtype={target_dtype!r}; valid: {sorted(DTYPES)} or null")
        config = dict(target_config or {})
        if target_path is None and vocab_size is not None:
            config["vocab_size"] = vocab_size  # a fresh target is sized to the data
        model, family = load_target(
            target_path, target_family, config, DTYPES.get(target_dtype or ""), load_in_8bit
        )
        self.npt = convert(
            model, layers, rank, num_ranks, np_mode, init_scale, np_seed, modulation=modulation, init=np_init
        )
        if frozen_dtype is not None:
            store_frozen(self.npt.model, STORAGE_DTYPES[frozen_dtype], skip=self._np_ids())
        check_data_fits(f"the {family} target", vocab_size, self.npt.embed_size)
        self.optimizer_factory = optimizer
        self.val_ce = {kind: MeanMetric() for kind in PPL_KINDS}
        for kind, metric in self.val_ce.items():
            self.add_module(f"val_ce_{kind}", metric)
        self.val_rel = {i: MeanMetric() for i in self.npt.indices}
        for i, metric in self.val_rel.items():
            self.add_module(f"val_rel_layer{i}", metric)
        # validation figures over training, {name: [(step, value), ...]}; kept in the checkpoint
        self.val_history: dict[str, list[tuple[int, float]]] = {}
        # per-token modulation norms of the first evaluated batch, for the next histogram (then cleared)
        self._figure_norms: dict[int, Tensor] | None = None

    # ------------------------------------------------------------------ checks
    def on_fit_start(self) -> None:
        expect_frozen_eval_modules(self, self.npt.model)  # the frozen target runs in eval mode by design

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
        if stage == "fit" and self.hparams.schedule == "sequential":
            n, per = len(self.npt.indices), self.hparams.steps_per_layer
            if self.trainer.max_steps != n * per:
                raise ValueError(
                    f"schedule='sequential' trains {n} layers x steps_per_layer {per} = {n * per} steps, but "
                    f"trainer.max_steps={self.trainer.max_steps}; set max_steps to {n * per}"
                )

    # ------------------------------------------------------------------ sequential schedule
    def _np_ids(self) -> set[int]:
        return {id(p) for p in self.npt.np_parameters()}

    def active_layer(self, step: int | None = None) -> int | None:
        """The converted layer trained at ``step`` (default: now) in sequential mode; None when joint."""
        if self.hparams.schedule != "sequential":
            return None
        step = self.global_step if step is None else step
        position = min(step // self.hparams.steps_per_layer, len(self.npt.indices) - 1)
        return self.npt.indices[position]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Sequential mode: only the active layer's NP parameters take gradients (the others get none, so
        the optimizer leaves them and their moments untouched)."""
        active = self.active_layer()
        if active is None:
            return
        for i, layer in zip(self.npt.indices, self.npt.npt_layers):
            layer.np.requires_grad_(i == active)

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

    def losses(self, x: torch.Tensor, teacher_forced: bool, active: int | None = None) -> dict[str, Any]:
        """Teacher pass (no grad), student pass, then every loss term; x (b, s) token ids.

        ``active``: sequential training of that converted layer: teacher-forced, it alone runs as an NPT
        layer; free-running, the converted layers below it run as NPT layers too (their NP parameters
        frozen). The loss terms then cover the active layer only; fidelity sees the logits of that pass.
        """
        teacher = self.npt.teacher_forward(x)
        indices = self.npt.indices
        run = None
        if active is not None:
            run = [active] if teacher_forced else [i for i in indices if i <= active]
        logits, outputs, targets = self.npt.student_forward(x, teacher_forced, run)
        run = indices if run is None else run
        layers = [self.npt.layers[i] for i in run]
        inputs = [layer.io["input"] for layer in layers]
        per_layer = [relative_mse(o, t) for o, t in zip(outputs, targets)]
        per_layer_rel = [update_relative_mse(o, t, h) for o, t, h in zip(outputs, targets, inputs)]
        trained = list(range(len(run))) if active is None else [run.index(active)]
        equiv = torch.stack([per_layer[n] for n in trained]).mean()
        regs = [layers[n].np.regularization(None, z=layers[n].io["z"]) for n in trained]
        reg = torch.stack(regs).mean()
        fid = self.fidelity(logits, teacher)
        hp = self.hparams
        total = equiv + hp.fidelity_weight * fid + hp.reg_weight * reg
        equiv_rel = torch.stack([per_layer_rel[n] for n in trained]).mean()
        return dict(
            loss=total,
            equiv=equiv,
            equiv_rel=equiv_rel,
            fidelity=fid,
            reg=reg,
            run=run,
            layers=per_layer,
            layers_rel=per_layer_rel,
            logits=logits,
            teacher=teacher,
        )

    def _log_terms(self, prefix: str, out: dict[str, Any], with_rel: bool = True, **kw: Any) -> None:
        """The loss terms and per-layer errors; with_rel=False leaves out equiv_rel and layer<i>_rel (the
        validation epoch's summary defines those, from its torchmetrics: one key, one definition)."""
        for name in ("loss", "equiv", "equiv_rel", "fidelity", "reg"):
            if name == "equiv_rel" and not with_rel:
                continue
            bar = name == "loss" or (name == "equiv_rel" and prefix == "train")
            self.log(f"{prefix}/{name}", out[name].detach(), prog_bar=bar, **kw)
        for i, value, rel in zip(out["run"], out["layers"], out["layers_rel"]):
            self.log(f"{prefix}/layer{i}", value.detach(), **kw)
            if with_rel:
                self.log(f"{prefix}/layer{i}_rel", rel.detach(), **kw)

    def _log_stats(self, prefix: str, **kw: Any) -> None:
        """Per-layer NP statistics and exact-patch gap, and their means over layers."""
        stats = {i: s for i, s in self.npt.layer_stats().items() if s}
        if not stats:
            return
        for name in next(iter(stats.values())):
            per_layer = {i: s[name] for i, s in stats.items() if name in s}
            for i, value in per_layer.items():
                self.log(f"{prefix}/layer{i}/{name}", value, **kw)
            self.log(f"{prefix}/{name}", torch.stack(list(per_layer.values())).mean(), **kw)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        out = self.losses(x, self.hparams.teacher_forced, self.active_layer())
        self._log_terms("train", out)
        if (self.global_step + 1) % self.hparams.stats_every_n_steps == 0 or self.global_step == 0:
            self._log_stats("stats")
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.npt.clear()

    @torch.no_grad()
    def _eval_batch(self, x: Tensor, y: Tensor, keep_norms: bool = False) -> dict[str, Any]:
        """Free-running losses on (x, y) and the three perplexities' cross-entropies into the metrics;
        keep_norms: also keep this pass's per-token modulation norms for the validation's histogram."""
        out = self.losses(x, teacher_forced=False)  # the deployed condition: NPT layers feed each other
        if keep_norms:
            self._figure_norms = self._recorded_modulation_norms()
        for i, rel in zip(out["run"], out["layers_rel"]):
            self.val_rel[i].update(rel)
        with self.npt.mode("dropped"):
            dropped = self.npt(x)
        v = self.npt.vocab_size
        for kind, logits in zip(PPL_KINDS, (out["teacher"], out["logits"], dropped)):
            ce = F.cross_entropy(logits[..., :v].flatten(0, 1).float(), y.flatten())
            self.val_ce[kind].update(ce, weight=y.numel())
        return out

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # the first batch's modulation norms feed the histogram drawn at the epoch's end
        out = self._eval_batch(x, y, keep_norms=batch_idx == 0)
        # per-rank batch means: the epoch's figure is their mean over ranks, the same on every rank;
        # val/equiv_rel and its per-layer values come from the epoch's torchmetrics (on_validation_epoch_end)
        self._log_terms("val", out, with_rel=False, on_epoch=True, sync_dist=True)
        self._log_stats("val_stats", on_epoch=True, sync_dist=True)
        self.npt.clear()

    def _summary(self) -> dict[str, float]:
        """The accumulated figures (then reset): equiv_rel per layer and mean, ce/ppl per kind, recovered."""
        out: dict[str, float] = {}
        for i, metric in self.val_rel.items():
            out[f"equiv_rel/layer{i}"] = float(metric.compute())
            metric.reset()
        out["equiv_rel"] = sum(out[f"equiv_rel/layer{i}"] for i in self.val_rel) / len(self.val_rel)
        for kind, metric in self.val_ce.items():
            ce = float(metric.compute())
            metric.reset()
            out[f"ce_{kind}"], out[f"ppl_{kind}"] = ce, math.exp(ce)
        out["recovered"] = recovered_fraction(
            out["ppl_attention_dropped"], out["ppl_npt"], out["ppl_original"]
        )  # fmt: skip
        return out

    def on_validation_epoch_end(self) -> None:
        summary = self._summary()  # torchmetrics: reduced across ranks
        figures = {f"val/{name.replace('/', '_')}": value for name, value in summary.items()}
        log_rank_reduced(self, figures, prog_bar=["val/equiv_rel", "val/ppl_npt"])
        if self.trainer.sanity_checking:
            return
        for name, value in summary.items():
            if name.startswith(("ppl_", "equiv_rel", "recovered")):
                self.val_history.setdefault(name, []).append((int(self.global_step), float(value)))
        self._log_figures()

    def _figures(self, norms: dict[int, Tensor] | None) -> dict[str, Any]:
        """{tag: Figure}: equivalence error and perplexities over training, and (given them) the per-token
        modulation norms per layer (npt/figures.py)."""
        if self.global_rank != 0:
            return {}
        figures = history_figures(self.val_history, int(self.global_step))
        if norms is not None:
            figures["modulation_norm"] = modulation_norm_figure(norms, step=int(self.global_step))
        return figures

    def _log_figures(self) -> None:
        """The figures after a validation, logged to TensorBoard under figures/<name>."""
        norms, self._figure_norms = self._figure_norms, None
        figures = self._figures(norms)
        if figures:
            log_figures(self.loggers, figures, int(self.global_step))

    # ------------------------------------------------------------------ analysis and results
    @torch.no_grad()
    def modulation_norms(self, x: Tensor) -> dict[int, Tensor]:
        """Per converted layer, the per-token norm (b, s) of what the attention adds to the MLP input
        projection's output (u ΔW, or the linear kind's shift), free-running on token ids x (b, s)."""
        self.npt.teacher_forward(x)
        try:
            self.npt.student_forward(x, teacher_forced=False)
            return self._recorded_modulation_norms()
        finally:
            self.npt.clear()

    def _recorded_modulation_norms(self) -> dict[int, Tensor]:
        """The per-token modulation norms of the student pass the converted layers last recorded."""
        return {
            i: layer.in_modulation(layer.io["a"], layer.io["u"]).float().norm(dim=-1)
            for i, layer in zip(self.npt.indices, self.npt.npt_layers)
        }

    @torch.no_grad()
    def final_evaluation(self, batches: Any) -> dict[str, float]:
        """The summary over up to ``final_eval_batches`` (x, y) batches, free-running; the first batch's
        modulation norms are kept for the histogram, as at each validation."""
        for metric in (*self.val_ce.values(), *self.val_rel.values()):
            metric.reset()
        for n, batch in enumerate(batches):
            if n >= self.hparams.final_eval_batches:
                break
            x, y = self.trainer.strategy.batch_to_device(batch) if self._trainer is not None else batch
            self._eval_batch(x, y, keep_norms=n == 0)
            self.npt.clear()
        return self._summary()

    def results(self, summary: dict[str, float]) -> dict[str, Any]:
        """The content of npt_results.json from a :meth:`_summary`-style dict."""
        per_layer = {str(i): {"equiv_rel": summary[f"equiv_rel/layer{i}"]} for i in self.npt.indices}
        hp = self.hparams
        return {
            "layers": per_layer,
            "equiv_rel": summary["equiv_rel"],
            **{f"ppl_{kind}": summary[f"ppl_{kind}"] for kind in PPL_KINDS},
            "recovered": summary["recovered"],
            "global_step": int(self.global_step),
            "settings": {
                k: hp[k]
                for k in (
                    "target_path",
                    "layers",
                    "rank",
                    "num_ranks",
                    "np_mode",
                    "modulation",
                    "np_init",
                    "schedule",
                    "steps_per_layer",
                    "teacher_forced",
                    "np_seed",
                    "frozen_dtype",
                )
            },  # fmt: skip
            "converted_layers": list(self.npt.indices),
            "history": {k: [[s, v] for s, v in pts] for k, pts in self.val_history.items()},
        }

    def on_train_end(self) -> None:
        """Write npt_results.json: a fresh free-running evaluation on up to final_eval_batches val batches.

        on_train_end, not on_fit_end: the strategy's teardown, which moves the module to the CPU, runs
        between the two, so on a GPU on_fit_end would meet a CPU module with CUDA batches.

        Every rank evaluates (the same batches: the loader here has no distributed sampler), since the
        metrics' compute and run_dir are collectives under DDP; rank 0 writes the files."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None else self.trainer.val_dataloaders
        if loader is None:
            return
        was_training = self.training
        self.eval()
        try:
            summary = self.final_evaluation(loader)
            norms, self._figure_norms = self._figure_norms, None  # of the first batch just evaluated
            figures = self._figures(norms)
        finally:
            self.train(was_training)
        path = run_dir(self.trainer) / "npt_results.json"
        if self.global_rank != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results(summary), indent=2, allow_nan=True) + "\n")
        save_figures(figures, path.parent / "figures", close=False)  # PNGs beside npt_results.json
        log_figures(self.loggers, figures, int(self.global_step))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        config = configure_optimizer(
            self,
            self.optimizer_factory,
            self.npt.np_named_parameters(),
            hp.warmup_steps,
            hp.min_lr_ratio,
            hp.lr_decay_steps,
        )  # fmt: skip  (NP parameters only: the target stays frozen)
        if hp.schedule == "sequential":  # warmup + cosine restarts for every layer's steps_per_layer
            per = hp.lr_decay_steps or hp.steps_per_layer
            base = warmup_cosine_lambda(min(hp.warmup_steps, per - 1), per, hp.min_lr_ratio)
            optimizer = config["optimizer"]
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: base(step % hp.steps_per_layer)
            )
            config["lr_scheduler"]["scheduler"] = schedule
        return config

    # ------------------------------------------------------------------ checkpoints: NP parameters only
    def _np_keys(self) -> set[str]:
        ids = self._np_ids()
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self._np_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["npt_layers"] = list(self.npt.indices)
        checkpoint["npt_val_history"] = {k: [list(p) for p in v] for k, v in self.val_history.items()}

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
        history = checkpoint.get("npt_val_history", {})
        self.val_history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in history.items()}
        # only NP parameters are saved: the frozen target comes from target_path, so loading stays strict
        checkpoint["state_dict"] = {**self.state_dict(), **state}
