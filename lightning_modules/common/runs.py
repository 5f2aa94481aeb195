"""Rebuilding pieces of a finished run from its directory (the config.yaml LightningCLI saves there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def datamodule_from_config(config_path: str | Path) -> Any:
    """The run's LightningDataModule from the `data` section of its config.yaml; None when it has none."""
    import lightning.pytorch as pl
    import yaml
    from jsonargparse import ArgumentParser

    data = (yaml.safe_load(Path(config_path).read_text()) or {}).get("data")
    if not data:
        return None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    return parser.instantiate_classes(parser.parse_object({"data": data})).data


def first_val_batches(datamodule: Any, n: int) -> list[Any]:
    """Up to n batches of the datamodule's validation loader (prepare_data and setup run first)."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    batches = []
    for i, batch in enumerate(datamodule.val_dataloader()):
        if i >= n:
            break
        batches.append(batch)
    return batches
