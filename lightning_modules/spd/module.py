"""SPDLightningModule: Stochastic Parameter Decomposition of a frozen target (toy model or GPT).

The target loads lazily in `setup` (configs instantiate without checkpoints). The faithfulness warm-up
(its own AdamW on V, U only) runs in `on_fit_start`, before the first optimizer step, and is skipped when
resuming (a buffer in the checkpoint records it). At the end of fit, `spd_results.json` in the log
directory holds the final value of every metric, from a fresh evaluation on the validation data.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.paths import run_dir
from lightning_modules.common.optim import (
    adamw,
    check_schedule_args,
    configure_optimizer,
    total_training_steps,
)
from lightning_modules.common.plotting import log_figures, save_figures
from lightning_modules.common.quiet_logging import expect_frozen_eval_modules
from lightning_modules.common.seeds import mixed_seed
from lightning_modules.gpt.config import GPTConfig

from .component_model import ComponentModel, match_target_modules, tie_component_weights_
from .config import (
    GROUPS,
    ComponentConfig,
    EvalConfig,
    FaithfulnessWarmupConfig,
    ObjectiveConfig,
    regroup_flat_hparams,
)
from .figures import spd_figures
from .metrics import toy_module_report
from .objective import (
    EvalAccumulator,
    SPDObjective,
    eval_batch,
    faithfulness_warmup,
    write_results,
)
from .pgd import pgd_multibatch_metrics
from .targets import check_target_data, load_target, output_head_name, random_gpt

TARGET_PREFIX = "cm.target_model."  # the frozen target's keys in this module's state_dict
TARGET_FINGERPRINT = "spd_target_fingerprint"


SPD_ADAMW = adamw(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), module=__name__)  # the default optimizer
# the groups' defaults: shared, never modified (each module works on its own copy, see _group)
COMPONENTS, OBJECTIVE, FAITHFULNESS_WARMUP, EVALUATION = (cls() for cls in GROUPS.values())
Group = TypeVar("Group")


def _group(cls: type[Group], value: Any) -> Group:
    """A fresh settings group from an instance or a dict (YAML, checkpoint hyper-parameters); None: defaults."""
    if value is None or isinstance(value, dict):
        return cls(**(value or {}))
    return cls(**vars(value))


class SPDLightningModule(pl.LightningModule):
    """Decomposes the target's modules matched by `target_module_patterns` ({fnmatch pattern: C}).

    Args:
        target: a toy target file / checkpoint, a GPT .ckpt, or a local transformers GPT-2 / Llama
            directory; None with `random_target` (GPTConfig fields): a freshly initialised GPT, for smoke
            runs only.
        vocab_size: linked from the data (None for sparse features); must fit the LM target's vocabulary.
        components: ComponentConfig: CI functions, their sigmoid, tied components.
        objective: ObjectiveConfig: loss coefficients, mask sampling, importance-p schedule, PGD.
        faithfulness_warmup: FaithfulnessWarmupConfig: V, U fitted to the target weights first.
        evaluation: EvalConfig: alive threshold, identity-CI modules, end-of-fit batches.
        optimizer: OptimizerCallable over components and CI functions, one parameter group (default AdamW
            lr 1e-3, wd 0, betas (0.9, 0.999)); warmup_steps, then cosine to min_lr_ratio of the peak at
            lr_decay_steps (None: the end of the run).
        component_weight_decay: the weight decay of the components' V and U alone (None: the optimizer's,
            which also applies to the CI functions). Not in the reference's recipes: with AdamW's
            decoupled decay it shrinks what no loss holds up, such as the input side V of a component
            whose weight V U has gone to ~0 (docs/spd.md, alive detail).
        compile: torch.compile the causal importances, every module's CI function and sigmoids as one
            graph (ComponentModel.compile_causal_importances, in configure_model), and the KL terms'
            per-block passes (losses.compiled_kl_block).
        cpu_threads: torch.set_num_threads on CPU runs (None: leave it); toys run fastest on 1 thread.
        flat: the groups' fields as flat arguments (`ci_fn_type`, `faithfulness_warmup_steps`,
            `lr_final_frac` for min_lr_ratio, ...), as some checkpoints store them: mapped into the groups
            with a DeprecationWarning.
    """

    def __init__(
        self,
        target: str | None,
        target_module_patterns: dict[str, int],
        vocab_size: int | None = None,
        random_target: GPTConfig | None = None,
        components: ComponentConfig = COMPONENTS,
        objective: ObjectiveConfig = OBJECTIVE,
        faithfulness_warmup: FaithfulnessWarmupConfig = FAITHFULNESS_WARMUP,
        evaluation: EvalConfig = EVALUATION,
        optimizer: OptimizerCallable = SPD_ADAMW,
        warmup_steps: int = 0,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        component_weight_decay: float | None = None,
        compile: bool = False,
        cpu_threads: int | None = None,
        **flat: Any,
    ) -> None:
        super().__init__()
        if flat:
            grouped = regroup_flat_hparams(flat)
            message = f"flat arguments {sorted(flat)} are deprecated: give them in the groups {list(GROUPS)}"
            warnings.warn(
                f"SPDLightningModule: {message} (lr_final_frac: min_lr_ratio)", DeprecationWarning, 2
            )
            groups = (components, objective, faithfulness_warmup, evaluation)
            components, objective, faithfulness_warmup, evaluation = (
                grouped.get(k, v) for k, v in zip(GROUPS, groups)
            )
            min_lr_ratio = grouped.get("min_lr_ratio", min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer", *flat])
        if target is None and random_target is None:
            raise ValueError(
                "target is None: give a target path, or random_target (GPTConfig) for smoke runs"
            )
        if not target_module_patterns:
            raise ValueError("target_module_patterns is empty; give {fnmatch pattern: C}")
        for pattern, C in target_module_patterns.items():
            if isinstance(C, bool) or not isinstance(C, int) or C < 1:
                raise ValueError(f"target_module_patterns[{pattern!r}]: C must be an int >= 1, got {C!r}")
        check_schedule_args(warmup_steps, lr_decay_steps, min_lr_ratio)
        if component_weight_decay is not None and not component_weight_decay >= 0:
            raise ValueError(f"component_weight_decay must be >= 0 (or null), got {component_weight_decay!r}")
        self.component_cfg = _group(ComponentConfig, components)
        self.objective = _group(SPDObjective, objective)
        self.warmup_cfg = _group(FaithfulnessWarmupConfig, faithfulness_warmup)
        self.eval_cfg = _group(EvalConfig, evaluation)
        # plain dicts: checkpoints load with torch.load(weights_only=True)
        for name, group in zip(GROUPS, (self.component_cfg, self.objective, self.warmup_cfg, self.eval_cfg)):
            self.hparams[name] = dataclasses.asdict(group)
        if isinstance(random_target, GPTConfig):
            self.hparams["random_target"] = dataclasses.asdict(random_target)
        self.optimizer_factory = optimizer
        self.cm: ComponentModel | None = None
        self.is_toy = False
        self.register_buffer("warmup_done", torch.zeros((), dtype=torch.bool))
        self._acc: EvalAccumulator | None = None
        self._total_steps = 1  # set in configure_optimizers: the importance-p schedule's length
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
        cfg = self.component_cfg
        patterns = dict(hp.target_module_patterns)
        head = output_head_name(target)  # fused into the KL losses unless it is decomposed itself
        cm = ComponentModel(
            target, patterns, cfg.ci_fn_type, cfg.ci_fn_hidden_dims, cfg.sigmoid_type,
            output_head=None if head in match_target_modules(target, patterns) else head,
        )  # fmt: skip
        for dst, src in (cfg.tied_components or {}).items():
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
        self._acc = EvalAccumulator(cm.module_to_c, self.eval_cfg.ci_alive_threshold)
        return cm

    def _tie(self) -> None:
        for dst, src in (self.component_cfg.tied_components or {}).items():
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
            cm.compile_causal_importances()
            cm.compiled_kl = True
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
        expect_frozen_eval_modules(self, self.cm.target_model)
        self._tie()  # device moves break `.data` ties
        cfg = self.warmup_cfg
        if cfg.steps and not bool(self.warmup_done):
            loss = faithfulness_warmup(self.cm, cfg.steps, cfg.lr, cfg.weight_decay)
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
        self.log_dict({f"train/l0_ci_gt_0/{n}": (c > 0).sum(-1).float().mean() for n, c in out.ci.items()})
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
        hp = self.hparams
        self._total_steps = total_training_steps(self.trainer)  # the run's optimizer steps
        named = [
            *(("components." + n, p) for n, p in self.cm.components.named_parameters()),
            *(("ci_fns." + n, p) for n, p in self.cm.ci_fns.named_parameters()),
        ]
        wd = hp.get("component_weight_decay")  # absent from older checkpoints' hyper-parameters
        return configure_optimizer(
            self, self.optimizer_factory, named, hp.warmup_steps, hp.min_lr_ratio, hp.lr_decay_steps,
            decay_groups=False, group_weight_decay=None if wd is None else {"components.": wd},
        )  # fmt: skip

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any) -> None:
        x, y = self._split(batch)
        metrics, ci = eval_batch(
            self.cm, x, self.objective.output_loss_type, self.objective.use_delta_component, y,
            l0_threshold=self.eval_cfg.ci_alive_threshold,
        )  # fmt: skip
        self._acc.update(metrics, ci)

    def on_validation_epoch_start(self) -> None:
        self._acc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._summary()[0]
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        if self.trainer.sanity_checking or self.global_rank != 0 or self.eval_cfg.figures != "all":
            return
        log_figures(self.loggers, self._figures(metrics), self.global_step)

    def _figures(self, metrics: dict[str, float]) -> dict[str, Any]:
        """{tag: matplotlib Figure} for the evaluation just accumulated (see figures.spd_figures)."""
        seen = self._acc.n_examples > 0
        hist, density = (self._acc.hist, self._acc.density()) if seen else (None, None)
        return spd_figures(
            self.cm, hist, density, metrics, self.eval_cfg.ci_alive_threshold, self.global_step
        )

    def _summary(self) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
        """Accumulated validation means plus, for toys, mmcs / ml2r / identity_ci_error per module."""
        metrics = self._acc.means()
        mats: dict[str, dict[str, Tensor]] = {}
        if self.is_toy:
            stats, mats = toy_module_report(self.cm, self.eval_cfg.identity_ci_patterns)
            metrics.update({f"{k}/{name}": v for name, s in stats.items() for k, v in s.items()})
        return metrics, mats

    def on_train_end(self) -> None:
        """Write spd_results.json: a fresh evaluation on up to evaluation.final_eval_batches val batches.

        on_train_end, not on_fit_end: the strategy's teardown, which moves the module to the CPU, runs
        between the two, so on a GPU on_fit_end met a CPU module with CUDA batches (seen on an H200)."""
        if self.global_rank != 0:  # no collective below: trainer.log_dir would broadcast and hang under DDP
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        self._acc.reset()
        if datamodule is not None:
            for i, batch in enumerate(datamodule.val_dataloader()):
                if i >= self.eval_cfg.final_eval_batches:
                    break
                self._eval_step(self.trainer.strategy.batch_to_device(batch))
        metrics = self._summary()[0] if self._acc.n_examples else {}
        if datamodule is not None and self.objective.pgd.multibatch_n_batches:
            batches = (
                self._split(self.trainer.strategy.batch_to_device(b))[0] for b in datamodule.val_dataloader()
            )
            metrics.update(
                pgd_multibatch_metrics(self.cm, self.objective, batches, self.mask_generator(self.device, 0))
            )
        train = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("train/")}
        extra = {"target": self.hparams.target, "global_step": self.global_step, "train": train}
        out = run_dir(self.trainer)
        write_results(out / "spd_results.json", self.cm.module_to_c, metrics, extra)
        if self.eval_cfg.figures == "off":
            return
        figures = self._figures(metrics)
        save_figures(figures, out / "figures", close=False)  # PNGs beside spd_results.json
        log_figures(self.loggers, figures, self.global_step)
