"""GPU checks (skipped without CUDA): bf16, DeepSpeed ZeRO 2/3, FSDP and DeepSpeed checkpoint conversion,
all through train.py on the tiny config. Run on a GPU machine with: python -m pytest -m gpu tests/test_gpu.py"""

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
