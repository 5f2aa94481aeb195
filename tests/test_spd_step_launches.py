"""benchmarks/spd_step_launches.py's memory measurement: allocations from the profiler, the fit to the recipe's
batch, and the table's memory columns."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import report
from benchmarks.spd_step_launches import allocated_bytes, linear_fit, recipe_batch


def _scalar_mlps(g: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """C scalar MLPs 1 -> H -> 1 as autograd runs them eagerly: (N, C, H) tensors."""
    return (torch.nn.functional.gelu(g.unsqueeze(-1) * w1) * w2).sum(-1)


def test_allocated_bytes_counts_the_tensors_a_step_creates() -> None:
    """The eager scalar MLPs' forward creates three (N, C, H) float32 tensors (the product, GELU, the
    product with w2) and the sum's (N, C): their bytes, within the profiler's small extras."""
    n, c, h = 64, 50, 32
    g, w1, w2 = torch.randn(n, c), torch.randn(c, h), torch.randn(c, h)
    _scalar_mlps(g, w1, w2)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _scalar_mlps(g, w1, w2)
    expected = 3 * n * c * h * 4 + n * c * 4
    assert expected <= allocated_bytes(prof) <= expected * 1.05
    out = torch.empty_like(g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.add(g, g, out=out)  # into a tensor made before: nothing allocated
    assert allocated_bytes(prof) == 0


def test_linear_fit_recovers_a_line_and_reports_the_residual() -> None:
    intercept, slope, residual = linear_fit({64: 100 + 64 * 3, 128: 100 + 128 * 3, 256: 100 + 256 * 3})
    assert (round(intercept, 6), round(slope, 6)) == (100, 3) and residual < 1e-12
    _, _, residual = linear_fit({64: 100.0, 128: 300.0, 256: 500.0})  # not a line
    assert residual > 0.05


def test_recipe_batch_reads_the_recipe_and_its_variant() -> None:
    assert recipe_batch("resid_mlp3") == 2048
    assert recipe_batch("resid_mlp3_compile") == 2048  # the variant keeps its base's batch
    assert recipe_batch("tms_5-2") == 4096


def _payload(memory: dict | None) -> dict:
    row = {"compile": False, "members": 1, "syncs": 1, "ops": 900, "launches": 900}
    if memory is not None:
        row["memory"] = memory
    return {"results": {"at_batch": 3, "batch_size": 64, "suites": {"resid_mlp3": row}}}


def test_table_shows_the_write_time_of_a_step_at_the_gpus_bandwidth() -> None:
    """3.35 GB per step written at 3.35 TB/s: 1 ms, and 50k steps of it 0.8 min."""
    memory = {"bytes_by_batch": {"64": 1, "128": 2}, "recipe_batch": 2048, "recipe_steps": 50_000,
              "bytes_at_recipe_batch": 3_350_000_000, "fit_max_residual": 0.001}  # fmt: skip
    lines = report.render_spd_step_launches(_payload(memory))
    assert "GB allocated per step" in lines[0] and "x the recipe's steps" in lines[0]
    assert lines[2].endswith("| 3.35 | 1.0 ms | 0.8 min |")
    assert "extrapolated" in lines[-1] and "(2048)" in lines[-1]
    without = report.render_spd_step_launches(_payload(None))
    assert "GB allocated" not in without[0] and "extrapolated" not in without[-1]
