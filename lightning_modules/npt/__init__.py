"""NPT: attention output modulates MLP weights (pure PyTorch conversion and layers) and its LightningModule."""

from lightning_modules.npt.components import MODES, NPComponent
from lightning_modules.npt.convert import FAMILIES, NPTModel, convert, load_target, parse_layers
from lightning_modules.npt.layers import NPTLayer

__all__ = [
    "FAMILIES",
    "MODES",
    "NPComponent",
    "NPTLayer",
    "NPTLightningModule",
    "NPTModel",
    "convert",
    "load_target",
    "parse_layers",
]


def __getattr__(name: str):
    # The LightningModule is imported lazily so the pure model stays importable without Lightning.
    if name == "NPTLightningModule":
        from lightning_modules.npt.module import NPTLightningModule

        return NPTLightningModule
    raise AttributeError(name)
