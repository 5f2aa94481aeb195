"""SPD training-step speed and peak memory: our implementation vs a naive one of the same method.

Ours: `ComponentModel` with forward hooks registered once, cached frozen target weights, the cache-blocked
CI MLP (`ScalarMLPFunction`, CPU), masked forwards that start from the clean forward's recorded
activations (a layerwise term of block 3's module skips blocks 0-2) and skip the masked modules' own
target matmuls, the fused KL from logits with the target's softmax prepared once per batch (its gradient
formed in the forward, cache-blocked on CPU), optionally `torch.compile`d CI functions and components.
"ours_no_prefix" is ours without the clean-prefix reuse (`record_clean_prefix=False`: every masked
forward from the embeddings), to show that part. On the language model, ours skips the output head in
the masked forwards and fuses it into the KL (`output_head`, losses.head_kl_loss: block by block, never
the (tokens, vocab) logits); "ours_unfused_head" is ours without that. Naive
(tests/helpers/spd_naive.py): hooks registered and removed on every forward, target weights re-read and copied on every use, einsum everywhere under plain
autograd, KL through log_softmax with the target's recomputed every term, no compile, float32. Both run the same objective (same terms, same order of random draws), so with the same
seed and batch their losses must agree; that is checked before timing.

    python benchmarks/spd_speed.py                       # TMS 5-2 and the tiny LM on CPU (~10 minutes)
    python benchmarks/spd_speed.py --device cuda --compile

Arithmetic: the GFLOP of one step of each implementation (FlopCounterMode: matmuls and attention), and
the rate each runs at (GFLOP / median step time): where ours does nearly the naive form's arithmetic, its
speed-up can only come from running it faster.

Step times: every implementation in one process, alternating step by step (the order rotating), so that
the load of a shared machine hits all alike; medians and quartiles, and the quartiles of the ratio of each
naive step to the ours step next to it. Peak memory: each (config, implementation) alone in its own
subprocess (growth of the peak RSS over the RSS before the first step on CPU (VmHWM reset through
/proc/self/clear_refs), torch.cuda.max_memory_allocated on CUDA). Prints a table, writes
benchmarks/results/spd_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.proc_memory import proc_status_bytes, reset_peak_rss  # noqa: E402
from benchmarks.results import run_metadata, write_results  # noqa: E402
from benchmarks.timing import sync  # noqa: E402
from lightning_modules.spd.objective import SPDObjective  # noqa: E402
from tests.helpers.spd_naive import COEFFS, CONFIGS, NaiveSPD, build  # noqa: E402


def check_equal_losses(name: str, device: str) -> dict[str, float]:
    """Same seed, same batch: every term of ours and the naive implementation must agree."""
    cm, x, loss_type = build(name, device)
    naive = NaiveSPD(cm)
    objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type)
    torch.manual_seed(123)
    ours = objective(cm, x, 0.0).terms
    torch.manual_seed(123)
    theirs = naive.losses(x, loss_type, objective.p(0.0))
    diffs = {}
    for k in COEFFS:
        a, b = ours[k].item(), theirs[k].item()
        diffs[k] = abs(a - b) / max(abs(b), 1e-12)
        if diffs[k] > 1e-4:
            raise AssertionError(f"{name}: loss {k} differs: ours {a} vs naive {b}")
    return diffs


def make_step(name: str, impl: str, device: str, autocast_bf16: bool = False) -> Callable[[], None]:
    """One training step (forward + backward + AdamW) of one implementation on its own model copy; with
    autocast_bf16 the forward (the losses) runs under bfloat16 autocast and the backward and AdamW outside
    it, as Lightning's bf16-mixed precision and the reference's `autocast_bf16` (spd/run_spd.py) do."""
    cm, x, loss_type = build(name, device)
    cm.record_clean_prefix = impl != "ours_no_prefix"
    if impl == "ours_unfused_head":
        cm.output_head = None
    if impl == "naive":
        model: nn.Module = NaiveSPD(cm)
        params = list(model.V.values()) + list(model.U.values()) + list(model.ci_fns.parameters())
        p = 1.0

        def loss_fn() -> Tensor:
            terms = model.losses(x, loss_type, p)
            return sum(COEFFS[k] * v for k, v in terms.items())
    else:
        # ours_launch*: the settings for a launch-bound device (docs/spd.md): all layerwise forwards in one,
        # the delta term from the target's output
        launch = "launch" in impl
        objective = SPDObjective(
            dict(COEFFS), output_loss_type=loss_type, layerwise_batch=len(cm.module_names) if launch else 1,
            delta_from_target_output=launch,
        )  # fmt: skip
        if "compile" in impl:  # as SPDLightningModule's compile
            cm.compile_causal_importances()
            cm.compiled_kl = True
        params = [*cm.components.parameters(), *cm.ci_fns.parameters()]

        def loss_fn() -> Tensor:
            return objective(cm, x, 0.5).total

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def forward_backward() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def step() -> None:
        forward_backward()
        opt.step()
        sync(torch.device(device))

    step.forward_backward = forward_backward  # the loss's forward and backward alone (operator counts)
    return step


def count_gflop(name: str, impl: str, device: str) -> float:
    """Floating-point operations of one training step (torch's FlopCounterMode: matmuls, attention,
    convolutions; elementwise work is not counted), in GFLOP."""
    step = make_step(name, impl, device)
    step()  # the first step creates AdamW's state; count a steady one
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def time_one(name: str, impl: str, device: str, steps: int, warmup: int) -> dict[str, float]:
    """Median step time and peak memory of one implementation alone in this process."""
    step = make_step(name, impl, device)
    if device == "cuda":  # peak growth over the memory held before the first step
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status_bytes("VmHWM") - base
    return {"step_ms": statistics.median(times) * 1e3, "peak_mib": max(0, peak) / 2**20}


def timed(step: Callable[[], None]) -> Callable[[], float]:
    """A step that returns its own wall time in ms."""

    def run() -> float:
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    return run


def interleave(runners: dict[str, Callable[[], float]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Step times (ms, as each runner returns them) of every implementation, one step of each in turn
    (the order rotating), so that changes in the machine's load hit each implementation alike."""
    names = list(runners)
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(runners[name]())
    return times


def time_interleaved(
    name: str, impls: list[str], device: str, steps: int, warmup: int
) -> dict[str, list[float]]:
    """Step times (ms) of every implementation in one process, alternating step by step (interleave)."""
    return interleave({impl: timed(make_step(name, impl, device)) for impl in impls}, steps, warmup)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory_steps", type=int, default=2, help="steps per peak-memory process")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (1: fastest on a shared CPU)"
    )
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(time_one(*args.child, args.device, args.steps, args.warmup)))
        return
    all_impls = ["naive", "ours_no_prefix", "ours_unfused_head", "ours"] + (
        ["ours_compile"] if args.compile else []
    )
    meta = run_metadata()
    results: dict[str, Any] = {
        "device": args.device,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "configs": {},
    }
    for name in args.configs:
        # the unfused head differs from ours only where there is an output head (the language model)
        impls = [i for i in all_impls if i != "ours_unfused_head" or CONFIGS[name]["kind"] == "lm"]
        row: dict[str, Any] = {"loss_rel_diff": check_equal_losses(name, args.device)}
        times = time_interleaved(name, impls, args.device, args.steps, args.warmup)
        for impl in impls:
            cmd = [sys.executable, __file__, "--child", name, impl, "--device", args.device]
            cmd += ["--steps", str(args.memory_steps), "--warmup", "1", "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{name}/{impl} failed:\n{out.stderr[-3000:]}")
            alone = json.loads(out.stdout.strip().splitlines()[-1])
            q25, median, q75 = quartiles(times[impl])
            row[impl] = {"step_ms": median, "q25_ms": q25, "q75_ms": q75, "peak_mib": alone["peak_mib"]}
            row[impl]["gflop"] = count_gflop(name, impl, args.device)
            row[impl]["steps_ms"] = times[impl]
        # the ratio of each naive step to the ours step next to it, so load changes cancel
        paired = [a / b for a, b in zip(times["naive"], times["ours"])]
        row["speedup"] = row["naive"]["step_ms"] / row["ours"]["step_ms"]
        row["paired_speedup_quartiles"] = list(quartiles(paired))
        results["configs"][name] = row
    print(
        f"\nSPD training step on {args.device} ({args.threads} thread(s)): median (25th-75th percentile) "
        f"of {args.steps} steps per implementation, alternating step by step in one process"
    )
    print("| config | implementation | step ms | peak MiB | speed-up vs naive | GFLOP | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, row in results["configs"].items():
        for impl in [i for i in all_impls if i in row]:
            r = row[impl]
            speed = row["naive"]["step_ms"] / r["step_ms"]
            ms = f"{r['step_ms']:.1f} ({r['q25_ms']:.1f}-{r['q75_ms']:.1f})"
            rate = r["gflop"] / r["step_ms"] * 1e3
            print(
                f"| {name} | {impl} | {ms} | {r['peak_mib']:.1f} | {speed:.2f}x | {r['gflop']:.3g} | {rate:.3g} |"
            )
        q = row["paired_speedup_quartiles"]
        print(f"| {name} | paired naive/ours step ratio | {q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f}) | | |")
        print(f"| {name} | losses equal (max rel. diff) | {max(row['loss_rel_diff'].values()):.1e} | | |")
    write_results(f"spd_speed_{args.device}", meta, results, out=args.out)


if __name__ == "__main__":
    main()
