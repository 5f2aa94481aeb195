"""lightning_modules.common.quiet_logging: Lightning's eval-mode warning quiet only for a frozen part in eval."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn

from lightning_modules.common.quiet_logging import expect_frozen_eval_modules


class WithFrozenTarget(pl.LightningModule):
    def __init__(self, extra_eval: bool) -> None:
        super().__init__()
        self.target = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
        self.trained = nn.Linear(2, 2)
        self.other = nn.Dropout(0.1)
        if extra_eval:
            self.other.eval()


def eval_mode_warning(module: pl.LightningModule) -> str:
    """The message Lightning's fit loop gives for this module (the count of its eval-mode modules)."""
    n = sum(1 for m in module.modules() if not m.training)
    return f"Found {n} module(s) in eval mode at the start of training. This may lead to unexpected behavior"


@pytest.mark.parametrize("extra_eval", [False, True], ids=["only_the_frozen_target", "another_module_too"])
def test_eval_mode_warning_is_quiet_only_for_the_frozen_target(extra_eval: bool) -> None:
    module = WithFrozenTarget(extra_eval)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect_frozen_eval_modules(module, module.target)
        warnings.warn(eval_mode_warning(module), PossibleUserWarning, stacklevel=1)
    assert len(caught) == int(extra_eval)  # another module in eval mode: the user still hears of it
