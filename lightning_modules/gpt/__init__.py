"""GPT-2 style language model (pure PyTorch) and its LightningModule."""

from lightning_modules.gpt.config import PRESETS, GPTConfig
from lightning_modules.gpt.model import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "GPTLightningModule"]


def __getattr__(name: str):
    # The LightningModule is imported lazily so the pure model stays importable without Lightning.
    if name == "GPTLightningModule":
        from lightning_modules.gpt.module import GPTLightningModule

        return GPTLightningModule
    raise AttributeError(name)
