"""What the `mlp` CI functions' eager graph costs where it is the graph run (a GPU without compile): the estimate
against the allocations measured, and the warning a run gives before its first step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.spd_step_launches import allocated_bytes
from lightning_modules.spd import ci_functions, module
from lightning_modules.spd.module import SPDLightningModule
from lightning_modules.spd.targets import save_toy_target
from lightning_modules.spd.toy_models import TMSModel


def test_estimate_matches_the_eager_graphs_allocations(monkeypatch):
    """Forward and backward of one module's scalar MLPs (C = 40, hidden 32) on 256 rows, as a GPU runs them
    (autograd's graph, not the CPU's blocked kernel): the estimate within 5% of what the profiler sees.
    Members run side by side as k C scalar MLPs (members.StackedCiFn), so k members cost k times one."""
    monkeypatch.setattr(ci_functions, "BLOCKED_CPU_PATH", False)
    rows, c, h = 256, 40, 32
    g = torch.randn(rows, c, requires_grad=True)
    weights = [torch.randn(c, 1, h, requires_grad=True), torch.randn(c, h, 1, requires_grad=True)]
    biases = [torch.zeros(c, h, requires_grad=True), torch.zeros(c, 1, requires_grad=True)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ci_functions.scalar_mlps(g, weights, biases).sum().backward()
    estimate = ci_functions.eager_scalar_mlp_bytes(rows, {"m": c}, [h])
    assert abs(allocated_bytes(prof) - estimate) <= 0.05 * estimate
    assert ci_functions.eager_scalar_mlp_bytes(rows, {"m": c}, [h], members=3) == 3 * estimate


@pytest.fixture
def tms_module(tmp_path) -> SPDLightningModule:
    target = save_toy_target(tmp_path / "tms.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    return SPDLightningModule(target=str(target), target_module_patterns={"linear1": 8, "linear2": 8})


def test_warns_before_the_first_step_on_a_gpu_without_compile(tms_module, monkeypatch):
    """A batch on another device than the CPU (meta stands in for a GPU) with eager `mlp` CI functions: one
    warning naming the cost and the fix; none on a CPU, with compile, or with another CI function kind."""
    monkeypatch.setattr(module, "EAGER_MLP_WARN_BYTES", 0)
    gpu_batch = torch.empty(4096, 5, device="meta")
    with pytest.warns(UserWarning, match=r"GB of allocations a step.*compile true"):
        tms_module.on_train_batch_start(gpu_batch, 0)
    with pytest.warns(UserWarning):  # would warn again; the hook checks once per run
        tms_module._warn_eager_scalar_mlps(gpu_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tms_module.on_train_batch_start(gpu_batch, 1)  # checked already
        tms_module._warn_eager_scalar_mlps(torch.empty(4096, 5))  # a CPU batch
        tms_module.hparams.compile = True
        tms_module._warn_eager_scalar_mlps(gpu_batch)
        tms_module.hparams.compile = False
        tms_module.component_cfg.ci_fn_type = "shared_mlp"
        tms_module._warn_eager_scalar_mlps(gpu_batch)


def test_no_warning_under_the_threshold(tms_module):
    """TMS 5-2's CI functions are far below a GB a step."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tms_module.on_train_batch_start(torch.empty(4096, 5, device="meta"), 0)
