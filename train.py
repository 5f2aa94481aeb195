"""One entry point for every method in the collection (LightningCLI, subclass mode).

python train.py fit --config configs/gpt2/tiny.yaml
python train.py fit --config configs/gpt2/d12.yaml --config configs/trainer/gpu_bf16.yaml
python train.py fit --config configs/gpt2/tiny.yaml --print_config
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def _vocab_size_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "vocab_size", None)


class CollectionCLI(LightningCLI):
    """LightningCLI with always-on checkpointing and LR monitoring, and the data's vocab linked to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Forced callbacks: present in every run and configurable as --checkpoint.* / --lr_monitor.*
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments(
            "data", "model.init_args.vocab_size", compute_fn=_vocab_size_of, apply_on="instantiate"
        )


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
