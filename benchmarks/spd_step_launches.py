"""Kernel launches of one whole training step of an SPD recipe, as train.py runs it (Lightning's loop,
the optimizer, logging and the progress bar included), counted on a CPU: how launch-bound the recipe's
step is on a GPU, and what a variant or a setting changes there.

A GPU running a toy recipe at the reference's sizes mostly waits for launches: on the H200 the 2-layer
ResidMLP's step took 33 ms with five runs sharing the GPU, for about 70 GFLOP each, a few ms of arithmetic
(docs/spd.md). Its step time then follows the number of kernels it issues, which a CPU can count:

- eager steps: every operator call that does work (benchmarks/op_count.count_ops, below autograd: the
  forward, the backward, the optimizer's step, logging), and apart from them the device-to-host reads
  (`.item()`: on a GPU each waits for every kernel queued before it);
- compiled steps (a variant with `compile: true`): op_count's estimate, the outermost profiled calls of
  the operators the eager step runs plus each kernel Inductor generates.

The step counted is the fourth (`--at-batch`), after compilation; the target is the recipe's toy model,
freshly initialised (the count does not depend on its training), the batch as small as `--batch-size`
(the count does not depend on it either).

Beside the launches, the memory a step allocates (every tensor its operators or compiled kernels create,
from the profiler's memory events; the same eager graph as a GPU's, compiled code as Inductor generates
it): a GPU must at least write those bytes to its memory, so at the recipe's batch they bound the step
from below by the bandwidth as the launches do by the launch rate. Allocations grow linearly with the
batch (activations) over a fixed part (parameters, optimizer), so they are measured at a few small
batches (`--memory-batches`) and extrapolated to the recipe's (the fit's largest residual recorded): the
recipe's batch itself would not fit a CPU's memory for the 3-layer's eager `mlp` CI functions, whose
(batch, C, 128) tensors the compiled recipe never forms. Writes benchmarks/results/spd_step_launches.json:

    python benchmarks/spd_step_launches.py --suites resid_mlp2 resid_mlp2_compile resid_mlp3 resid_mlp3_compile
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.op_count import (  # noqa: E402
    SYNC,
    OpCounter,
    count_summary,
    enable_compiled_kernel_events,
    launches_in_profile,
)
from benchmarks.results import run_metadata, write_results  # noqa: E402
from benchmarks.spd_toy_suite import (  # noqa: E402
    base_suite,
    config_args,
    config_steps,
    recipe_setting,
)
from lightning_modules.spd import ci_functions  # noqa: E402
from lightning_modules.spd.targets import build_toy_model, save_toy_target  # noqa: E402
from train import cli_main  # noqa: E402

RESULTS_NAME = "spd_step_launches"


class StepOpCounter(OpCounter):
    """OpCounter that leaves out the reads of AdamW's step counters: host tensors on a GPU too (without
    `capturable`), so reading them waits for nothing there."""

    def __init__(self, host_tensors: set[int]) -> None:
        super().__init__()
        self.host_tensors = host_tensors

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ == SYNC and args and id(args[0]) in self.host_tensors:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class StepCount(Callback):
    """Counts one training batch, from on_train_batch_start to on_train_batch_end: its operator calls
    (mode "ops", a dispatch mode) or a CPU profile of it (mode "profile", for compiled code; "memory":
    with the profiler's memory events)."""

    def __init__(self, at_batch: int, mode: str) -> None:
        self.at_batch, self.mode = at_batch, mode
        self._active: Any = None
        self.counter: OpCounter | None = None
        self.profile: profile | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        if i != self.at_batch:
            return
        if self.mode == "ops":
            steps = {
                id(state["step"])
                for optimizer in trainer.optimizers
                for state in optimizer.state.values()
                if "step" in state
            }
            self._active = self.counter = StepOpCounter(steps)
        else:
            memory = self.mode == "memory"
            self._active = self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=memory)
        self._active.__enter__()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._active is not None:
            self._active.__exit__(None, None, None)
            self._active = None


def target_file(suite: str, folder: Path) -> Path:
    """The suite's toy target, freshly initialised from its target config's model_kwargs."""
    config = yaml.safe_load((ROOT / "configs" / "spd" / f"{base_suite(suite)}_target.yaml").read_text())
    init = config["model"]["init_args"]
    model = build_toy_model(init["model_type"], init["model_kwargs"])
    return save_toy_target(
        folder / f"{base_suite(suite)}.pt", model, init["model_type"], init["model_kwargs"]
    )


def count_step(
    suite: str, target: Path, root: Path, mode: str, at_batch: int, batch_size: int, members: int = 1
) -> StepCount:
    """Run the suite's recipe through train.py's CLI for at_batch + 1 steps, counting the last one; with
    members > 1 as a member ensemble of that many seeds (lightning_modules/spd/members.py)."""
    args = [*config_args(suite), "--model.init_args.target", str(target),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(at_batch + 1),
            "--trainer.val_check_interval", str(at_batch + 1),
            "--model.init_args.evaluation.final_eval_batches", "1", "--data.init_args.batch_size", str(batch_size),
            "--model.init_args.faithfulness_warmup.steps", "0", "--model.init_args.evaluation.figures", "off", "--trainer.accelerator", "cpu",
            # AdamW as on a GPU: its foreach form (a CPU's default loops over the tensors)
            "--model.init_args.optimizer.init_args.foreach", "true"]  # fmt: skip
    if members > 1:
        args += ["--model.init_args.member_seeds", json.dumps(list(range(members)))]
    cli = cli_main(args, run=False)
    counter = StepCount(at_batch, mode)
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return counter


def compiles(suite: str) -> bool:
    """Whether the suite's recipe (its last config files over the first) sets compile: true."""
    return bool(recipe_setting(suite, ("model", "init_args", "compile"), False))


def eager_twin(suite: str) -> str:
    """The suite without its compile variant: the base suite."""
    return base_suite(suite)


def measure(
    suite: str, target: Path, folder: Path, at_batch: int, batch_size: int, members: int = 1
) -> dict[str, Any]:
    """{ops, syncs, launches} of one step of the suite's recipe on `target` (target_file's); a compiled
    recipe's launches are op_count's estimate (its eager twin's working operators by name, each Inductor
    kernel), and it has no op count."""
    eager = count_step(
        eager_twin(suite), target, folder / f"{suite}_eager", "ops", at_batch, batch_size, members
    )
    summary = count_summary(eager.counter)
    row: dict[str, Any] = {"compile": compiles(suite), "members": members, "syncs": summary["syncs"]}
    if not row["compile"]:
        return row | {"ops": summary["work"], "launches": summary["work"], "by_op": summary["by_op"]}
    compiled = count_step(
        suite, target, folder / f"{suite}_compiled", "profile", at_batch, batch_size, members
    )
    launches = launches_in_profile(compiled.profile, set(summary["by_op"]))
    return row | {"ops": None, **launches, "eager_launches": summary["work"]}


def allocated_bytes(prof: profile) -> int:
    """Bytes allocated during a profile taken with profile_memory: each event's own allocations (frees
    within an event net out of it, and an event that frees more than it allocates counts zero)."""
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())


def linear_fit(points: dict[int, float]) -> tuple[float, float, float]:
    """(intercept, slope, the largest residual relative to its point) of the least-squares line through
    {x: y}."""
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var
    intercept = mean_y - slope * mean_x
    residual = max(abs(y - (intercept + slope * x)) / abs(y) for x, y in zip(xs, ys))
    return intercept, slope, residual


def recipe_batch(suite: str) -> int:
    """The recipe's data batch_size."""
    return int(recipe_setting(suite, ("data", "init_args", "batch_size")))


def measure_memory(
    suite: str, target: Path, folder: Path, at_batch: int, batch_sizes: list[int], members: int = 1
) -> dict[str, Any]:
    """Bytes one step of the suite's recipe on `target` allocates at each of batch_sizes, and extrapolated
    to the recipe's batch by the least-squares line through them."""
    by_batch = {}
    for batch in batch_sizes:
        root = folder / f"{suite}_memory_b{batch}"
        step = count_step(suite, target, root, "memory", at_batch, batch, members)
        by_batch[batch] = allocated_bytes(step.profile)
    intercept, slope, residual = linear_fit(by_batch)
    batch = recipe_batch(suite)
    return {
        "bytes_by_batch": by_batch,
        "recipe_batch": batch,
        "recipe_steps": config_steps(suite),
        "bytes_at_recipe_batch": round(intercept + slope * batch),
        "fit_max_residual": residual,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", nargs="+", required=True, help="e.g. resid_mlp2 resid_mlp2_compile")
    parser.add_argument("--at-batch", type=int, default=3, help="the step counted (0-based), after compiling")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--members", type=int, nargs="+", default=[1], help="ensemble sizes counted, e.g. 1 5"
    )
    parser.add_argument(
        "--memory-batches",
        type=int,
        nargs="*",
        default=[64, 128, 256],
        help="batches at which a step's allocations are measured, extrapolated to the recipe's (none: off)",
    )
    parser.add_argument("--name", default=RESULTS_NAME)
    args = parser.parse_args()
    meta = run_metadata()  # before the runs: the commit and load they ran at
    torch.set_num_threads(1)
    enable_compiled_kernel_events()  # before anything compiles
    ci_functions.BLOCKED_CPU_PATH = (
        False  # the `mlp` CI functions' graph as a GPU runs it, not the CPU's kernel
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for suite in args.suites:
            target = target_file(suite, Path(tmp))  # one per suite, for every count of it
            for members in args.members:
                key = suite if members == 1 else f"{suite} x{members} members"
                row = measure(suite, target, Path(tmp), args.at_batch, args.batch_size, members)
                results[key] = row
                if len(args.memory_batches) >= 2:
                    row["memory"] = measure_memory(
                        suite, target, Path(tmp), args.at_batch, args.memory_batches, members
                    )
                    gb = row["memory"]["bytes_at_recipe_batch"] / 1e9
                    print(f"{key}: {gb:.2f} GB allocated per step at the recipe's batch", flush=True)
                print(f"{key}: {row['launches']} launches, {row['syncs']} syncs", flush=True)
    write_results(
        args.name, meta, {"at_batch": args.at_batch, "batch_size": args.batch_size, "suites": results}
    )


if __name__ == "__main__":
    main()
