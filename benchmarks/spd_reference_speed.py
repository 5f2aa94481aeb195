"""SPD's language-model training step: ours against the reference implementation itself (goodfire-ai/spd).

The tiny LM of benchmarks/spd_speed.py (our GPT, 4 layers, 128 wide, vocab 4096, 8 x 64 tokens, 16
decomposed modules, `shared_mlp` CIs; importance minimality + stochastic + layerwise stochastic
reconstruction, KL output loss). The reference runs its own code (`ComponentModel`, `compute_total_loss`,
as in `spd/run_spd.py`) in a worker process (benchmarks/spd_reference_worker.py) under a Python with its
dependencies, on the same target, batch, V / U and CI-function weights; ours, ours + compile, ours with
the settings for a launch-bound device (the layerwise term batched, `layerwise_batch` = all 16 modules,
and `delta_from_target_output`), that + compile, and our naive form (tests/helpers/spd_naive.py) run in
this process. One step each in turn, the order rotating, so a shared machine's load hits all alike;
medians, quartiles, and the quartiles of the ratio of each reference step to the ours step next to it.

Beside the times: each implementation's arithmetic per step (torch's FlopCounterMode: matmuls and
attention, elementwise work not counted), the rate it reaches (GFLOP / median step), and, measured in the
same run, the rate of a float32 matmul alone on this core at the step's largest shape (the output head's,
tokens x width x vocab) and at 1024 x 1024 x 1024: how far each implementation is from what the core's
matmuls can do at all, and so what a given speed-up over the reference would need. And the shared floor
(shared_floor): the target's blocks and the head's matmuls, which both implementations run on the same
target, timed alone and counted per step for each: the reference's step over ours' floor bounds the
speed-up any SPD code could reach on this target. And the operator calls of one step's forward and
backward (benchmarks/op_count.py; views and AdamW left out): on a GPU each launches a kernel, and a step of
tensors this small is bound by those launches rather than by its arithmetic.

Checked before timing: the reference's clean forward gives the target's logits (the same target), and its
importance-minimality term on the same weights equals ours (a deterministic term; the stochastic ones
draw different random masks in the two codes, so their values are only shown).

    python benchmarks/spd_reference_speed.py --reference-path ../spd --reference-python ../spd-venv/bin/python

The reference wants Python 3.13; on 3.11 its worker loads it through a rewriting import hook (see the
worker). A venv for it: torch (the same build), "transformers<5", jaxtyping, einops, "pydantic<2.12",
wandb, python-dotenv, scipy, matplotlib, fire, tqdm. Writes benchmarks/results/spd_reference_speed_cpu.json
(spd_reference_speed_cpu_bf16.json with --precision bf16-mixed; a _b<batch>x<seq> suffix with another
--batch / --seq, e.g. --batch 1 --seq 4 for the overhead-bound regime of a small step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.op_count import count_ops  # noqa: E402
from benchmarks.results import run_metadata, write_results  # noqa: E402
from benchmarks.spd_launch_count import gpu_head_blocks  # noqa: E402
from benchmarks.spd_speed import count_gflop, interleave, make_step, quartiles, timed  # noqa: E402
from benchmarks.timing import sync  # noqa: E402
from lightning_modules.spd.objective import SPDObjective  # noqa: E402
from tests.helpers.spd_naive import COEFFS, CONFIGS, build  # noqa: E402

NAME = "tiny_lm"
IMPLS = ("reference", "naive", "ours", "ours_compile", "ours_launch", "ours_launch_compile")
GPT_CONFIG = {"block_size": 256, "vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_embd": 128}
P = 1.0  # the importance exponent of both (the naive form's)


def save_state(path: Path) -> tuple[dict[str, float], float]:
    """Save what the reference worker rebuilds from (target, batch, V, U, CI weights: those of every
    make_step model, built from the same seed); return our first-step terms and |target logits| sum."""
    cm, x, loss_type = build(NAME, "cpu")
    state: dict[str, Any] = {"target": cm.target_model.state_dict(), "batch": x, "V": {}, "U": {}, "ci": {}}
    for name in cm.module_names:
        state["V"][name] = cm.component(name).V.detach().clone()
        state["U"][name] = cm.component(name).U.detach().clone()
        linears = [m for m in cm.ci_fn(name).modules() if isinstance(m, nn.Linear)]
        state["ci"][name] = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]
    torch.save(state, path)
    objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type, importance_p=P)
    terms = {k: v.item() for k, v in objective(cm, x, 0.0).terms.items()}
    with torch.no_grad():
        out_sum = float(cm(x).abs().sum())
    return terms, out_sum


class ReferenceWorker:
    """The reference's step in its own process: step() returns its wall time in ms."""

    def __init__(
        self,
        python: str,
        reference_path: str,
        state: Path,
        threads: int,
        autocast_bf16: bool = False,
        device: str = "cpu",
    ) -> None:
        cfg = CONFIGS[NAME]
        spec = {"gpt": GPT_CONFIG, "patterns": cfg["patterns"], "ci": cfg["ci"], "hidden": cfg["hidden"],
                "coeffs": COEFFS, "p": P, "loss": "kl", "threads": threads, "autocast_bf16": autocast_bf16,
                "device": device}  # fmt: skip
        cmd = [python, str(ROOT / "benchmarks" / "spd_reference_worker.py"), "--reference-path", reference_path,
               "--state", str(state), "--spec", json.dumps(spec)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.first = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read()["ms"])

    def gflop(self) -> float:
        """One step's matmul / attention GFLOP (FlopCounterMode in the worker)."""
        self.proc.stdin.write("flops\n")
        self.proc.stdin.flush()
        return float(self._read()["gflop"])

    def ops(self) -> dict[str, Any]:
        """The operator calls of one step's forward and backward (benchmarks/op_count.py, in the worker)."""
        self.proc.stdin.write("ops\n")
        self.proc.stdin.flush()
        return self._read()

    def launches(self) -> dict[str, Any]:
        """The kernel launches of one step's forward and backward (op_count.count_launches, in the worker)."""
        self.proc.stdin.write("launches\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def median_ms(fn: Callable[[], None], device: str, repeats: int, warmup: int) -> float:
    """The median wall time (ms) of `fn` alone over `repeats` calls after `warmup`, the device waited for."""

    def call() -> None:
        fn()
        sync(torch.device(device))

    run = timed(call)
    return statistics.median([run() for _ in range(warmup + repeats)][warmup:])


def matmul_gflop_s(m: int, k: int, n: int, device: str = "cpu", repeats: int = 30) -> float:
    """The median rate (GFLOP/s) of a float32 (m, k) @ (k, n) matmul alone on this process's threads (or
    on the GPU)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    return 2 * m * k * n / (median_ms(lambda: a @ b, device, repeats, warmup=3) / 1e3) / 1e9


def shared_floor(device: str, autocast_bf16: bool = False, repeats: int = 40) -> dict[str, Any]:
    """The work both implementations must run, timed alone, and what it adds up to for each: both run our
    GPT, so the target's blocks and the output head's two matmuls per KL term (the logits; their gradient to
    the hidden states) cost them alike. Per step, with n layers and k decomposed modules per layer: the
    clean forward (n blocks, no backward), the all-module stochastic term (n blocks with backward) and one
    layerwise term per module, each a KL through the head (1 + k n head pairs); ours' layerwise forward of
    a module in block l runs blocks l..n-1 (counted whole: k n (n + 1) / 2 blocks), the reference's all n
    (k n^2). Everything else a step takes (components, CI functions, masks, the KL's elementwise passes,
    AdamW, Python) is each implementation's own, so the reference's step over ours' floor bounds the
    speed-up any SPD code on this target could reach."""
    gpt = build(NAME, "cpu")[0].target_model.to(device)
    block = gpt.transformer.h[1]
    tokens = CONFIGS[NAME]["batch"] * CONFIGS[NAME]["seq"]
    x = torch.randn(CONFIGS[NAME]["batch"], CONFIGS[NAME]["seq"], GPT_CONFIG["n_embd"], device=device)
    x.requires_grad_()
    grad = torch.randn_like(x)
    h = torch.randn(tokens, GPT_CONFIG["n_embd"], device=device)
    weight, probs = gpt.lm_head.weight.detach(), torch.randn(tokens, GPT_CONFIG["vocab_size"], device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast_bf16)

    def block_fwd_bwd() -> None:
        with autocast:
            y = block(x)
        y.backward(grad)

    def block_fwd() -> None:
        with torch.no_grad(), autocast:
            block(x)

    def head_pair() -> None:
        with autocast:
            h @ weight.t()
            probs @ weight

    fns = {"block_fwd_bwd": block_fwd_bwd, "block_fwd": block_fwd, "head_pair": head_pair}
    ms = {key: median_ms(fn, device, repeats, warmup=5) for key, fn in fns.items()}
    n, k = GPT_CONFIG["n_layer"], len(CONFIGS[NAME]["patterns"])
    counts = {
        "ours": {"block_fwd_bwd": n + k * n * (n + 1) // 2, "block_fwd": n, "head_pair": 1 + k * n},
        "reference": {"block_fwd_bwd": n + k * n * n, "block_fwd": n, "head_pair": 1 + k * n},
    }
    floor = {impl: sum(c[key] * ms[key] for key in ms) for impl, c in counts.items()}
    return {"ms": ms, "counts": counts, "floor_ms": floor}


def count_ops_gpu_head(autocast_bf16: bool, impl: str = "ours") -> dict[str, Any]:
    """Ours' operator calls on the CPU with the output head in the row blocks a GPU uses (one per KL term
    at this size) instead of the CPU's cache-sized ones: the calls ours would launch on a GPU, counted here."""
    with gpu_head_blocks():
        return count_ops(make_step(NAME, impl, "cpu", autocast_bf16).forward_backward)


def count_launches_apart(impls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """spd_launch_count.py's kernel launches of ours' `impls`, counted in a process of their own."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "spd_launch_count.py"), "--impls", *impls,
           "--device", args.device, "--precision", args.precision, "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_all(
    reference: ReferenceWorker, steps: int, warmup: int, autocast_bf16: bool = False, device: str = "cpu"
) -> dict[str, list[float]]:
    """Step times (ms), one step of each implementation in turn, the order rotating (spd_speed.interleave)."""
    runners = {"reference": reference.step}
    runners |= {impl: timed(make_step(NAME, impl, device, autocast_bf16)) for impl in IMPLS[1:]}
    return interleave(runners, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-path", required=True, help="a checkout of goodfire-ai/spd")
    parser.add_argument(
        "--reference-python", required=True, help="a Python with the reference's dependencies"
    )
    parser.add_argument("--reference-commit", default=None, help="recorded (default: git rev-parse there)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each implementation")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--precision", choices=("32-true", "bf16-mixed"), default="32-true",
        help="bf16-mixed: every implementation's forward under bfloat16 autocast (the reference's default, "
        "`autocast_bf16: true`; ours as Lightning's bf16-mixed); the loss checks stay in float32",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, default=CONFIGS[NAME]["batch"], help="sequences per step (the tiny LM's: 8)"
    )
    parser.add_argument(
        "--seq", type=int, default=CONFIGS[NAME]["seq"], help="tokens per sequence (the tiny LM's: 64)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.seq)
    default_shape = (CONFIGS[NAME]["batch"], CONFIGS[NAME]["seq"])
    # e.g. --batch 1 --seq 4: the arithmetic becomes negligible and the step measures each implementation's
    # per-call overhead (Python, dispatch, autograd), the part of a small step a GPU cannot hide
    CONFIGS[NAME].update(batch=args.batch, seq=args.seq)  # this process's builds (and the state it saves)
    commit = (
        args.reference_commit
        or subprocess.run(
            ["git", "-C", args.reference_path, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    meta = run_metadata()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.pt"
        ours_terms, ours_out = save_state(state)
        bf16 = args.precision == "bf16-mixed"
        reference = ReferenceWorker(
            args.reference_python, args.reference_path, state, args.threads, bf16, args.device
        )
        try:
            times = time_all(reference, args.steps, args.warmup, bf16, args.device)
            gflop = {"reference": reference.gflop()}
            ops = {"reference": reference.ops()}
            reference_launches = reference.launches()
        finally:
            reference.close()
    ref_terms = reference.first["terms"]
    checks = {
        "target_out_rel_diff": rel_diff(reference.first["target_out_abs_sum"], ours_out),
        "importance_minimality": {
            "ours": ours_terms["importance_minimality"],
            "reference": ref_terms["loss/ImportanceMinimalityLoss"],
        },
        "stochastic_recon": {
            "ours": ours_terms["stochastic_recon"],
            "reference": ref_terms["loss/StochasticReconLoss"],
        },
        "stochastic_recon_layerwise": {
            "ours": ours_terms["stochastic_recon_layerwise"],
            "reference": ref_terms["loss/StochasticReconLayerwiseLoss"],
        },
    }
    imp = checks["importance_minimality"]
    imp["rel_diff"] = rel_diff(imp["ours"], imp["reference"])
    if checks["target_out_rel_diff"] > 1e-5 or imp["rel_diff"] > 1e-4:
        raise AssertionError(f"the reference and ours disagree where they must not: {checks}")
    # ours + compile does ours' arithmetic (compiled graphs are not counted by FlopCounterMode)
    gflop |= {impl: count_gflop(NAME, impl, args.device) for impl in ("naive", "ours", "ours_launch")}
    gflop["ours_compile"], gflop["ours_launch_compile"] = gflop["ours"], gflop["ours_launch"]
    # compiled kernels run outside the dispatcher: ours + compile is not counted
    ops |= {
        impl: count_ops(make_step(NAME, impl, args.device, bf16).forward_backward)
        for impl in ("naive", "ours", "ours_launch")
    }
    gpu_head = (
        {impl: count_ops_gpu_head(bf16, impl) for impl in ("ours", "ours_launch")}
        if args.device == "cpu"
        else {}
    )
    # kernel launches, compiled code included (on a CPU an estimate, with the GPU's head blocks)
    launches = {"reference": reference_launches} | count_launches_apart(list(IMPLS[2:]), args)
    tokens = CONFIGS[NAME]["batch"] * CONFIGS[NAME]["seq"]
    matmul = {"head_shape": [tokens, GPT_CONFIG["n_embd"], GPT_CONFIG["vocab_size"]],
              "head_gflop_s": matmul_gflop_s(tokens, GPT_CONFIG["n_embd"], GPT_CONFIG["vocab_size"], args.device),
              "square_1024_gflop_s": matmul_gflop_s(1024, 1024, 1024, args.device)}  # fmt: skip
    floor = shared_floor(args.device, bf16)
    rows: dict[str, Any] = {}
    for impl in IMPLS:
        q25, median, q75 = quartiles(times[impl])
        paired = [r / t for r, t in zip(times["reference"], times[impl])]
        rows[impl] = {"step_ms": median, "q25_ms": q25, "q75_ms": q75, "steps_ms": times[impl],
                      "paired_speedup_quartiles": list(quartiles(paired)), "gflop": gflop[impl],
                      "gflop_s": gflop[impl] / (median / 1e3), "ops": ops.get(impl),
                      "launches": launches.get(impl)}  # fmt: skip
    for impl, counted in gpu_head.items():
        rows[impl]["ops_gpu_head"] = counted
    results = {"config": NAME, "batch": args.batch, "seq": args.seq, "device": args.device,
               "modules": len(CONFIGS[NAME]["patterns"]) * GPT_CONFIG["n_layer"],
               "threads": args.threads, "precision": args.precision,
               "steps": args.steps, "warmup": args.warmup,
               "reference": {"repo": "goodfire-ai/spd", "commit": commit, "python": reference.first.get("python")},
               "checks": checks, "impls": rows, "matmul": matmul, "shared_floor": floor}  # fmt: skip
    print(
        f"\nSPD tiny-LM training step on {args.device} ({args.threads} thread(s), {args.precision}), median of {args.steps} steps each"
    )
    print("| implementation | step ms (25th-75th) | reference / it, paired steps | GFLOP | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for impl, r in rows.items():
        q = r["paired_speedup_quartiles"]
        print(
            f"| {impl} | {r['step_ms']:.0f} ({r['q25_ms']:.0f}-{r['q75_ms']:.0f}) | {q[1]:.2f}x ({q[0]:.2f}-{q[2]:.2f})"
            f" | {r['gflop']:.1f} | {r['gflop_s']:.0f} |"
        )
    print(f"matmul alone: {matmul}")
    print(f"shared floor: {json.dumps(floor)}")
    print(f"checks: {json.dumps(checks)}")
    name = f"spd_reference_speed_{args.device}" + ("_bf16" if bf16 else "")
    name += "" if shape == default_shape else f"_b{args.batch}x{args.seq}"
    write_results(name, meta, results, out=args.out)


if __name__ == "__main__":
    main()
