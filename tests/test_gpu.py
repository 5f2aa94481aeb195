"""GPU checks (skipped without CUDA): bf16, DeepSpeed ZeRO 2/3, FSDP and DeepSpeed checkpoint conversion,
all through train.py on the tiny config; SPD (with its toy target) and NPT fitted to the end of fit, their
result files written on the GPU. Run on a GPU machine with: python -m pytest -m gpu tests/test_gpu.py"""

import pytest
import torch

from tests.helpers.cli import FAST, ROOT, TINY, run_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
TRAINER = ROOT / "configs" / "trainer"
GPU_FAST = [*FAST, "--trainer.devices=1", "--trainer.max_steps=8", "--data.init_args.batch_size=8"]


def last_checkpoint(run_dir):
    return sorted((run_dir / "lightning_logs").glob("version_*/checkpoints/last.ckpt"))[-1]


def test_bf16_mixed_fit(tmp_path):
    run_train(tmp_path, "fit", "--config", str(TINY), "--config", str(TRAINER / "gpu_bf16.yaml"), *GPU_FAST)
    assert last_checkpoint(tmp_path).is_file()


@pytest.mark.parametrize("preset", ["deepspeed_stage2.yaml", "deepspeed_stage3.yaml"])
def test_deepspeed_fit_and_fp32_conversion_reloads(tmp_path, preset):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from lightning_modules.gpt import GPTLightningModule

    run_train(tmp_path, "fit", "--config", str(TINY), "--config", str(TRAINER / preset), *GPU_FAST)
    sharded = last_checkpoint(tmp_path)  # a DeepSpeed checkpoint directory
    single = tmp_path / "fp32.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(str(sharded), str(single))
    module = GPTLightningModule.load_from_checkpoint(single, map_location="cpu")
    out = module.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=4, temperature=0)
    assert out.shape == (1, 5)


def test_fsdp_fit(tmp_path):
    run_train(tmp_path, "fit", "--config", str(TINY), "--config", str(TRAINER / "fsdp.yaml"), *GPU_FAST)
    assert last_checkpoint(tmp_path).exists()


def test_compiled_bf16_model_trains_and_checkpoint_loads_uncompiled(tmp_path):
    from lightning_modules.gpt import GPTLightningModule

    run_train(
        tmp_path,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(TRAINER / "gpu_bf16.yaml"),
        *GPU_FAST,
        "--model.init_args.compile=true",
    )
    state = torch.load(last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert not [k for k in state["state_dict"] if "_orig_mod" in k]
    GPTLightningModule.load_from_checkpoint(last_checkpoint(tmp_path), map_location="cpu")


def fit_toy_target_then_spd(tmp_path, accelerator: str = "gpu") -> dict:
    """A TMS 5-2 target, then its decomposition, each to the end of fit on `accelerator`; the decomposition's
    spd_results.json."""
    import json

    from datamodules.sparse_features import SparseFeatureDataModule
    from lightning_modules.spd.module import SPDLightningModule
    from lightning_modules.spd.toy_target import ToyTargetLightningModule
    from tests.helpers.trainers import quiet_trainer

    data = SparseFeatureDataModule(5, 0.05, batch_size=64, steps_per_epoch=50, val_batches=1)
    target_path = tmp_path / "tms.pt"
    target = ToyTargetLightningModule("tms", {"n_features": 5, "n_hidden": 2}, save_path=str(target_path))
    trainer = quiet_trainer(tmp_path / "target", accelerator=accelerator, devices=1, max_steps=20)
    trainer.fit(target, data)
    module = SPDLightningModule(
        target=str(target_path),
        target_module_patterns={"linear1": 6, "linear2": 6},
        objective={"loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 3e-3}},
        evaluation={"figures": "end", "final_eval_batches": 1},
    )
    trainer = quiet_trainer(
        tmp_path / "spd", accelerator=accelerator, devices=1, max_steps=4, val_check_interval=2,
        check_val_every_n_epoch=None, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(module, data)
    return json.loads(next((tmp_path / "spd").rglob("spd_results.json")).read_text())


def test_spd_and_its_toy_target_finish_on_the_gpu(tmp_path):
    """The end-of-fit evaluations run where the module trained: they once ran after Lightning's teardown had
    moved it to the CPU, and every SPD run on a GPU crashed after its last step (seen on an H200)."""
    results = fit_toy_target_then_spd(tmp_path)
    assert set(results["modules"]) == {"linear1", "linear2"}


def test_npt_finishes_on_the_gpu(tmp_path):
    """npt_results.json is written on the GPU too (the same end-of-fit hook as SPD's)."""
    from tests.helpers.npt import npt_trainer, tiny_npt_module, token_loader

    module = tiny_npt_module(final_eval_batches=1)
    trainer = npt_trainer(tmp_path, 2, accelerator="gpu", devices=1, limit_val_batches=1)
    trainer.fit(module, token_loader(16), token_loader(8))
    assert next(tmp_path.rglob("npt_results.json")).is_file()
