"""How many operator calls a function makes, counted below autograd (TorchDispatchMode).

A GPU step of small tensors is bound by launches, not arithmetic: its time follows the number of
kernels it issues. Every ATen operator that does work launches at least one on a GPU, so counting them on
the CPU (same code, same operators) says how launch-bound a step would be without a GPU at hand. Views
(`t`, `view`, `expand`, `detach`, ...) only make new tensor metadata and launch nothing: they are left
out. `_local_scalar_dense` (a tensor's `.item()`) is counted apart: on a GPU it waits for every kernel
queued before it, a synchronisation. Compiled code (torch.compile) runs its kernels outside the
dispatcher and is not seen.

Used by spd_reference_speed.py and by its reference worker (which imports this file by path).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC = "_local_scalar_dense"
MARKERS = ("_record_function_enter", "_record_function_enter_new", "_record_function_exit")


class OpCounter(TorchDispatchMode):
    """Counts each operator call by its overload packet's name (e.g. `mm`, `add_`), views included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.views: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        (self.views if func.is_view else self.calls)[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` once and count its operator calls: {"work": calls that do work (views, profiler markers
    and syncs left out), "syncs": `.item()`-like device-to-host reads, "views": view calls, "by_op": the
    working calls by operator name, most frequent first}."""
    with OpCounter() as counter:
        fn()
    work = {k: v for k, v in counter.calls.items() if k != SYNC and k not in MARKERS}
    return {
        "work": sum(work.values()),
        "syncs": counter.calls.get(SYNC, 0),
        "views": sum(counter.views.values()),
        "by_op": dict(sorted(work.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


if __name__ == "__main__":  # a quick look: python benchmarks/op_count.py
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    print(count_ops(lambda: (a @ b.t()).relu().sum().item()))
