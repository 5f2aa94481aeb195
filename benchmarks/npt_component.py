"""NP component cost: init time, and forward / forward+backward time and peak memory of four ways to compute
the modulated MLP input projection u (W + ΔW) against the dense u Wᵀ. Medians over interleaved rounds.

    python benchmarks/npt_component.py --device cpu --shape small            # ~1 min on 2 CPU cores
    python benchmarks/npt_component.py --device cuda --shape llama8b         # Llama-3.1-8B layer, k 128, r 64

Variants (all include the dense u Wᵀ, so each row is the cost of the whole modulated projection):
  dense         u Wᵀ only (the original layer)
  loop          per-component Python loop like the reference: for i < k: z_i, v_a_i, v_b_i, (u·v_a_i) v_b_i
  batched       one einsum producing v_a, v_b for all k (b, s, k, d + f), then (u·v_a_i) and the sum over i
  factored      NPComponent.modulated_linear: no ΔW, no v's; O(k·r) extra memory per token
  materialised  explicit per-token ΔW (b, s, d, f); skipped when b·s·d·f·4 bytes > 2 GB

Peak memory is CUDA max_memory_allocated above the pre-call baseline; on CPU only time is reported.
Prints a markdown table and writes benchmarks/results/npt_component_<shape>_<device>.json (or --json).

--sweep times forward+backward only, of loop, batched, factored and materialised, over a grid of (k, r)
at the shape's d, f, batch, seq (time against k·r); writes npt_component_sweep_<device>.json:

    python benchmarks/npt_component.py --device cpu --sweep --threads 1   # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/npt_component.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.results import cpu_model, run_metadata, write_results  # noqa: E402
from benchmarks.timing import sync  # noqa: E402
from lightning_modules.npt.components import NPComponent  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "llama8b": {"d": 4096, "f": 14336, "k": 128, "r": 64, "batch": 2, "seq": 128},
    "small": {"d": 512, "f": 1792, "k": 16, "r": 8, "batch": 2, "seq": 64},
}
MATERIALISE_LIMIT_BYTES = 2 * 1024**3
Variant = Callable[[NPComponent, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dense(comp: NPComponent, a: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u Wᵀ: (b, s, d) -> (b, s, f)."""
    return F.linear(u, w)


def loop(comp: NPComponent, a: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference-style Python loop over components: (b, s, d) -> (b, s, f)."""
    out = F.linear(u, w)
    for i in range(comp.num_ranks):
        z = a @ comp.W_down[i]  # (b, s, r)
        v_a = z @ comp.W_a_up[i]  # (b, s, d)
        v_b = z @ comp.W_b_up[i]  # (b, s, f)
        out = out + (u * v_a).sum(-1, keepdim=True) * v_b
    return out


def batched(comp: NPComponent, a: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """All v_a (b, s, k, d), v_b (b, s, k, f) at once, then Σ_i (u·v_a_i) v_b_i: (b, s, d) -> (b, s, f)."""
    return F.linear(u, w) + comp.modulation_vectors(a, u)


def factored(comp: NPComponent, a: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The NPComponent fast path: (b, s, d) -> (b, s, f)."""
    return comp.modulated_linear(u, a, w)


def materialised(comp: NPComponent, a: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u (Wᵀ + ΔW) through the explicit ΔW (b, s, d, f): (b, s, d) -> (b, s, f)."""
    return F.linear(u, w) + comp.modulation_explicit(a, u)


VARIANTS: dict[str, Variant] = {
    "dense": dense,
    "loop": loop,
    "batched": batched,
    "factored": factored,
    "materialised": materialised,
}


def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """Seconds and (CUDA) peak bytes above the baseline for one call."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return dt, peak


def time_init(
    shape: dict[str, int], device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Median seconds to build an NPComponent at ``shape`` (one vectorised draw per stacked tensor), and
    the reference-style per-component orthogonal (QR) init, extrapolated from ``probe`` components."""

    def ours() -> None:
        NPComponent(shape["d"], shape["f"], shape["r"], shape["k"], seed=0, dtype=dtype, device=device)

    ours()  # warm-up (allocator, generator)
    out = {"vectorised": statistics.median(_measure(ours, device)[0] for _ in range(repeats))}
    probe = min(2, shape["k"])
    gen = torch.Generator(device=device).manual_seed(0)
    meta = NPComponent(shape["d"], shape["f"], shape["r"], shape["k"], device="meta")
    per_component = 0.0
    for p in meta.parameters():  # (k, m, n): one QR per component
        mat = torch.empty(p.shape[1:], dtype=torch.float32, device=device)
        torch.nn.init.orthogonal_(mat, generator=gen)  # warm-up
        per_component += (
            _measure(
                lambda m=mat: [torch.nn.init.orthogonal_(m, generator=gen) for _ in range(probe)], device
            )[0]
            / probe
        )
    out["per_component_orthogonal_est"] = per_component * shape["k"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant and return a JSON-able dict."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    b, s, d, f, k, r = shape["batch"], shape["seq"], shape["d"], shape["f"], shape["k"], shape["r"]
    gen = torch.Generator(device=device).manual_seed(0)
    comp = NPComponent(d, f, rank=r, num_ranks=k, init_scale=1.0, seed=0, dtype=dtype, device=device)
    a = torch.randn(b, s, d, generator=gen, device=device, dtype=dtype)  # attention output
    u = torch.randn(b, s, d, generator=gen, device=device, dtype=dtype)  # MLP input norm2(h)
    w = torch.randn(f, d, generator=gen, device=device, dtype=dtype) / d**0.5  # frozen MLP input weight
    g = torch.randn(b, s, f, generator=gen, device=device, dtype=dtype)  # upstream gradient

    variants = dict(VARIANTS)
    skipped = {}
    if b * s * d * f * 4 > MATERIALISE_LIMIT_BYTES:
        del variants["materialised"]
        skipped["materialised"] = f"b·s·d·f·4 = {b * s * d * f * 4 / 2**30:.1f} GiB > 2 GiB"

    with torch.no_grad():
        ref = factored(comp, a, u, w).float()
        errors = {
            name: ((fn(comp, a, u, w).float() - ref).norm() / ref.norm()).item()
            for name, fn in variants.items()
        }

    def fwd(fn: Variant) -> Callable[[], Any]:
        def call() -> None:
            with torch.no_grad():
                fn(comp, a, u, w)

        return call

    def fwd_bwd(fn: Variant) -> Callable[[], Any]:
        def call() -> None:
            comp.zero_grad(set_to_none=True)
            (fn(comp, a, u, w) * g).sum().backward()

        return call

    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in variants}
    peaks: dict[str, dict[str, float]] = {n: {"fwd": 0.0, "fwd_bwd": 0.0} for n in variants}
    for rnd in range(args.warmup + args.repeats):  # interleaved: every variant once per round
        for name, fn in variants.items():
            for kind, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                if name == "dense" and kind == "fwd_bwd":
                    continue  # nothing to train in the dense layer
                dt, peak = _measure(make(fn), device)
                if rnd >= args.warmup:
                    times[name][kind].append(dt)
                    if peak is not None:
                        peaks[name][kind] = max(peaks[name][kind], peak)
    comp.zero_grad(set_to_none=True)

    init_shapes = {args.shape: shape}
    if not args.skip_big_init and args.shape != "llama8b":
        init_shapes["llama8b"] = SHAPES["llama8b"]
    init = {name: time_init(sh, device, dtype, args.init_repeats) for name, sh in init_shapes.items()}

    results = {}
    for name in variants:
        row: dict[str, Any] = {"rel_err_vs_factored": errors[name]}
        for kind in ("fwd", "fwd_bwd"):
            row[f"{kind}_ms"] = statistics.median(times[name][kind]) * 1e3 if times[name][kind] else None
            row[f"{kind}_peak_mib"] = (
                peaks[name][kind] / 2**20 if device.type == "cuda" and times[name][kind] else None
            )
        results[name] = row
    np_params = sum(p.numel() for p in comp.parameters())
    return {
        "shape": args.shape,
        **shape,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "np_params": np_params,
        "np_param_mib": np_params * comp.W_down.element_size() / 2**20,
        "init_s": init,
        "variants": results,
        "skipped": skipped,
    }


SWEEP_VARIANTS = ("loop", "batched", "factored", "materialised")


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Median forward+backward ms of each SWEEP_VARIANTS form per (k, r) in args.sweep_k x args.sweep_r.

    Every point builds its own component (the inputs are shared); within a point the forms are interleaved
    round by round, so a load change hits all alike. The materialised form is skipped where ΔW would
    exceed 2 GiB.
    """
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    b, s, d, f = shape["batch"], shape["seq"], shape["d"], shape["f"]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(b, s, d, generator=gen, device=device, dtype=dtype)
    u = torch.randn(b, s, d, generator=gen, device=device, dtype=dtype)
    w = torch.randn(f, d, generator=gen, device=device, dtype=dtype) / d**0.5
    g = torch.randn(b, s, f, generator=gen, device=device, dtype=dtype)
    variants = {n: VARIANTS[n] for n in SWEEP_VARIANTS}
    if b * s * d * f * 4 > MATERIALISE_LIMIT_BYTES:
        del variants["materialised"]
    points = []
    for k in args.sweep_k:
        for r in args.sweep_r:
            comp = NPComponent(d, f, rank=r, num_ranks=k, init_scale=1.0, seed=0, dtype=dtype, device=device)

            def fwd_bwd(fn: Variant, comp: NPComponent = comp) -> Callable[[], Any]:
                def call() -> None:
                    comp.zero_grad(set_to_none=True)
                    (fn(comp, a, u, w) * g).sum().backward()

                return call

            times: dict[str, list[float]] = {n: [] for n in variants}
            for rnd in range(args.warmup + args.repeats):
                for name, fn in variants.items():
                    dt, _ = _measure(fwd_bwd(fn), device)
                    if rnd >= args.warmup:
                        times[name].append(dt)
            row = {"k": k, "r": r, "kr": k * r}
            row.update({f"{n}_fwd_bwd_ms": statistics.median(t) * 1e3 for n, t in times.items()})
            points.append(row)
            print(
                " ".join(
                    f"{key} {val:.2f}" if isinstance(val, float) else f"{key} {val}"
                    for key, val in row.items()
                )
            )
    return {
        "shape": args.shape,
        "d": d,
        "f": f,
        "batch": b,
        "seq": s,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "variants": list(variants),
        "points": points,
    }


def to_markdown(res: dict[str, Any]) -> str:
    """Markdown table of one run."""

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    head = (
        f"NP component, shape {res['shape']} (d {res['d']}, f {res['f']}, k {res['k']}, r {res['r']}, "
        f"batch {res['batch']}, seq {res['seq']}), {res['dtype']} on {res['device']} ({res['device_name']}, "
        f"{res['threads']} threads), median of {res['repeats']}; NP params {res['np_param_mib']:.1f} MiB\n\n"
    )
    fac = res["variants"]["factored"]
    lines = [
        "| variant | fwd ms | fwd+bwd ms | fwd vs factored | fwd+bwd vs factored | peak fwd MiB | peak fwd+bwd MiB "
        "| rel err vs factored |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in res["variants"].items():
        ratio_f = row["fwd_ms"] / fac["fwd_ms"]
        ratio_b = None if row["fwd_bwd_ms"] is None else row["fwd_bwd_ms"] / fac["fwd_bwd_ms"]
        lines.append(
            f"| {name} | {fmt(row['fwd_ms'])} | {fmt(row['fwd_bwd_ms'])} | {ratio_f:.2f}x | "
            f"{'-' if ratio_b is None else f'{ratio_b:.2f}x'} | {fmt(row['fwd_peak_mib'], '.0f')} | "
            f"{fmt(row['fwd_bwd_peak_mib'], '.0f')} | {'n/a' if name == 'dense' else format(row['rel_err_vs_factored'], '.1e')} |"
        )
    for name, why in res["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    init = "\n".join(
        f"- init at {name}: vectorised (ours) {t['vectorised'] * 1e3:.0f} ms; per-component orthogonal "
        f"(QR, reference-style) ~{t['per_component_orthogonal_est'] * 1e3:.0f} ms (extrapolated)"
        for name, t in res["init_s"].items()
    )
    return head + "\n".join(lines) + "\n\n" + init


def main() -> None:
    """Parse arguments, run, print the table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: llama8b on cuda, small on cpu"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--init-repeats", type=int, default=3)
    p.add_argument("--skip-big-init", action="store_true", help="don't time init at llama8b shapes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sweep", action="store_true", help="forward+backward over the (k, r) grid below")
    p.add_argument("--sweep-k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="k values of --sweep")
    p.add_argument("--sweep-r", type=int, nargs="+", default=[4, 8, 16], help="r values of --sweep")
    args = p.parse_args()
    if args.shape is None:
        args.shape = "llama8b" if args.device.startswith("cuda") else "small"
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_metadata()
    if args.sweep:
        res = run_sweep(args)
        write_results(f"npt_component_sweep_{args.device.split(':')[0]}", meta, res, out=args.json)
        return
    res = run(args)
    print(to_markdown(res))
    write_results(f"npt_component_{args.shape}_{args.device.split(':')[0]}", meta, res, out=args.json)


if __name__ == "__main__":
    main()
