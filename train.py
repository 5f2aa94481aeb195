"""One entry point for every method in the collection (LightningCLI, subclass mode).

python train.py fit --config configs/gpt2/tiny.yaml
python train.py fit --config configs/gpt2/d12.yaml --config configs/trainer/gpu_bf16.yaml
python train.py fit --config configs/gpt2/tiny.yaml --print_config

A user error (bad value, unknown key, missing data, bad checkpoint) ends with a few lines saying what is
wrong and exit status 2; `--debug` (or LMC_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelSummary,
    ProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# The collection's LightningModules and DataModules, imported so that jsonargparse knows them: short class
# names work (--model GPTLightningModule, --model.help SPDLightningModule) and --help lists them.
import datamodules  # noqa: F401
import lightning_modules.gpt.module  # noqa: F401
import lightning_modules.npt.module  # noqa: F401
import lightning_modules.spd.module  # noqa: F401
import lightning_modules.spd.toy_target  # noqa: F401
from callbacks import ExactResume
from callbacks.checkpoint_io import load_checkpoint_file
from callbacks.checkpoints import BestCheckpoint, PeriodicCheckpoint
from callbacks.console import QuietModelSummary, RunReport, StepProgressBar, quiet_lightning_notices
from lightning_modules.common.optim import check_optimizer_strategy
from lightning_modules.common.user_errors import describe_parser_error, run_reporting_user_errors

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ConfigError(ValueError):
    """A command-line / config error, already summarised for the user by describe_parser_error."""


def require_strategy_packages(strategy: Any) -> None:
    """Fail before anything is built when a preset needs an optional package, or CUDA, that is missing."""
    name = (
        strategy
        if isinstance(strategy, str)
        else getattr(strategy, "class_path", None)
        or (strategy.get("class_path") if isinstance(strategy, dict) else None)
    )
    if name and "deepspeed" in str(name).lower() and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f'trainer.strategy={name!r} needs the deepspeed package: pip install -e ".[deepspeed]" '
            "(or choose another preset: ddp, fsdp)"
        )

    sharded = name and any(word in str(name).lower() for word in ("deepspeed", "fsdp"))
    if sharded and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.strategy={name!r} runs on CUDA GPUs only (Lightning's DeepSpeed / FSDP) and none is "
            "visible; on CPU use configs/trainer/ddp_cpu.yaml or cpu.yaml"
        )


def _vocab_size_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "vocab_size", None)


def check_checkpoint_settings(checkpoint: Any) -> None:
    """Reject save_top_k=0 with save_last: Lightning 2.6 then writes last.ckpt only when a top-k checkpoint
    is written, i.e. once at the very end of fit, so a crash loses the whole run. Reject a step / time
    trigger on the monitored checkpoint: it waits for the monitored metric (the next validation)."""
    monitor = checkpoint.get("monitor")
    # step / epoch and training metrics exist at every training step; anything else waits for validation
    waits = bool(monitor) and monitor not in ("step", "epoch") and not str(monitor).startswith("train")
    for key in ("every_n_train_steps", "train_time_interval"):
        if waits and checkpoint.get(key):
            raise ValueError(
                f"checkpoint.{key}={checkpoint.get(key)} with checkpoint.monitor={monitor!r}: this checkpoint "
                f"saves only when {monitor} is computed (at validation). For a checkpoint every N steps or M "
                "minutes use --periodic_checkpoint.every_n_train_steps N / --periodic_checkpoint.every_n_minutes M"
            )
    if checkpoint.get("save_top_k", 1) == 0 and checkpoint.get("save_last"):
        raise ValueError(
            f"checkpoint.save_top_k=0 with checkpoint.save_last={checkpoint.get('save_last')!r}: Lightning writes last.ckpt "
            "only alongside a top-k checkpoint, so this run would save once, at the end of fit, and a crash "
            "would lose it. Use save_top_k: 1 (monitor None keeps the newest) with save_last: link (or true)."
        )


def _has(callbacks: list[Any], kind: type) -> bool:
    return any(isinstance(c, kind) for c in callbacks)


def run_dir_of_checkpoint(ckpt_path: str) -> Path | None:
    """The run directory a checkpoint was written in (`<run>/checkpoints/x.ckpt`, the run holding its
    config.yaml or TensorBoard events), else None."""
    path = Path(ckpt_path)
    run = path.parent.parent
    if path.parent.name != "checkpoints" or not run.is_dir():
        return None
    if (run / "config.yaml").exists() or any(run.glob("events.out.tfevents.*")):
        return run
    return None


def place_logger(config: Any, subcommand: str | None) -> None:
    """Point a TensorBoard, CSV or W&B logger at `trainer.default_root_dir` (as Lightning's own default logger
    does), and a resumed fit at the run directory (W&B: the run) of its checkpoint, so its curves continue there."""
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger")
    class_path = str(logger.get("class_path", "") if hasattr(logger, "get") else "")
    if not class_path.endswith(("TensorBoardLogger", "CSVLogger", "WandbLogger")):
        return
    init = logger.get("init_args")
    root = trainer.get("default_root_dir")
    if root and init.get("save_dir") in (None, "."):
        init["save_dir"] = str(root)
    ckpt_path = config.get("ckpt_path")
    if class_path.endswith("WandbLogger"):
        continue_wandb_run(init, Path(ckpt_path) if subcommand == "fit" and ckpt_path else None)
        return
    run = run_dir_of_checkpoint(ckpt_path) if subcommand == "fit" and ckpt_path else None
    if run is not None and init.get("version") is None:
        init["save_dir"], init["name"], init["version"] = str(run.parent.parent), run.parent.name, run.name


def continue_wandb_run(init: Any, ckpt: Path | None) -> None:
    """Fail early without the wandb package; a fit resumed from a checkpoint Lightning wrote for a W&B run
    (`<save_dir>/<project>/<run id>/checkpoints/`) continues that run, in that save_dir."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            'trainer.logger=WandbLogger needs the wandb package: pip install -e ".[wandb]" (or use '
            "configs/loggers/tensorboard.yaml or csv.yaml)"
        )
    project = init.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
    if ckpt is None or init.get("id") or init.get("version") or len(ckpt.parents) < 4:
        return
    if ckpt.parent.name == "checkpoints" and ckpt.parents[2].name == project:
        init["save_dir"], init["id"] = str(ckpt.parents[3]), ckpt.parents[1].name


def remove_empty_run_dir(trainer: Trainer | None, existed_before: bool) -> None:
    """After a failed start, delete the run directory if this run created it and wrote nothing of value into
    it (only the saved config / hparams / an events file with no data): no empty version_N is left."""
    if trainer is None or existed_before or not trainer.is_global_zero or trainer.logger is None:
        return
    directory = getattr(trainer.logger, "log_dir", None)
    if not directory or not Path(directory).is_dir():
        return
    directory = Path(directory)
    disposable = {"config.yaml", "hparams.yaml"}
    for entry in directory.iterdir():
        small_events = entry.name.startswith("events.out.tfevents.") and entry.stat().st_size < 4096
        if entry.is_dir() or not (entry.name in disposable or small_events):
            return
    shutil.rmtree(directory, ignore_errors=True)


def _model_settings(config: Any, subcommand: str | None) -> dict[str, Any]:
    """The subcommand's model init_args as a flat {dotted key: value} dict."""
    model = config.get(subcommand, {}).get("model") if subcommand else None
    init_args = model.get("init_args") if model is not None else None
    if init_args is None:
        return {}
    tree = init_args.clone().as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(tree, "")
    return flat


def _changed_settings(given: dict[str, Any], kept: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys present in both whose value differs: {key: (given, kept)}. Not counted: a None given (a value the
    model derives when built) and vocabulary sizes (linked from the data at instantiation)."""
    derived = ("vocab_size", "padded_vocab_size")
    return {
        k: (given[k], kept[k])
        for k in given
        if k in kept and given[k] != kept[k] and given[k] is not None and k.rsplit(".", 1)[-1] not in derived
    }


class CollectionCLI(LightningCLI):
    """LightningCLI with always-on checkpointing, LR monitoring, RNG state in checkpoints and a run report,
    the data's vocabulary size linked to the model, short error messages, a step-based progress bar, logs
    under trainer.default_root_dir, and resumed fits that continue in their own run directory."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Forced callbacks: present in every run, configurable as --checkpoint.* (best by validation),
        # --periodic_checkpoint.* (newest, by steps / minutes), --lr_monitor.*, --exact_resume.*, --run_report.*
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ExactResume, "exact_resume")
        parser.add_lightning_class_args(PeriodicCheckpoint, "periodic_checkpoint")
        parser.add_lightning_class_args(RunReport, "run_report")
        parser.link_arguments(
            "data", "model.init_args.vocab_size", compute_fn=_vocab_size_of, apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            words = list(sys.argv[1:] if args is None else args)
            subcommand = next((w for w in words if w in SUBCOMMANDS), None)
            sub = getattr(self, "_subcommand_parsers", {}).get(subcommand, parser)
            options = [o for action in sub._actions for o in action.option_strings]
            raise ConfigError(describe_parser_error(str(err), options)) from err

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", self.config)
        strategy = config.get("trainer", {}).get("strategy")
        model_args = (config.get("model") or {}).get("init_args") or {}
        check_optimizer_strategy(model_args.get("optimizer"), strategy)  # Muon: not under DeepSpeed / FSDP
        require_strategy_packages(strategy)
        check_checkpoint_settings(config.get("checkpoint", {}))
        place_logger(config, subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Our progress bar and model summary replace Lightning's unless the run turns them off (Lightning
        # refuses a progress-bar callback when enable_progress_bar is false).
        trainer_config = self._get(self.config_init, "trainer", default={})
        extra: list[Callback] = []
        given = trainer_config.get("callbacks") or []
        if trainer_config.get("enable_progress_bar") is not False and not _has(given, ProgressBar):
            extra.append(StepProgressBar())
        if trainer_config.get("enable_model_summary") is not False and not _has(given, ModelSummary):
            extra.append(QuietModelSummary())
        if extra:
            kwargs["callbacks"] = [*(trainer_config.get("callbacks") or []), *extra]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path with a bare torch.load to restore hyper-parameters; read it through
        # our loader first so a truncated or corrupted file is a clear error naming it, not a zip trace.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        special = ckpt_path in ("last", "best", "hpc", "registry")
        if ckpt_path and not special and not Path(ckpt_path).is_dir():  # DeepSpeed / FSDP: directories
            load_checkpoint_file(ckpt_path, weights_only=True)
        before = _model_settings(self.config, subcommand)
        super()._parse_ckpt_path()
        # LightningCLI then replaces the model settings with the checkpoint's hyper-parameters without a
        # word, so a resume with a changed --model.* / overlay config would silently run the old ones.
        changed = _changed_settings(before, _model_settings(self.config, subcommand))
        if changed:
            print(
                f"note: --ckpt_path {ckpt_path}: the checkpoint's model hyper-parameters replace "
                f"{len(changed)} setting(s) of the config / command line (a resume continues the "
                "checkpointed run as it was):\n"
                + "\n".join(
                    f"  model.{key}: {given!r} -> {kept!r}" for key, (given, kept) in changed.items()
                ),
                file=sys.stderr,
            )

    def _run_subcommand(self, subcommand: str) -> None:
        log_dir = getattr(self.trainer.logger, "log_dir", None) if self.trainer.logger else None
        existed_before = bool(log_dir) and Path(log_dir).exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_run_dir(self.trainer, existed_before)
            raise


def cli_main(args: list[str] | None = None, run: bool = True) -> CollectionCLI:
    """Build (and by default run) the CLI; tests call this in-process with args."""
    quiet_lightning_notices()
    return CollectionCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Parse errors raise (ArgumentError) instead of printing the whole usage: main() summarises them.
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
            },
            # Atomic checkpoint writes (temporary file + rename); configs/callbacks/async_checkpoint.yaml
            # swaps in the asynchronous variant.
            "plugins": [{"class_path": "callbacks.AtomicCheckpointIO"}],
        },
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def close_process_group() -> None:
    """Destroy the default process group, if this process joined one, while the interpreter is whole.

    Lightning destroys it at exit only for NCCL; a gloo group (configs/trainer/ddp_cpu.yaml) left to the
    interpreter's finalisation can abort the process ("terminate called without an active exception",
    SIGABRT) when a gloo worker thread still holds tensors then, and Lightning's launcher then kills the
    other ranks: a finished run reported as failed (pytorch/pytorch#190489)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> int:
    """Run the CLI on sys.argv; a user error prints a short message (the traceback with --debug)."""
    debug = "--debug" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        ok, _ = run_reporting_user_errors(cli_main, debug)
    finally:
        close_process_group()
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
