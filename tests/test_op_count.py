"""benchmarks/op_count.py: operator calls that do work, views and syncs apart."""

import torch

from benchmarks.op_count import count_launches, count_ops


def test_counts_working_calls_views_and_syncs_apart() -> None:
    a, b = torch.randn(4, 3), torch.randn(5, 3)

    def fn() -> float:
        y = (a @ b.t()).relu_()  # t is a view; mm and relu_ do work
        return y.view(-1).sum().item()  # view; sum works; item is a sync

    counts = count_ops(fn)
    assert counts["by_op"] == {"mm": 1, "relu_": 1, "sum": 1}
    assert counts["work"] == 3 and counts["syncs"] == 1 and counts["views"] == 2


def test_counts_the_backward_below_autograd() -> None:
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    forward_only = count_ops(lambda: (x @ w).sum())["work"]
    with_backward = count_ops(lambda: (x @ w).sum().backward())["work"]
    assert with_backward > forward_only  # the backward's kernels (expand's fill, mm for w's gradient, ...)


def test_launches_agree_with_the_calls_on_eager_code() -> None:
    a, b = torch.randn(4, 3), torch.randn(5, 3, requires_grad=True)

    def fn() -> None:
        b.grad = None  # the same work on every call (no gradient accumulation)
        (a @ b.t()).relu().sum().backward()

    assert count_launches(fn)["launches"] == count_ops(fn)["work"]
    assert count_launches(fn)["compiled_kernels"] == 0


def test_launches_count_a_compiled_functions_kernels() -> None:
    x = torch.randn(64)

    def f(t: torch.Tensor) -> torch.Tensor:
        return ((t.sin() + 1).cos() * 2).sum()

    compiled = torch.compile(f, backend="inductor")
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        compiled(x)  # compiles here, with profiler events in its kernels
    eager_calls = count_ops(lambda: f(x))["work"]
    launches = count_launches(lambda: compiled(x), eager=lambda: f(x))
    assert eager_calls == 5
    assert 1 <= launches["compiled_kernels"] == launches["launches"] < eager_calls  # fused: fewer launches
