"""NPT on the trained tiny GPT: joint vs sequential x quadratic vs linear, each a full train.py run.

Runs ``configs/npt/gpt_tiny_trained.yaml`` four times (the variants below) on the main job's checkpoint,
reads each run's ``npt_results.json`` (end-of-fit evaluation on the validation split: perplexity of the
original model, the NPT model and the model with the converted layers' attention dropped; equiv_rel) and
writes them, with the machine, to ``benchmarks/results/npt_experiment.json``; ``python -m
benchmarks.report`` renders the table in docs/npt.md. Run the main job first:

    python train.py fit --config configs/gpt2/tiny.yaml
    python benchmarks/npt_experiment.py --target lightning_logs/version_0/checkpoints/last.ckpt \
        --seed 2024 --np-seed 7 --parallel 2

``--parallel`` runs that many variants at once (each with ``--threads`` threads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/npt_experiment.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import REPO_ROOT, run_metadata, write_results  # noqa: E402

CONFIG = "configs/npt/gpt_tiny_trained.yaml"
VARIANTS: dict[str, dict[str, str]] = {
    "joint_quadratic": {"schedule": "joint", "modulation": "quadratic"},
    "joint_linear": {"schedule": "joint", "modulation": "linear"},
    "sequential_quadratic": {"schedule": "sequential", "modulation": "quadratic"},
    "sequential_linear": {"schedule": "sequential", "modulation": "linear"},
}
# TensorBoard tags of the curves behind the table (per converted layer i: val/equiv_rel_layer{i})
CURVES = ("val/ppl_original", "val/ppl_npt", "val/ppl_attention_dropped", "val/recovered", "val/equiv_rel")
# acceptance: NPT perplexity within 5% of the original, >= 80% of the dropped attention's cost recovered
MAX_PPL_INCREASE, MIN_RECOVERED = 0.05, 0.8


def command(variant: str, args: argparse.Namespace, root: Path) -> list[str]:
    """The train.py command line of one variant."""
    settings = VARIANTS[variant]
    cmd = [
        sys.executable, "train.py", "fit", "--config", CONFIG,
        "--model.init_args.target_path", str(args.target),
        "--seed_everything", str(args.seed),
        "--model.init_args.np_seed", str(args.np_seed),
        "--model.init_args.schedule", settings["schedule"],
        "--model.init_args.modulation", settings["modulation"],
        "--trainer.max_steps", str(args.steps),
        "--trainer.default_root_dir", str(root / variant),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if settings["schedule"] == "sequential":
        cmd += ["--model.init_args.steps_per_layer", str(args.steps // 2)]  # 2 converted layers
    return cmd + list(args.extra)


def newest_results(directory: Path) -> dict[str, Any]:
    """The npt_results.json of the newest run under ``directory``."""
    files = sorted(
        directory.glob("lightning_logs/version_*/npt_results.json"), key=lambda p: p.stat().st_mtime
    )
    if not files:
        raise FileNotFoundError(f"no npt_results.json under {directory}")
    return json.loads(files[-1].read_text())


def run_variant(variant: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Train one variant in a subprocess; its final figures, wall time and acceptance."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log = root / f"{variant}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            command(variant, args, root), cwd=REPO_ROOT, env=env, stdout=handle, stderr=handle
        )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {done.returncode}); see {log}")
    res = newest_results(root / variant)
    increase = res["ppl_npt"] / res["ppl_original"] - 1.0
    return {
        "name": variant,
        **VARIANTS[variant],
        "wall_s": round(wall, 1),
        "equiv_rel": res["equiv_rel"],
        "equiv_rel_per_layer": {i: v["equiv_rel"] for i, v in res["layers"].items()},
        "ppl_original": res["ppl_original"],
        "ppl_npt": res["ppl_npt"],
        "ppl_attention_dropped": res["ppl_attention_dropped"],
        "ppl_increase": increase,
        "recovered": res["recovered"],
        "accepted": bool(increase <= MAX_PPL_INCREASE and res["recovered"] >= MIN_RECOVERED),
        "history": res["history"],
    }


def table(results: dict[str, Any]) -> str:
    """A plain-text table of the variants."""
    lines = [f"{'variant':22} {'equiv_rel':>9} {'ppl orig':>9} {'ppl NPT':>9} {'ppl drop':>9} {'+ppl':>7} "
             f"{'recov':>6} {'ok':>3} {'wall':>7}"]  # fmt: skip
    for v in results["variants"]:
        lines.append(
            f"{v['name']:22} {v['equiv_rel']:9.4f} {v['ppl_original']:9.2f} {v['ppl_npt']:9.2f} "
            f"{v['ppl_attention_dropped']:9.2f} {v['ppl_increase']:7.2%} {v['recovered']:6.1%} "
            f"{'yes' if v['accepted'] else 'no':>3} {v['wall_s']:6.0f}s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=Path("lightning_logs/version_0/checkpoints/last.ckpt"),
                        help="the main job's checkpoint (configs/gpt2/tiny.yaml, 1200 steps)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=2024, help="seed_everything (data order)")
    parser.add_argument("--np-seed", type=int, default=7, help="NP component init seed")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (sequential: / 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--parallel", type=int, default=1, help="variants run at once")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs-dir", type=Path, default=Path("npt_experiment_runs"), help="run directories")
    parser.add_argument("--name", default="npt_experiment", help="results file stem")
    parser.add_argument("extra", nargs="*", help="more train.py arguments after --")
    args = parser.parse_args(argv)
    if args.steps % 2:
        parser.error("--steps must be even (sequential: 2 layers x steps / 2)")
    if not args.target.is_file():
        parser.error(f"no target checkpoint at {args.target}: run the main job first (see --help)")
    meta = run_metadata()
    root = args.runs_dir.resolve()
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        variants = list(pool.map(lambda v: run_variant(v, args, root), args.variants))
    results = {
        "config": CONFIG,
        "target": str(args.target),
        "seed": args.seed,
        "np_seed": args.np_seed,
        "max_steps": args.steps,
        "threads": args.threads,
        "parallel": args.parallel,
        "acceptance": {"max_ppl_increase": MAX_PPL_INCREASE, "min_recovered": MIN_RECOVERED},
        "curves": list(CURVES),
        "variants": variants,
    }
    print(table(results))
    write_results(args.name, meta, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
