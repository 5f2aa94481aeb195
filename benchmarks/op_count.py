"""How many operator calls a function makes, counted below autograd (TorchDispatchMode).

A GPU step of small tensors is bound by launches, not arithmetic: its time follows the number of
kernels it issues. Every ATen operator that does work launches at least one on a GPU, so counting them on
the CPU (same code, same operators) says how launch-bound a step would be without a GPU at hand. Views
(`t`, `view`, `expand`, `detach`, ...) only make new tensor metadata and launch nothing: they are left
out. `_local_scalar_dense` (a tensor's `.item()`) is counted apart: on a GPU it waits for every kernel
queued before it, a synchronisation. Compiled code (torch.compile) runs its kernels outside the
dispatcher and is not seen: under a dispatch mode, Dynamo runs the function's Python as it is, eagerly.

`count_launches` counts compiled code too, through the profiler: on a GPU the kernels it records; on a CPU
an estimate of them, the outermost calls of the operators `count_ops` sees working plus each kernel
Inductor generated (its C++ kernels carry profiler events after `enable_compiled_kernel_events()`).
Inductor fuses for a CPU much as for a GPU (the same scheduler, another code generator), so the estimate
says how many launches compile saves; on the eager step it agrees with `count_ops` within 2%.

Used by spd_reference_speed.py and by its reference worker (which imports this file by path).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
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
    return count_summary(counter)


def count_summary(counter: OpCounter) -> dict[str, Any]:
    """count_ops' summary of a finished OpCounter's calls."""
    work = {k: v for k, v in counter.calls.items() if k != SYNC and k not in MARKERS}
    return {
        "work": sum(work.values()),
        "syncs": counter.calls.get(SYNC, 0),
        "views": sum(counter.views.values()),
        "by_op": dict(sorted(work.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def enable_compiled_kernel_events() -> None:
    """Make the C++ kernels Inductor generates from now on record profiler events (count_launches on a
    CPU counts them); set before the first call of a compiled function: the code is generated then."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def count_launches(
    fn: Callable[[], Any], device: str = "cpu", eager: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Kernel launches of one call of `fn`, compiled code included: {"launches", "compiled_kernels" (those
    of compiled code; on a GPU every kernel), "by_op"}. On cuda, the kernels, copies and fills the profiler
    records on the GPU. On a CPU an estimate: fn runs once under the profiler; `eager` (default fn: its
    compiled parts then run eagerly), the same work without compile, runs once under count_ops, which names
    the operators that do work: each outermost profiled call of one of those operators counts one (as
    count_ops counts it), as does each compiled kernel. Give a compiled fn its eager twin: after a call under
    a dispatch mode, Dynamo runs that code eagerly from then on, in every function compiled from it."""
    if device == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
        total = sum(kernels.values())
        return {"launches": total, "compiled_kernels": total, "by_op": dict(kernels.most_common(40))}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    working = set(count_ops(eager or fn)["by_op"])  # after the profiled call: see the docstring
    return launches_in_profile(prof, working)


def launches_in_profile(prof: profile, working: set[str]) -> dict[str, Any]:
    """count_launches' CPU estimate from a finished CPU profile: each outermost profiled call of an operator
    in `working` (the names count_ops gives doing work in the same code run eagerly) counts one, as does
    each kernel Inductor generated (enable_compiled_kernel_events)."""
    counted: Counter[str] = Counter()

    def visit(event: Any) -> None:
        if "cpp_fused" in event.name:  # an Inductor kernel (enable_compiled_kernel_events)
            counted["<compiled>"] += 1
        elif event.name.startswith("aten::") and event.name[6:] in working:
            counted[event.name[6:]] += 1
        else:
            for child in event.cpu_children:
                visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return {
        "launches": sum(counted.values()),
        "compiled_kernels": counted["<compiled>"],
        "by_op": dict(sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


if __name__ == "__main__":  # a quick look: python benchmarks/op_count.py
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    print(count_ops(lambda: (a @ b.t()).relu().sum().item()))
