"""Profile a window of training steps with `torch.profiler` and summarise time per module type.

Why not only Lightning's `PyTorchProfiler`: it profiles named actions for the whole run and, with
`record_module_names`, keeps its module hooks on for every step; we want one bounded window (wait /
warmup / active) with nothing running outside it, plus the optimisation reports' layer-by-layer table
(attention, MLP, norms, embeddings, optimiser, data loading) and peak memory. The traces are written with
torch's own `tensorboard_trace_handler`, so TensorBoard's profiler plugin and Perfetto/Chrome read them.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

from callbacks.paths import run_dir

log = logging.getLogger(__name__)

CATEGORY_PREFIX = "module::"


def module_category(name: str, module: nn.Module) -> str | None:
    """The table row a module's forward time goes to (None = not a leaf we attribute)."""
    kind = type(module).__name__.lower()
    if "attention" in kind:
        return "attention"
    if kind in ("mlp", "swiglu", "feedforward") or kind.endswith("mlp"):
        return "mlp"
    if "norm" in kind:
        return "norms"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if name.endswith("lm_head"):
        return "lm_head"
    return None


class StepWindowProfiler(pl.Callback):
    """Profile training steps [wait + warmup, wait + warmup + active) after `skip_first` steps.

    Writes to `<log_dir>/profiler/`: the trace (`*.pt.trace.json`, for TensorBoard's profiler plugin and
    Perfetto), `summary.json` and `summary.md` (time per module type, optimiser, data loading, backward,
    and peak memory). Forward time per module type comes from `record_function` ranges that exist only
    inside the window.
    """

    def __init__(
        self,
        skip_first: int = 5,
        wait: int = 1,
        warmup: int = 2,
        active: int = 5,
        record_shapes: bool = False,
        profile_memory: bool = True,
        with_stack: bool = False,
        output_dir: str | None = None,
    ) -> None:
        for name, value in dict(skip_first=skip_first, wait=wait, warmup=warmup).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if active < 1:
            raise ValueError(f"active must be >= 1, got {active}")
        self.skip_first, self.wait, self.warmup, self.active = skip_first, wait, warmup, active
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.output_dir = output_dir
        self._profiler: profile | None = None
        self._handles: list[Any] = []
        self._steps_in_window = 0
        self.summary: dict[str, Any] | None = None

    @property
    def window_length(self) -> int:
        return self.wait + self.warmup + self.active

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else run_dir(trainer) / "profiler"

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        idle = self._profiler is None and self.summary is None
        if idle and trainer.global_step >= self.skip_first and trainer.is_global_zero:
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self._out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(out)),
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._attach_module_ranges(pl_module)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._profiler.__enter__()
        self._steps_in_window = 0

    def _attach_module_ranges(self, pl_module: pl.LightningModule) -> None:
        claimed: list[str] = []  # outermost categorised modules; their children are not counted twice
        for name, module in pl_module.named_modules():
            category = module_category(name, module)
            if category is None or any(name.startswith(prefix + ".") for prefix in claimed):
                continue
            claimed.append(name)
            label = f"{CATEGORY_PREFIX}{category}"

            def pre_hook(mod: nn.Module, args: Any, _label: str = label) -> None:
                mod._profile_range = record_function(_label)
                mod._profile_range.__enter__()

            def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
                rng = getattr(mod, "_profile_range", None)
                if rng is not None:
                    rng.__exit__(None, None, None)
                    mod._profile_range = None

            self._handles.append(module.register_forward_pre_hook(pre_hook))
            self._handles.append(module.register_forward_hook(post_hook))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._profiler is None:
            return
        self._profiler.step()
        self._steps_in_window += 1
        if self._steps_in_window >= self.window_length:
            self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profiler is not None:
            self._finish(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _finish(self, trainer: pl.Trainer) -> None:
        self._detach()
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        self.summary = summarise(prof, self.active)
        out = self._out_dir(trainer)
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        (out / "summary.md").write_text(summary_markdown(self.summary))
        log.info("profiler summary written to %s\n%s", out, summary_markdown(self.summary))


def summarise(prof: profile, active_steps: int) -> dict[str, Any]:
    """Per-step milliseconds per category and peak memory, from the profiler's event averages."""
    use_cuda = torch.cuda.is_available()
    totals: dict[str, float] = defaultdict(float)
    step_total = 0.0
    for event in prof.key_averages():
        # device time where there is a device, else CPU wall time (both in microseconds)
        t = (event.device_time_total if use_cuda else event.cpu_time_total) / 1000.0
        key = event.key
        if key.startswith(CATEGORY_PREFIX):
            totals[key.removeprefix(CATEGORY_PREFIX)] += t
        elif key.startswith("Optimizer.step"):
            totals["optimizer"] += t
        elif key.startswith("enumerate(DataLoader)"):
            totals["data_loading"] += t
        elif key.startswith("autograd::engine::evaluate_function") and not use_cuda:
            totals["backward (all modules)"] += event.self_cpu_time_total / 1000.0
        elif key.startswith("ProfilerStep"):
            step_total += event.cpu_time_total / 1000.0
    per_step = {k: v / active_steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    peak = torch.cuda.max_memory_allocated() / 2**20 if use_cuda else _cpu_peak_mb(prof)
    return {
        "active_steps": active_steps,
        "step_ms": step_total / active_steps if step_total else None,
        "ms_per_step": per_step,
        "peak_memory_mb": peak,
        "device": "cuda" if use_cuda else "cpu",
    }


def _cpu_peak_mb(prof: profile) -> float | None:
    usage = [e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0]
    return max(usage) / 2**20 if usage else None


def summary_markdown(summary: dict[str, Any]) -> str:
    step = summary["step_ms"]
    lines = ["| part | ms / step | share of step |", "|---|---|---|"]
    for name, ms in summary["ms_per_step"].items():
        share = f"{100 * ms / step:.1f}%" if step else "n/a"
        lines.append(f"| {name} | {ms:.2f} | {share} |")
    lines.append(f"| whole step | {step:.2f} | 100% |" if step else "| whole step | n/a | |")
    peak = summary["peak_memory_mb"]
    lines.append(f"\npeak memory: {peak:.1f} MiB ({summary['device']})" if peak else "\npeak memory: n/a")
    return "\n".join(lines) + "\n"
