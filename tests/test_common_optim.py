"""The one optimizer + schedule setup every module shares (lightning_modules/common/optim.py)."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.common.optim import adamw, check_schedule_args, configure_optimizer
from lightning_modules.gpt.module import GPT_ADAMW
from lightning_modules.npt.module import NPT_ADAMW
from lightning_modules.spd.module import SPD_ADAMW
from lightning_modules.spd.toy_target import TOY_ADAMW


class _Module(nn.Module):
    """Stands in for a LightningModule: a device and a trainer with estimated_stepping_batches."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.device = torch.device("cpu")
        self.trainer = type("T", (), {"estimated_stepping_batches": steps})()


@pytest.mark.parametrize(
    ("default", "lr", "weight_decay", "betas"),
    [
        (GPT_ADAMW, 6e-4, 0.1, (0.9, 0.95)),
        (NPT_ADAMW, 3e-4, 0.01, (0.9, 0.95)),
        (SPD_ADAMW, 1e-3, 0.0, (0.9, 0.999)),
        (TOY_ADAMW, 5e-3, 0.01, (0.9, 0.999)),
    ],
)
def test_each_default_optimizer_prints_as_a_path_and_reads_back(default, lr, weight_decay, betas):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--optimizer", type=OptimizerCallable, default=default)
    printed = parser.dump(parser.parse_args([]))
    path = printed.split(":", 1)[1].strip()
    assert path.endswith("_ADAMW"), printed  # an import path, not "Unable to serialize"
    factory = parser.parse_args([f"--optimizer={path}"]).optimizer
    optimizer = factory([nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == lr and optimizer.defaults["weight_decay"] == weight_decay
    assert tuple(optimizer.defaults["betas"]) == betas


def test_decay_groups_spare_biases_and_norms_and_one_group_otherwise():
    module = _Module(steps=10)
    out = configure_optimizer(module, adamw(1e-3, 0.1), module.named_parameters(), 2, 0.1)
    decay, no_decay = out["optimizer"].param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    single = configure_optimizer(
        module, adamw(1e-3, 0.1), module.named_parameters(), 2, 0.1, decay_groups=False
    )
    assert len(single["optimizer"].param_groups) == 1 and single["lr_scheduler"]["interval"] == "step"


def test_group_weight_decay_gives_each_prefix_its_own_decay_and_the_rest_the_optimizers():
    module = _Module(steps=10)
    named = list(module.named_parameters())
    out = configure_optimizer(
        module, adamw(1e-3, 0.1), named, 2, 0.1, decay_groups=False, group_weight_decay={"linear.": 0.5}
    )
    linear, rest = out["optimizer"].param_groups
    assert linear["weight_decay"] == 0.5 and rest["weight_decay"] == 0.1  # the optimizer's
    assert linear["params"] == [module.linear.weight, module.linear.bias]
    assert rest["params"] == [module.norm.weight, module.norm.bias]
    with pytest.raises(ValueError, match="group_weight_decay needs decay_groups=False"):
        configure_optimizer(module, adamw(1e-3, 0.1), named, 2, 0.1, group_weight_decay={"linear.": 0.5})


def test_schedule_warms_up_then_decays_to_the_floor_over_the_run_or_lr_decay_steps():
    module = _Module(steps=20)
    out = configure_optimizer(module, adamw(1.0, 0.0), module.named_parameters(), 4, 0.1)
    schedule = out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(22):
        lrs.append(schedule.get_last_lr()[0])
        out["optimizer"].step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[20] == pytest.approx(0.1) and min(lrs) == pytest.approx(0.1)
    short = configure_optimizer(module, adamw(1.0, 0.0), module.named_parameters(), 0, 0.0, lr_decay_steps=5)
    sched = short["lr_scheduler"]["scheduler"]
    for _ in range(5):
        short["optimizer"].step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0)  # lr_decay_steps, not the run's 20 steps


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1, None, 0.1), "warmup_steps"), ((0, 0, 0.1), "lr_decay_steps"), ((0, None, 1.5), "min_lr_ratio")],
)
def test_bad_schedule_arguments_name_themselves(args, match):
    with pytest.raises(ValueError, match=match):
        check_schedule_args(*args)


def test_fused_is_requested_on_cuda_through_a_cli_made_factory():
    from functools import partial

    from lightning_modules.common.optim import build_optimizer

    seen = {}

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, lr=1e-3, fused=None, **kw):
            seen["fused"] = fused
            super().__init__(params, lr=lr, **kw)

    def instantiate(cls, *args, **kwargs):  # the shape of jsonargparse's OptimizerCallable partial
        return cls(*args, **kwargs)

    params = [nn.Parameter(torch.zeros(2))]
    build_optimizer(partial(instantiate, SpyAdamW, lr=0.1, fused=None), [{"params": params}], on_cuda=True)
    assert seen["fused"] is True
    build_optimizer(partial(instantiate, SpyAdamW, lr=0.1, fused=False), [{"params": params}], on_cuda=True)
    assert seen["fused"] is False  # the user's explicit choice stays
    build_optimizer(partial(instantiate, SpyAdamW, lr=0.1, fused=None), [{"params": params}], on_cuda=False)
    assert seen["fused"] is None
