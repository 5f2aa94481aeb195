"""SPDLightningModule: Stochastic Parameter Decomposition of a frozen target (toy model or GPT).

The target loads lazily in `setup` (configs instantiate without checkpoints). The faithfulness warm-up
(its own AdamW on V, U only) runs in `on_fit_start`, before the first optimizer step, and is skipped when
resuming (a buffer in the checkpoint records it). At the end of fit, `spd_results.json` in the log
directory holds the final value of every metric, from a fresh evaluation on the validation data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.common.optim import build_optimizer, warmup_cosine_lambda
from lightning_modules.common.paths import run_dir
from lightning_modules.common.seeds import mixed_seed
from lightning_modules.gpt.config import GPTConfig

from .component_model import ComponentModel, tie_component_weights_
from .figures import spd_figures
from .metrics import toy_module_report
from .objective import (
    EvalAccumulator,
    PGDSettings,
    SPDObjective,
    eval_batch,
    faithfulness_warmup,
    write_results,
)
from .targets import check_target_data, load_target, random_gpt

TARGET_PREFIX = "cm.target_model."  # the frozen target's keys in this module's state_dict
TARGET_FINGERPRINT = "spd_target_fingerprint"


def _spd_adamw(params: Any) -> torch.optim.Optimizer:
    """SPD's optimizer: AdamW lr 1e-3, no weight decay."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class SPDLightningModule(pl.LightningModule):
    """Decomposes the target's modules matched by `target_module_patterns` ({fnmatch pattern: C}).

    Args:
        target: a toy target file / checkpoint, a GPT .ckpt, or a local transformers GPT-2 / Llama
            directory; None
            with `random_target` (GPTConfig fields): a freshly initialised GPT, for smoke runs only.
        vocab_size: linked from the data (None for sparse features); must fit the LM target's vocabulary.
        tied_components: {dst: src}: dst's V, U share src's U^T, V^T (TMS's tied linear2 = linear1^T).
        ci_fn_type / ci_fn_hidden_dims / sigmoid_type: causal-importance functions (ci_functions.py).
        sampling: "continuous" or "binomial" masks; n_mask_samples: masks per stochastic term;
            use_delta_component: add r (W_target - V U) in stochastic forwards.
        loss_coeffs: {name: coeff}, names in objective.LOSS_NAMES; importance_p[_end] and
            p_anneal_{start,end}_frac: the importance-minimality exponent schedule (fractions of training).
        output_loss_type: "mse" (toys) or "kl" (LMs). pgd: pgd_recon settings (PGDSettings fields).
        faithfulness_warmup_{steps,lr,weight_decay}: the warm-up of V, U towards the target weights.
        optimizer: OptimizerCallable over components and CI functions (default AdamW lr 1e-3, wd 0);
            warmup_steps, then cosine to lr_final_frac of the peak.
        ci_alive_threshold: alive = CI above this on some validation input.
        identity_ci_patterns: toy modules whose single-feature CIs should be the identity (None: all).
        final_eval_batches: validation batches of the end-of-fit evaluation.
        compile: torch.compile the CI functions and components (in configure_model).
        cpu_threads: torch.set_num_threads on CPU runs (None: leave it); toys run fastest on 1 thread.
    """

    def __init__(
        self,
        target: str | None,
        target_module_patterns: dict[str, int],
        vocab_size: int | None = None,
        random_target: GPTConfig | None = None,
        tied_components: dict[str, str] | None = None,
        ci_fn_type: str = "mlp",
        ci_fn_hidden_dims: list[int] | None = None,
        sigmoid_type: str = "leaky_hard",
        sampling: str = "continuous",
        n_mask_samples: int = 1,
        use_delta_component: bool = True,
        loss_coeffs: dict[str, float] | None = None,
        importance_p: float = 1.0,
        importance_p_end: float | None = None,
        p_anneal_start_frac: float = 1.0,
        p_anneal_end_frac: float = 1.0,
        output_loss_type: str = "mse",
        pgd: PGDSettings | None = None,
        faithfulness_warmup_steps: int = 0,
        faithfulness_warmup_lr: float = 1e-2,
        faithfulness_warmup_weight_decay: float = 0.1,
        optimizer: OptimizerCallable = _spd_adamw,
        warmup_steps: int = 0,
        lr_final_frac: float = 0.0,
        ci_alive_threshold: float = 0.1,
        identity_ci_patterns: list[str] | None = None,
        final_eval_batches: int = 8,
        compile: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if target is None and random_target is None:
            raise ValueError(
                "target is None: give a target path, or random_target (GPTConfig) for smoke runs"
            )
        if not target_module_patterns:
            raise ValueError("target_module_patterns is empty; give {fnmatch pattern: C}")
        for pattern, C in target_module_patterns.items():
            if isinstance(C, bool) or not isinstance(C, int) or C < 1:
                raise ValueError(f"target_module_patterns[{pattern!r}]: C must be an int >= 1, got {C!r}")
        if min(faithfulness_warmup_steps, warmup_steps) < 0 or not 0.0 <= lr_final_frac <= 1.0:
            raise ValueError(
                "need faithfulness_warmup_steps >= 0, warmup_steps >= 0, 0 <= lr_final_frac <= 1"
            )
        pgd = PGDSettings(**pgd) if isinstance(pgd, dict) else pgd or PGDSettings()
        self.hparams["pgd"] = dataclasses.asdict(pgd)  # plain dicts: checkpoints load with weights_only
        if isinstance(random_target, GPTConfig):
            self.hparams["random_target"] = dataclasses.asdict(random_target)
        self.objective = SPDObjective(
            loss_coeffs if loss_coeffs is not None else {"stochastic_recon": 1.0, "importance_minimality": 1e-3},
            sampling, n_mask_samples, output_loss_type, use_delta_component,  # type: ignore[arg-type]
            importance_p, importance_p_end, p_anneal_start_frac, p_anneal_end_frac, pgd,
        )  # fmt: skip
        self.optimizer_factory = optimizer
        self.cm: ComponentModel | None = None
        self.is_toy = False
        self.register_buffer("warmup_done", torch.zeros((), dtype=torch.bool))
        self._acc: EvalAccumulator | None = None
        self._total_steps = 1  # set in configure_optimizers (for the importance-p schedule)
        self._compiled = False
        self._target_sums: dict[str, float] | None = None  # see _target_fingerprint
        # The stochastic masks come from their own generator, reseeded per (rank, step, micro-batch):
        # drawing them from the global RNG would give every DDP rank the same random numbers (all ranks
        # share seed_everything's seed), and reseeding per step makes a resumed run draw the masks the
        # uninterrupted run would have drawn. torch.initial_seed() is seed_everything's seed.
        self._mask_base_seed = torch.initial_seed()
        self._mask_gen: torch.Generator | None = None

    # ------------------------------------------------------------------ building
    def build(self) -> ComponentModel:
        """Load the target and wrap it (idempotent); errors name the bad path / pattern / data."""
        if self.cm is not None:
            return self.cm
        hp = self.hparams
        if hp.target is None:
            rank_zero_warn("SPD target is a freshly initialised GPT (random_target): for smoke runs only")
        target = (
            load_target(hp.target) if hp.target is not None else random_gpt(hp.random_target, hp.vocab_size)
        )
        check_target_data(target, hp.vocab_size, None, hp.target)
        self.is_toy = hasattr(target, "n_features")
        cm = ComponentModel(
            target,
            dict(hp.target_module_patterns),
            hp.ci_fn_type,
            hp.ci_fn_hidden_dims or [16],
            hp.sigmoid_type,
        )
        for dst, src in (hp.tied_components or {}).items():
            if dst not in cm.module_to_c or src not in cm.module_to_c:
                raise ValueError(
                    f"tied_components {dst!r} <- {src!r}: both must be decomposed: {cm.module_names}"
                )
            a, b = cm.component(dst), cm.component(src)
            if a.V.shape != b.U.t().shape or a.U.shape != b.V.t().shape:
                raise ValueError(
                    f"tied_components {dst!r} <- {src!r}: shapes are not transposes of each other"
                )
        self.cm = cm
        self._tie()
        self._acc = EvalAccumulator(cm.module_to_c, hp.ci_alive_threshold)
        return cm

    def _tie(self) -> None:
        for dst, src in (self.hparams.tied_components or {}).items():
            tie_component_weights_(self.cm, src, dst)

    def setup(self, stage: str) -> None:
        if self.hparams.cpu_threads and self.trainer.strategy.root_device.type == "cpu":
            torch.set_num_threads(self.hparams.cpu_threads)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.vocab_size is None and getattr(datamodule, "vocab_size", None) is not None:
            # a transformers tokenizer that first loads in prepare_data: train.py linked None at parse time
            self.hparams.vocab_size = datamodule.vocab_size
        n_features = getattr(datamodule, "n_features", None)
        check_target_data(self.build().target_model, self.hparams.vocab_size, n_features, self.hparams.target)

    def configure_model(self) -> None:
        cm = self.build()
        if self.hparams.compile and not self._compiled:
            for module in [*cm.ci_fns.values(), *cm.components.values()]:
                module.compile()
            self._compiled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen target's tensors out when `target` is a file they reload from (an HF GPT-2
        target would otherwise add its whole size to every checkpoint); keep per-tensor float64 sums
        so loading can check it rebuilt the same target. Random targets (target None) stay in."""
        state = checkpoint.get("state_dict")
        if state is None or self.hparams.target is None:
            return
        checkpoint[TARGET_FINGERPRINT] = self._target_fingerprint()
        for k in [k for k in state if k.startswith(TARGET_PREFIX)]:
            del state[k]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the model; put back the target tensors on_save_checkpoint left out, from `target`."""
        cm = self.build()
        state, fingerprint = checkpoint.get("state_dict"), checkpoint.get(TARGET_FINGERPRINT)
        if state is None or fingerprint is None:
            return
        own = {TARGET_PREFIX + k: v for k, v in cm.target_model.state_dict().items()}
        own_sums = self._target_fingerprint()
        for key, expected in fingerprint.items():
            got = own.get(key)
            if got is None or not math.isclose(own_sums[key], expected, rel_tol=1e-5, abs_tol=1e-5):
                raise ValueError(
                    f"checkpoint was made with another target than {self.hparams.target!r}: tensor {key!r} "
                    f"{'is missing' if got is None else 'differs'}; point --model.init_args.target at the "
                    "target the run decomposed"
                )
            state[key] = got

    def _target_fingerprint(self) -> dict[str, float]:
        """{state_dict key: float64 sum} of the frozen target, computed once (it never changes)."""
        if self._target_sums is None:
            state = self.build().target_model.state_dict()
            self._target_sums = {TARGET_PREFIX + k: float(v.double().sum()) for k, v in state.items()}
        return self._target_sums

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self._tie()  # device moves break `.data` ties
        hp = self.hparams
        if hp.faithfulness_warmup_steps and not bool(self.warmup_done):
            loss = faithfulness_warmup(
                self.cm,
                hp.faithfulness_warmup_steps,
                hp.faithfulness_warmup_lr,
                hp.faithfulness_warmup_weight_decay,
            )
            self.warmup_done.fill_(True)
            for logger in self.loggers:  # self.log is not allowed in on_fit_start
                logger.log_metrics({"train/faithfulness_warmup": loss}, step=0)

    @staticmethod
    def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
        """(inputs, labels or None): LM batches are (x, y), toy batches x."""
        return (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = self._split(batch)
        frac = self.global_step / self._total_steps
        out = self.objective(self.cm, x, frac, generator=self.mask_generator(x.device, batch_idx))
        self.log("train/loss", out.total, prog_bar=True)
        self.log_dict({f"train/loss/{k}": v for k, v in out.terms.items()})
        self.log_dict({f"train/l0/{n}": (c > 0).sum(-1).float().mean() for n, c in out.ci.items()})
        self.log("train/importance_p", self.objective.p(frac))
        return out.total

    def mask_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """The generator for this micro-batch's masks, seeded from (base seed, rank, step, batch_idx)."""
        if self._mask_gen is None or self._mask_gen.device != device:
            self._mask_gen = torch.Generator(device=device)
        self._mask_gen.manual_seed(
            mixed_seed(self._mask_base_seed, self.global_rank, self.global_step, batch_idx)
        )
        return self._mask_gen

    def configure_optimizers(self) -> dict[str, Any]:
        params = [
            p for p in [*self.cm.components.parameters(), *self.cm.ci_fns.parameters()] if p.requires_grad
        ]
        optimizer = build_optimizer(
            self.optimizer_factory, [{"params": params}], on_cuda=self.device.type == "cuda"
        )
        total = self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total - 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine_lambda(warmup, total, self.hparams.lr_final_frac)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any) -> None:
        x, y = self._split(batch)
        metrics, ci = eval_batch(
            self.cm, x, self.hparams.output_loss_type, self.hparams.use_delta_component, y
        )
        self._acc.update(metrics, ci)

    def on_validation_epoch_start(self) -> None:
        self._acc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics, mats = self._summary()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        images = spd_figures(self.cm.module_names, self._acc.hist, self._acc.density(), mats)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                for tag, img in images.items():
                    experiment.add_image(f"figures/{tag}", img, self.global_step, dataformats="CHW")

    def _summary(self) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
        """Accumulated validation means plus, for toys, mmcs / ml2r / identity_ci_error per module."""
        metrics = self._acc.means()
        mats: dict[str, dict[str, Tensor]] = {}
        if self.is_toy:
            stats, mats = toy_module_report(self.cm, self.hparams.identity_ci_patterns)
            metrics.update({f"{k}/{name}": v for name, s in stats.items() for k, v in s.items()})
        return metrics, mats

    def on_fit_end(self) -> None:
        """Evaluate the final weights on up to final_eval_batches validation batches; write spd_results.json."""
        if self.global_rank != 0:  # no collective below: trainer.log_dir would broadcast and hang under DDP
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        self._acc.reset()
        if datamodule is not None:
            for i, batch in enumerate(datamodule.val_dataloader()):
                if i >= self.hparams.final_eval_batches:
                    break
                self._eval_step(self.trainer.strategy.batch_to_device(batch))
        metrics = self._summary()[0] if self._acc.n_examples else {}
        train = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("train/")}
        extra = {"target": self.hparams.target, "global_step": self.global_step, "train": train}
        write_results(run_dir(self.trainer) / "spd_results.json", self.cm.module_to_c, metrics, extra)
