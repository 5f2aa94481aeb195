"""SPDLightningModule: Stochastic Parameter Decomposition of a frozen target (toy model or GPT).

The target loads lazily in `setup` (configs instantiate without checkpoints). The faithfulness warm-up
(its own AdamW on V, U only) runs in `on_fit_start`, before the first optimizer step, and is skipped when
resuming (a buffer in the checkpoint records it). At the end of fit, `spd_results.json` in the log
directory holds the final value of every metric, from a fresh evaluation on the validation data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from functools import partial
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

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

from . import ci_functions
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
from .members import MemberGenerators, check_member_seeds, load_members, member_model
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
# an eager `mlp` CI step's allocations worth a warning (over 1 ms of a GPU's memory bandwidth)
EAGER_MLP_WARN_BYTES = 4e9


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
        member_seeds: list[int] | None = None,
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
        check_member_seeds(member_seeds)
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
        self._evals: list[tuple[int | None, ComponentModel, EvalAccumulator]] = []  # see _open_eval
        self._total_steps = 1  # set in configure_optimizers: the importance-p schedule's length
        self._compiled = False
        self._eager_cost_checked = False
        self._target_sums: dict[str, float] | None = None  # see _target_fingerprint
        # The stochastic masks come from their own generator, reseeded per (rank, step, micro-batch):
        # drawing them from the global RNG would give every DDP rank the same random numbers (all ranks
        # share seed_everything's seed), and reseeding per step makes a resumed run draw the masks the
        # uninterrupted run would have drawn. torch.initial_seed() is seed_everything's seed.
        self._mask_base_seed = torch.initial_seed()
        self._mask_gen: torch.Generator | None = None
        # member_seeds: one decomposition per seed in one model (members.py), each initialised and drawing
        # its masks as the run with `--seed_everything <seed>` would
        self._member_gens: MemberGenerators | None = None

    # ------------------------------------------------------------------ building
    def build(self) -> ComponentModel:
        """Load the target and wrap it (idempotent); errors name the bad path / pattern / data."""
        if self.cm is not None:
            return self.cm
        hp = self.hparams
        if hp.target is None:
            rank_zero_warn("SPD target is a freshly initialised GPT (random_target): for smoke runs only")

        def load() -> nn.Module:
            target = (
                load_target(hp.target)
                if hp.target is not None
                else random_gpt(hp.random_target, hp.vocab_size)
            )
            check_target_data(target, hp.vocab_size, None, hp.target)
            return target

        target = load()
        self.is_toy = hasattr(target, "n_features")
        cfg = self.component_cfg
        patterns = dict(hp.target_module_patterns)
        head = output_head_name(target)  # fused into the KL losses unless it is decomposed itself
        head = None if head in match_target_modules(target, patterns) else head

        def new_cm(target: nn.Module, members: int | None = None) -> ComponentModel:
            return ComponentModel(
                target, patterns, cfg.ci_fn_type, cfg.ci_fn_hidden_dims, cfg.sigmoid_type,
                output_head=head, members=members,
            )  # fmt: skip

        self._new_cm = partial(new_cm, target)  # a member's one-member copy is built alike (_member_views)
        seeds = hp.get("member_seeds")
        if seeds:
            cm = new_cm(target, len(seeds))
            singles = []
            for seed in seeds:  # each member initialised as its own run (seed_everything(seed)) is: from the
                torch.manual_seed(seed)  # seed, after the same draws (loading a toy target initialises one)
                singles.append(new_cm(load()))
                singles[-1].remove_hooks()
            load_members(cm, singles)
        else:
            cm = new_cm(target)
        for dst, src in (cfg.tied_components or {}).items():
            if dst not in cm.module_to_c or src not in cm.module_to_c:
                raise ValueError(
                    f"tied_components {dst!r} <- {src!r}: both must be decomposed: {cm.module_names}"
                )
            a, b = cm.component(dst), cm.component(src)
            if a.V.shape != b.U.mT.shape or a.U.shape != b.V.mT.shape:
                raise ValueError(
                    f"tied_components {dst!r} <- {src!r}: shapes are not transposes of each other"
                )
        self.cm = cm
        self._tie()
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
        if self.cm.members is not None:
            self.objective.check_members()  # before any step: members run the toy recipes' losses only

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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._eager_cost_checked:
            self._eager_cost_checked = True
            self._warn_eager_scalar_mlps(self._split(batch)[0])

    def _warn_eager_scalar_mlps(self, x: Tensor) -> None:
        """On a GPU without compile, `mlp` CI functions run as autograd's graph, which forms (rows, C, hidden)
        tensors: say what that costs a step when it is over EAGER_MLP_WARN_BYTES, and what avoids it (the
        CPU's eager path is a blocked kernel that does not form them)."""
        cfg = self.component_cfg
        if x.device.type == "cpu" or self.hparams.compile or cfg.ci_fn_type != "mlp":
            return
        rows = x.shape[:-1].numel() if x.is_floating_point() else x.numel()  # examples, or tokens
        cm = self.build()
        cost = ci_functions.eager_scalar_mlp_bytes(
            rows, cm.module_to_c, cfg.ci_fn_hidden_dims, cm.members or 1
        )
        if cost > EAGER_MLP_WARN_BYTES:
            rank_zero_warn(
                f"the `mlp` CI functions run eagerly on {x.device.type}: their graph forms (batch, C, "
                f"{max(cfg.ci_fn_hidden_dims)}) tensors, about {cost / 1e9:.0f} GB of allocations a step at this "
                "batch, bound by the memory's bandwidth; `--model.init_args.compile true` fuses them "
                "(configs/spd/variants/resid_mlp3_compile.yaml, docs/benchmarks.md)"
            )

    @staticmethod
    def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
        """(inputs, labels or None): LM batches are (x, y), toy batches x."""
        return (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = self._split(batch)
        frac = self.global_step / self._total_steps
        out = self.objective(self.cm, x, frac, generator=self.mask_generator(x.device, batch_idx))
        members = self.cm.members or 1  # the total sums the members' totals; the terms are their means
        self.log("train/loss", out.total / members if members > 1 else out.total, prog_bar=True)
        self.log_dict({f"train/loss/{k}": v for k, v in out.terms.items()})
        self.log_dict({f"train/l0_ci_gt_0/{n}": (c > 0).sum(-1).float().mean() for n, c in out.ci.items()})
        self.log("train/importance_p", self.objective.p(frac))
        return out.total

    def mask_generator(self, device: torch.device, batch_idx: int) -> torch.Generator | MemberGenerators:
        """The generator for this micro-batch's masks, seeded from (base seed, rank, step, batch_idx); with
        member_seeds one per member, seeded as that member's own run seeds its (its seed the base seed)."""
        seeds = self.hparams.get("member_seeds")
        if seeds:
            if self._member_gens is None or self._member_gens.device != device:
                self._member_gens = MemberGenerators(torch.Generator(device=device) for _ in seeds)
            for generator, seed in zip(self._member_gens, seeds):
                generator.manual_seed(mixed_seed(seed, self.global_rank, self.global_step, batch_idx))
            return self._member_gens
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
    def _member_views(self) -> list[tuple[int | None, ComponentModel]]:
        """[(None, the model)], or with member_seeds [(seed, a one-member copy of that member)]: fresh
        ComponentModels on the shared target (their hooks to be removed after use, _close_eval), made
        without touching the global RNG, through which the single-run evaluation code runs unchanged."""
        seeds = self.hparams.get("member_seeds")
        if not seeds:
            return [(None, self.cm)]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return [
                (seed, member_model(self.cm, i, self._new_cm()).to(self.device))
                for i, seed in enumerate(seeds)
            ]

    def _open_eval(self) -> None:
        """(seed or None, model, accumulator) for each model an evaluation runs: the model, or every member."""
        self._close_eval()
        threshold = self.eval_cfg.ci_alive_threshold
        self._evals = [
            (seed, cm, EvalAccumulator(cm.module_to_c, threshold)) for seed, cm in self._member_views()
        ]

    def _close_eval(self) -> None:
        for seed, cm, _ in self._evals:
            if seed is not None:
                cm.remove_hooks()
        self._evals = []

    def _eval_step(self, batch: Any) -> None:
        x, y = self._split(batch)
        for _, cm, acc in self._evals:
            metrics, ci = eval_batch(
                cm, x, self.objective.output_loss_type, self.objective.use_delta_component, y,
                l0_threshold=self.eval_cfg.ci_alive_threshold,
            )  # fmt: skip
            acc.update(metrics, ci)

    def on_validation_epoch_start(self) -> None:
        self._open_eval()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        summaries = [(seed, cm, acc, self._summary(cm, acc)[0]) for seed, cm, acc in self._evals]
        if len(summaries) == 1:
            self.log_dict({f"val/{k}": v for k, v in summaries[0][3].items()}, sync_dist=True)
        else:  # every member's, and their mean
            for seed, _, _, metrics in summaries:
                self.log_dict({f"val/member_{seed}/{k}": v for k, v in metrics.items()}, sync_dist=True)
            keys = set.intersection(*(set(m) for *_, m in summaries))
            mean = {k: sum(m[k] for *_, m in summaries) / len(summaries) for k in sorted(keys)}
            self.log_dict({f"val/{k}": v for k, v in mean.items()}, sync_dist=True)
        draw = not self.trainer.sanity_checking and self.global_rank == 0 and self.eval_cfg.figures == "all"
        for seed, cm, acc, metrics in summaries if draw else ():
            figures = self._figures(cm, acc, metrics)
            log_figures(self.loggers, _tagged(figures, seed), self.global_step)
        self._close_eval()

    def _figures(self, cm: ComponentModel, acc: EvalAccumulator, metrics: dict[str, float]) -> dict[str, Any]:
        """{tag: matplotlib Figure} for the evaluation just accumulated (see figures.spd_figures)."""
        seen = acc.n_examples > 0
        hist, density = (acc.hist, acc.density()) if seen else (None, None)
        return spd_figures(cm, hist, density, metrics, self.eval_cfg.ci_alive_threshold, self.global_step)

    def _summary(
        self, cm: ComponentModel, acc: EvalAccumulator
    ) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
        """Accumulated validation means plus, for toys, mmcs / ml2r / identity_ci_error per module."""
        metrics = acc.means()
        mats: dict[str, dict[str, Tensor]] = {}
        if self.is_toy:
            stats, mats = toy_module_report(cm, self.eval_cfg.identity_ci_patterns)
            metrics.update({f"{k}/{name}": v for name, s in stats.items() for k, v in s.items()})
        return metrics, mats

    def on_train_end(self) -> None:
        """Write spd_results.json: a fresh evaluation on up to evaluation.final_eval_batches val batches
        (with member_seeds: each member's in members/seed_<seed>/spd_results.json, and all of them in
        spd_results.json's "members").

        on_train_end, not on_fit_end: the strategy's teardown, which moves the module to the CPU, runs
        between the two, so on a GPU on_fit_end met a CPU module with CUDA batches (seen on an H200)."""
        if self.global_rank != 0:  # no collective below: trainer.log_dir would broadcast and hang under DDP
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        self._open_eval()
        if datamodule is not None:
            for i, batch in enumerate(datamodule.val_dataloader()):
                if i >= self.eval_cfg.final_eval_batches:
                    break
                self._eval_step(self.trainer.strategy.batch_to_device(batch))
        train = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("train/")}
        extra = {"target": self.hparams.target, "global_step": self.global_step, "train": train}
        out = run_dir(self.trainer)
        members = {}
        for seed, cm, acc in self._evals:
            metrics = self._summary(cm, acc)[0] if acc.n_examples else {}
            if datamodule is not None and self.objective.pgd.multibatch_n_batches:
                batches = (
                    self._split(self.trainer.strategy.batch_to_device(b))[0]
                    for b in datamodule.val_dataloader()
                )
                generator = self.mask_generator(self.device, 0)
                if seed is not None:  # this member's own
                    generator = generator[self.hparams.member_seeds.index(seed)]
                metrics.update(pgd_multibatch_metrics(cm, self.objective, batches, generator))
            folder = out if seed is None else out / "members" / f"seed_{seed}"
            member_extra = extra if seed is None else {**extra, "seed": seed}
            members[str(seed)] = write_results(
                folder / "spd_results.json", cm.module_to_c, metrics, member_extra
            )
            if self.eval_cfg.figures != "off":
                figures = self._figures(cm, acc, metrics)
                save_figures(figures, folder / "figures", close=False)  # PNGs beside spd_results.json
                log_figures(self.loggers, _tagged(figures, seed), self.global_step)
        if self._evals and self._evals[0][0] is not None:
            summary = {**extra, "member_seeds": list(self.hparams.member_seeds), "members": members}
            (out / "spd_results.json").write_text(json.dumps(summary, indent=2, default=float))
        self._close_eval()


def _tagged(figures: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """Figures' tags, prefixed with the member's (member_<seed>/...) when there is one."""
    return figures if seed is None else {f"member_{seed}/{tag}": fig for tag, fig in figures.items()}
