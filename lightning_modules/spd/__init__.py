"""Stochastic Parameter Decomposition: the pure-PyTorch core and its LightningModules."""

__all__ = ["SPDLightningModule", "ToyTargetLightningModule"]


def __getattr__(name: str):
    # LightningModules are imported lazily so the pure core stays importable without Lightning.
    if name == "SPDLightningModule":
        from lightning_modules.spd.module import SPDLightningModule

        return SPDLightningModule
    if name == "ToyTargetLightningModule":
        from lightning_modules.spd.toy_target import ToyTargetLightningModule

        return ToyTargetLightningModule
    raise AttributeError(name)
