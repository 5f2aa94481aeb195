"""benchmarks/op_count.py: operator calls that do work, views and syncs apart."""

import torch

from benchmarks.op_count import count_ops


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
