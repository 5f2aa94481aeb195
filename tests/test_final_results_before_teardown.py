"""Result files are written while the module is still where it trained.

Lightning's strategy teardown moves the module to the CPU between on_train_end and on_fit_end. On a GPU an
end-of-fit evaluation in on_fit_end therefore met a CPU module with CUDA batches (seen on an H200: every
SPD run would have crashed after its last step). Here the teardown is made to move the module away from
its batches on a CPU too (to float64), so an evaluation after it fails the same way, and each test also
checks that the module's result file existed when the teardown began.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from datamodules.sparse_features import SparseFeatureDataModule
from lightning_modules.spd.module import SPDLightningModule
from lightning_modules.spd.targets import save_toy_target
from lightning_modules.spd.toy_models import TMSModel
from lightning_modules.spd.toy_target import ToyTargetLightningModule
from tests.helpers.npt import npt_trainer, tiny_npt_module, token_loader
from tests.helpers.trainers import quiet_trainer


def move_module_away_at_teardown(trainer: pl.Trainer, root: Path, result_name: str) -> dict[str, Any]:
    """Wrap the trainer's strategy teardown: record whether `result_name` exists under `root` when it
    begins, then turn the module to float64, so anything that evaluates it afterwards with the float32
    batches fails, as a CPU module with CUDA batches does."""
    seen: dict[str, Any] = {}
    original = trainer.strategy.teardown

    def teardown() -> None:
        seen["results_before_teardown"] = sorted(p.name for p in root.rglob(result_name))
        module = trainer.lightning_module
        original()
        module.double()

    trainer.strategy.teardown = teardown  # type: ignore[method-assign]
    return seen


def sparse_data() -> SparseFeatureDataModule:
    return SparseFeatureDataModule(5, 0.05, batch_size=32, steps_per_epoch=50, val_batches=1)


def test_spd_results_are_written_before_the_teardown(tmp_path):
    torch.manual_seed(0)
    target = save_toy_target(tmp_path / "tms.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    module = SPDLightningModule(
        target=str(target),
        target_module_patterns={"linear1": 6, "linear2": 6},
        objective={"loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 3e-3}},
        evaluation={"figures": "off", "final_eval_batches": 1},
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    seen = move_module_away_at_teardown(trainer, tmp_path, "spd_results.json")
    trainer.fit(module, sparse_data())
    assert seen["results_before_teardown"] == ["spd_results.json"]


def test_toy_target_is_checked_and_saved_before_the_teardown(tmp_path):
    module = ToyTargetLightningModule(
        "tms", {"n_features": 5, "n_hidden": 2}, save_path=str(tmp_path / "t.pt")
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    seen = move_module_away_at_teardown(trainer, tmp_path, "target_checks.json")
    trainer.fit(module, sparse_data())
    assert seen["results_before_teardown"] == ["target_checks.json"]
    assert (tmp_path / "t.pt").is_file()


def test_npt_results_are_written_before_the_teardown(tmp_path):
    torch.set_num_threads(1)
    module = tiny_npt_module(final_eval_batches=1)
    trainer = npt_trainer(tmp_path, 2, limit_val_batches=1)
    seen = move_module_away_at_teardown(trainer, tmp_path, "npt_results.json")
    trainer.fit(module, token_loader(16), token_loader(8))
    assert seen["results_before_teardown"] == ["npt_results.json"]
