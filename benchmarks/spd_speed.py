"""SPD training-step speed and peak memory: our implementation vs a naive one of the same method.

Ours: `ComponentModel` with forward hooks registered once, cached frozen target weights, the cache-blocked
CI MLP (`ScalarMLPFunction`, CPU), the fused KL from logits with the target's softmax prepared once per
batch, optionally `torch.compile`d CI functions and components. Naive (tests/helpers/spd_naive.py):
hooks registered and removed on every forward, target weights re-read and copied on every use, einsum
everywhere under plain autograd, KL through log_softmax with the target's recomputed every term, no
compile, float32. Both run the same objective (same terms, same order of random draws), so with the same
seed and batch their losses must agree; that is checked before timing.

    python benchmarks/spd_speed.py                       # TMS 5-2 and the tiny LM on CPU (a few minutes)
    python benchmarks/spd_speed.py --device cuda --compile

Each (config, implementation) is timed in its own subprocess (peak memory: growth of the peak RSS over
the RSS before the first step on CPU (VmHWM reset through /proc/self/clear_refs),
torch.cuda.max_memory_allocated on CUDA). Prints a table, writes benchmarks/results/spd_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.proc_memory import proc_status_bytes, reset_peak_rss  # noqa: E402
from benchmarks.results import run_metadata, write_results  # noqa: E402
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


def time_one(name: str, impl: str, device: str, steps: int, warmup: int) -> dict[str, float]:
    """Median step time (forward + backward + AdamW) and peak memory of one implementation."""
    cm, x, loss_type = build(name, device)
    if impl == "naive":
        model: nn.Module = NaiveSPD(cm)
        params = list(model.V.values()) + list(model.U.values()) + list(model.ci_fns.parameters())
        p = 1.0

        def loss_fn() -> Tensor:
            terms = model.losses(x, loss_type, p)
            return sum(COEFFS[k] * v for k, v in terms.items())
    else:
        objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type)
        if impl == "ours_compile":
            for m in [*cm.ci_fns.values(), *cm.components.values()]:
                m.compile()
        params = [*cm.components.parameters(), *cm.ci_fns.parameters()]

        def loss_fn() -> Tensor:
            return objective(cm, x, 0.5).total

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":  # peak growth over the memory held before the first step
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status_bytes("VmHWM") - base
    return {"step_ms": statistics.median(times) * 1e3, "peak_mib": max(0, peak) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
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
    impls = ["naive", "ours"] + (["ours_compile"] if args.compile else [])
    meta = run_metadata()
    results: dict[str, Any] = {
        "device": args.device,
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "configs": {},
    }
    for name in args.configs:
        row: dict[str, Any] = {"loss_rel_diff": check_equal_losses(name, args.device)}
        runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        for _ in range(args.rounds):  # interleaved, so load changes hit every implementation alike
            for impl in impls:
                cmd = [sys.executable, __file__, "--child", name, impl, "--device", args.device]
                cmd += [
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{name}/{impl} failed:\n{out.stderr[-3000:]}")
                runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for impl, rs in runs.items():
            row[impl] = {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"rounds": rs}
        row["speedup"] = row["naive"]["step_ms"] / row["ours"]["step_ms"]
        results["configs"][name] = row
    print(
        f"\nSPD training step on {args.device} ({args.threads} thread(s)): median of {args.steps} steps, "
        f"median over {args.rounds} interleaved rounds"
    )
    print("| config | implementation | step ms | peak MiB | speed-up vs naive |")
    print("|---|---|---:|---:|---:|")
    for name, row in results["configs"].items():
        for impl in impls:
            r = row[impl]
            speed = row["naive"]["step_ms"] / r["step_ms"]
            print(f"| {name} | {impl} | {r['step_ms']:.1f} | {r['peak_mib']:.1f} | {speed:.2f}x |")
        print(f"| {name} | losses equal (max rel. diff) | {max(row['loss_rel_diff'].values()):.1e} | | |")
    write_results(f"spd_speed_{args.device}", meta, results, out=args.out)


if __name__ == "__main__":
    main()
