"""One entry point for every method in the collection (LightningCLI, subclass mode).

python train.py fit --config configs/gpt2/tiny.yaml
python train.py fit --config configs/gpt2/d12.yaml --config configs/trainer/gpu_bf16.yaml
python train.py fit --config configs/gpt2/tiny.yaml --print_config
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import ExactResume
from callbacks.checkpoint_io import load_checkpoint_file


def require_strategy_packages(strategy: Any) -> None:
    """Fail before anything is built when a preset needs an optional package that is missing."""
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


def _vocab_size_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "vocab_size", None)


def check_checkpoint_settings(checkpoint: Any) -> None:
    """Reject save_top_k=0 with save_last: Lightning 2.6 then writes last.ckpt only when a top-k checkpoint
    is written, i.e. once at the very end of fit, so a crash loses the whole run."""
    if checkpoint.get("save_top_k", 1) == 0 and checkpoint.get("save_last"):
        raise ValueError(
            f"checkpoint.save_top_k=0 with checkpoint.save_last={checkpoint.get('save_last')!r}: Lightning writes last.ckpt "
            "only alongside a top-k checkpoint, so this run would save once, at the end of fit, and a crash "
            "would lose it. Use save_top_k: 1 (monitor None keeps the newest) with save_last: link (or true)."
        )


class CollectionCLI(LightningCLI):
    """LightningCLI with always-on checkpointing, LR monitoring and RNG state in checkpoints, and the data's
    vocabulary size linked to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Forced callbacks: present in every run, configurable as --checkpoint.*, --lr_monitor.*, --exact_resume.*
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ExactResume, "exact_resume")
        parser.link_arguments(
            "data", "model.init_args.vocab_size", compute_fn=_vocab_size_of, apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        require_strategy_packages(config.get("trainer", {}).get("strategy"))
        check_checkpoint_settings(config.get("checkpoint", {}))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path with a bare torch.load to restore hyper-parameters; read it through
        # our loader first so a truncated or corrupted file is a clear error naming it, not a zip trace.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint_file(ckpt_path, weights_only=True)
        super()._parse_ckpt_path()


def cli_main(args: list[str] | None = None, run: bool = True) -> CollectionCLI:
    """Build (and by default run) the CLI; tests call this in-process with args."""
    return CollectionCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
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


if __name__ == "__main__":
    cli_main()
