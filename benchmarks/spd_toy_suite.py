"""SPD's toy suite through train.py: TMS 5-2, TMS 40-10 and the 1-, 2- and 3-layer ResidMLP, per seed.

Each suite trains its target once with the shipped `configs/spd/<suite>_target.yaml` (the target's seed
stays the config's), then decomposes it with the shipped `configs/spd/<suite>.yaml` once per decomposition
seed (`--seed_everything`), each run a `train.py fit` subprocess. A run passes when every checked module
meets the suite's ground truth (`CRITERIA`); besides `spd_results.json` it records the single-feature CI
margins (the largest off-diagonal and smallest diagonal CI after the best permutation) from the final
checkpoint, and the run's wall time. Results merge into benchmarks/results/spd_toy_suite.json, one row per
(suite, seed), so suites and seeds can be run separately:

    python benchmarks/spd_toy_suite.py --suite tms_5-2 --seeds 10-19 --jobs 2
    python benchmarks/spd_toy_suite.py --suite tms_40-10 --seeds 10-12 --jobs 2
    python benchmarks/spd_toy_suite.py --suite resid_mlp1 --seeds 10-14 --max-steps 5000 --jobs 2
    python benchmarks/spd_toy_suite.py --suite resid_mlp3 --time-steps 20   # step time only

`--max-steps` shortens a decomposition (recorded per row); `--time-steps N` runs N steps and records the
seconds per step, to estimate a full run. `--accelerator gpu` runs the targets and decompositions on a GPU
(`--jobs N` then shares one GPU between N runs; the accelerator is recorded per row):

    python benchmarks/spd_toy_suite.py --suite resid_mlp2 --seeds 10-14 --jobs 5 --accelerator gpu

`--members` runs the seeds as one member ensemble instead (`model.init_args.member_seeds`: one process,
each member the run of its seed, lightning_modules/spd/members.py): one step's kernel launches for all of
them, the way to use a GPU at these sizes; `--tf32` adds configs/callbacks/tf32.yaml (recorded per row):

    python benchmarks/spd_toy_suite.py --suite resid_mlp3 --seeds 10-14 --members --accelerator gpu --tf32

`--target-only` trains the target alone (a relative --work keeps the saved path valid on another machine:
benchmarks/spd_toy_gpu.sh reuses targets trained on a CPU); `--figures end` skips the per-validation figures;
`--resume` keeps the runs in --work that finished and continues those that stopped from their last.ckpt
(a second device call after a first one ran out of time).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS_DIR, run_metadata, write_results  # noqa: E402

CONFIGS = ROOT / "configs" / "spd"
RESULTS_NAME = "spd_toy_suite"


@dataclass(frozen=True)
class Criteria:
    """What a decomposition must reach on its `modules` (fnmatch patterns) to pass."""

    modules: tuple[str, ...]
    alive: int  # exactly this many alive components per checked module
    min_mmcs: float = 0.99
    max_wall_s: float | None = None  # None: no time limit


# A variant suite decomposes its base suite's target with the base's shipped config and its own overlay,
# configs/spd/variants/<variant>.yaml, over it (train.py applies `--config` files in order).
VARIANTS: dict[str, str] = {
    "tms_40-10_anneal": "tms_40-10",
    "tms_40-10_anneal_fwarm": "tms_40-10",
    "tms_40-10_anneal_fwarm_lrfloor": "tms_40-10",
    "tms_40-10_anneal_fwarm_cwd": "tms_40-10",
    "resid_mlp2_compile": "resid_mlp2",
    "resid_mlp3_compile": "resid_mlp3",
}

_BASE_CRITERIA: dict[str, Criteria] = {
    "tms_5-2": Criteria(("linear1", "linear2"), alive=5, max_wall_s=600.0),
    "tms_40-10": Criteria(("linear1", "linear2"), alive=40),
    "resid_mlp1": Criteria(("layers.*.mlp_in",), alive=100),
    "resid_mlp2": Criteria(("layers.*.mlp_in",), alive=100),
    "resid_mlp3": Criteria(("layers.*.mlp_in",), alive=102),
}
# every suite's criteria, each variant after its base with the base's (the same target, so the same truth)
CRITERIA: dict[str, Criteria] = {
    suite: criteria
    for base, criteria in _BASE_CRITERIA.items()
    for suite in (base, *(variant for variant, of in VARIANTS.items() if of == base))
}


def base_suite(suite: str) -> str:
    """The suite whose target (and base config) a suite uses: itself unless it is a variant."""
    return VARIANTS.get(suite, suite)


def suite_configs(suite: str) -> list[Path]:
    """The decomposition's config files, in the order train.py applies them."""
    files = [CONFIGS / f"{base_suite(suite)}.yaml"]
    return files + [CONFIGS / "variants" / f"{suite}.yaml"] if suite in VARIANTS else files


def config_args(suite: str) -> list[str]:
    """`--config FILE` for each of the suite's config files."""
    return [arg for path in suite_configs(suite) for arg in ("--config", str(path))]


def parse_seeds(text: str) -> list[int]:
    """'10-19' or '3,7,21' or '10-12,21' -> the seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


@dataclass(frozen=True)
class Machine:
    """Where each train.py run goes: CPU threads per run, and cpu or gpu."""

    threads: int = 1
    accelerator: str = "cpu"
    tf32: bool = False  # float32 matmuls on TF32 tensor cores (configs/callbacks/tf32.yaml)

    def trainer_args(self) -> list[str]:
        """The command-line overrides that put a shipped config (accelerator: cpu) on this machine."""
        args = ["--trainer.accelerator", self.accelerator, "--trainer.devices", "1"]
        return args + ["--config", str(ROOT / "configs" / "callbacks" / "tf32.yaml")] if self.tf32 else args

    def tags(self) -> dict[str, Any]:
        """What a results row records of this machine beyond its accelerator."""
        return {"tf32": True} if self.tf32 else {}


def run_train(args: list[str], log: Path, machine: Machine, append: bool = False) -> tuple[int, float]:
    """`python train.py fit ARGS` on `machine` with its output in `log` (appended to it when `append`);
    (return code, wall seconds)."""
    threads = str(machine.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", *args, *machine.trainer_args(),
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    start = time.perf_counter()
    with log.open("a" if append else "w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    return done.returncode, time.perf_counter() - start


def run_dir(root: Path) -> Path:
    """The newest lightning_logs/version_* under root."""
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no run directory under {root}")
    return versions[-1]


def ensure_target(suite: str, work: Path, machine: Machine, max_steps: int | None = None) -> dict[str, Any]:
    """Train the suite's target once (reused by every seed); its path, checks, steps and wall time.
    max_steps shortens it (for step timing only: the decomposition's cost does not depend on it)."""
    name = suite if max_steps is None else f"{suite}_steps{max_steps}"
    path = work / "targets" / f"{name}.pt"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    root = work / "runs" / f"{name}_target"
    args = ["--config", str(CONFIGS / f"{suite}_target.yaml"), "--model.init_args.save_path", str(path),
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps)]
    rc, wall = run_train(args, work / f"{name}_target.log", machine)
    if rc != 0:
        raise RuntimeError(f"{suite} target failed (rc {rc}); see {work / f'{name}_target.log'}")
    checks = json.loads((run_dir(root) / "target_checks.json").read_text())
    info = {"path": str(path), "checks": checks, "wall_s": round(wall, 1), "max_steps": max_steps}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def ci_margins(ckpt: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{member seed, or "" for a single run: per module, the largest off-diagonal and smallest diagonal
    single-feature CI after the best permutation (identity CI error counts entries beyond 0.1 / below 0.9)}."""
    import torch

    from lightning_modules.spd import SPDLightningModule
    from lightning_modules.spd.metrics import permute_to_identity, single_feature_cis

    torch.set_num_threads(1)
    module = SPDLightningModule.load_from_checkpoint(ckpt, map_location="cpu")
    n = int(module.cm.target_model.n_features)
    margins = {}
    views = module._member_views()
    for seed, cm in views:
        out = {}
        for name, ci in single_feature_cis(cm, n).items():
            if ci.shape[1] < n:
                continue
            p = permute_to_identity(ci)  # (n, C)
            off = torch.ones_like(p, dtype=torch.bool)
            off[:, :n].fill_diagonal_(False)
            out[name] = {
                "max_off_diag_ci": float(p[off].max()),
                "min_diag_ci": float(p[:, :n].diagonal().min()),
            }
        margins["" if seed is None else str(seed)] = out
        if seed is not None:
            cm.remove_hooks()
    return margins


def judge(suite: str, results: dict[str, Any], wall_s: float) -> tuple[bool, list[str]]:
    """(passed, the failed criteria) of one decomposition's spd_results.json."""
    crit = CRITERIA[suite]
    failures = []
    checked = [m for m in results["modules"] if any(fnmatch.fnmatch(m, p) for p in crit.modules)]
    if not checked:
        failures.append(f"no module matches {crit.modules}")
    for name in checked:
        row = results["modules"][name]
        if row["alive_components"] != crit.alive:
            failures.append(f"{name}: {row['alive_components']:g} alive (want {crit.alive})")
        if row.get("mmcs") is None or row["mmcs"] < crit.min_mmcs:
            failures.append(f"{name}: MMCS {row.get('mmcs')} < {crit.min_mmcs}")
        if row.get("identity_ci_error") != 0:
            failures.append(f"{name}: identity CI error {row.get('identity_ci_error')}")
    if crit.max_wall_s is not None and wall_s > crit.max_wall_s:
        failures.append(f"wall {wall_s:.0f} s > {crit.max_wall_s:.0f} s")
    return not failures, failures


def recipe_setting(suite: str, keys: tuple[str, ...], default: Any = None) -> Any:
    """A setting of the decomposition's recipe by its keys, e.g. ("trainer", "max_steps"): the value the
    last of its config files that sets it gives (train.py applies them in order), else `default`."""
    import yaml

    value = default
    for path in suite_configs(suite):
        node: Any = yaml.safe_load(path.read_text())
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        value = value if node is None else node
    return value


def config_steps(suite: str) -> int:
    """The decomposition's trainer.max_steps."""
    return int(recipe_setting(suite, ("trainer", "max_steps")))


def unfinished_checkpoint(root: Path) -> Path | None:
    """The last.ckpt of an earlier run under root that stopped before writing spd_results.json, else None."""
    try:
        directory = run_dir(root)
    except FileNotFoundError:
        return None
    last = directory / "checkpoints" / "last.ckpt"
    if (directory / "spd_results.json").is_file() or not last.exists():
        return None
    return last


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer steps a Lightning checkpoint holds (mapped, not read whole)."""
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def fit_args(
    suite: str,
    seed_args: list[str],
    target: dict[str, Any],
    root: Path,
    max_steps: int | None,
    figures: str | None,
    resume_from: Path | None,
) -> list[str]:
    """train.py fit's arguments for one decomposition run of the suite (seed_args: its seed's or members')."""
    args = [*config_args(suite), *seed_args, "--model.init_args.target", target["path"],
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    if figures is not None:
        args += ["--model.init_args.evaluation.figures", figures]
    if resume_from is not None:
        args += ["--ckpt_path", str(resume_from)]
    return args


def decompose(
    suite: str,
    seed: int,
    target: dict[str, Any],
    work: Path,
    machine: Machine,
    max_steps: int | None,
    figures: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """One decomposition seed: train.py fit, then its results, margins and verdict as a results row.
    figures overrides evaluation.figures (logging only: "end" skips the per-validation figures). resume
    keeps a finished run's row (saved beside its run) of the same step count, and continues a stopped
    run from its last.ckpt (after a time-limited device call, say); the row's wall_s then counts this
    call's part alone."""
    root = work / "runs" / f"{suite}_seed{seed}"
    saved_row = root / "suite_row.json"
    steps = config_steps(suite) if max_steps is None else max_steps
    if resume and saved_row.is_file():
        row = json.loads(saved_row.read_text())
        if row.get("steps") == steps:
            print(f"{suite} seed {seed}: kept the finished run's row")
            return row
    resume_from = unfinished_checkpoint(root) if resume else None
    resumed_step = None if resume_from is None else checkpoint_step(resume_from)
    args = fit_args(suite, ["--seed_everything", str(seed)], target, root, max_steps, figures, resume_from)
    rc, wall = run_train(args, work / f"{suite}_seed{seed}.log", machine, append=resume_from is not None)
    row: dict[str, Any] = {"suite": suite, "seed": seed, "steps": steps, "wall_s": round(wall, 1),
                           "accelerator": machine.accelerator, **machine.tags()}  # fmt: skip
    if figures is not None:
        row["figures"] = figures
    if resumed_step is not None:
        row["resumed_from_step"] = resumed_step
    if rc != 0:
        return {**row, "ran": False, "passed": False, "failures": [f"train.py exited {rc}"]}
    directory = run_dir(root)
    results = json.loads((directory / "spd_results.json").read_text())
    passed, failures = judge(suite, results, wall)
    margins = ci_margins(directory / "checkpoints" / "last.ckpt")[""]
    print(f"{suite} seed {seed}: {'pass' if passed else 'FAIL ' + '; '.join(failures)} ({wall:.0f} s)")
    row = {**row, "ran": True, "passed": passed, "failures": failures, "modules": results["modules"],
           "metrics": results["metrics"], "ci_margins": margins}  # fmt: skip
    saved_row.write_text(json.dumps(row, indent=2))  # for a later --resume, which keeps it
    return row


def time_steps(
    suite: str,
    target: dict[str, Any],
    work: Path,
    machine: Machine,
    steps: int,
    member_seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Seconds per optimizer step of the shipped recipe, from two short runs (steps and 2 x steps); with
    member_seeds, of the member ensemble of those seeds (one step: every member's)."""
    walls = []
    name = suite if not member_seeds else f"{suite}_members{len(member_seeds)}"
    for n in (steps, 2 * steps):
        root = work / "runs" / f"{name}_timing{n}"
        args = [*config_args(suite), "--model.init_args.target", target["path"],
                "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(n),
                "--trainer.val_check_interval", str(n), "--model.init_args.evaluation.final_eval_batches", "1",
                "--model.init_args.faithfulness_warmup.steps", "0", "--model.init_args.evaluation.figures", "off"]  # fmt: skip
        if member_seeds:
            args += ["--model.init_args.member_seeds", json.dumps(member_seeds)]
        rc, wall = run_train(args, work / f"{name}_timing{n}.log", machine)
        if rc != 0:
            raise RuntimeError(f"{suite} timing run failed (rc {rc}); see {work / f'{name}_timing{n}.log'}")
        walls.append(wall)
    step_s = (walls[1] - walls[0]) / steps
    row = {"steps": [steps, 2 * steps], "walls_s": [round(w, 1) for w in walls], "step_s": round(step_s, 4),
           "config_steps": config_steps(suite), "estimated_run_s": round(step_s * config_steps(suite)),
           "accelerator": machine.accelerator, **machine.tags()}  # fmt: skip
    if member_seeds:
        row["members"] = len(member_seeds)
    if step_s <= 0:  # the runs' fixed costs (start-up, compilation) vary by more than `steps` steps take
        row |= {"step_s": None, "estimated_run_s": None, "note": "too few steps to time: use more"}
    return row


def load_existing(path: Path) -> dict[str, Any]:
    """The results file's `results` so far (empty when there is none)."""
    if not path.is_file():
        return {"targets": {}, "timing": {}, "runs": []}
    return json.loads(path.read_text())["results"]


def decompose_members(
    suite: str,
    seeds: list[int],
    target: dict[str, Any],
    work: Path,
    machine: Machine,
    max_steps: int | None,
    figures: str | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """The seeds as one member ensemble (`model.init_args.member_seeds`, lightning_modules/spd/members.py):
    one train.py fit whose member i is the run of seed i, then one row per seed as `decompose` makes it,
    from the member's results and margins. A seed's wall_s is the ensemble's wall over the members (what it
    cost), beside ensemble_wall_s; judged on the former. resume keeps a finished ensemble's rows (of the
    same step count) and continues a stopped one from its last.ckpt."""
    name = f"{suite}_members{'-'.join(map(str, seeds))}"
    root = work / "runs" / name
    steps = config_steps(suite) if max_steps is None else max_steps
    saved_rows = root / "suite_rows.json"
    if resume and saved_rows.is_file():
        rows = json.loads(saved_rows.read_text())
        if all(r.get("steps") == steps for r in rows):
            print(f"{suite} seeds {seeds}: kept the finished ensemble's rows")
            return rows
    resume_from = unfinished_checkpoint(root) if resume else None
    seed_args = ["--seed_everything", str(seeds[0]), "--model.init_args.member_seeds", json.dumps(seeds)]
    args = fit_args(suite, seed_args, target, root, max_steps, figures, resume_from)
    rc, wall = run_train(args, work / f"{name}.log", machine, append=resume_from is not None)
    base = {"suite": suite, "steps": steps, "wall_s": round(wall / len(seeds), 1), "ensemble_wall_s": round(wall, 1),
            "members": seeds, "accelerator": machine.accelerator, **machine.tags()}  # fmt: skip
    if figures is not None:
        base["figures"] = figures
    if resume_from is not None:
        base["resumed_from_step"] = checkpoint_step(resume_from)
    if rc != 0:
        return [
            {**base, "seed": s, "ran": False, "passed": False, "failures": [f"train.py exited {rc}"]}
            for s in seeds
        ]
    directory = run_dir(root)
    margins = ci_margins(directory / "checkpoints" / "last.ckpt")
    rows = []
    for seed in seeds:
        results = json.loads((directory / "members" / f"seed_{seed}" / "spd_results.json").read_text())
        passed, failures = judge(suite, results, wall / len(seeds))
        print(f"{suite} seed {seed} (member): {'pass' if passed else 'FAIL ' + '; '.join(failures)}")
        rows.append({**base, "seed": seed, "ran": True, "passed": passed, "failures": failures,
                     "modules": results["modules"], "metrics": results["metrics"],
                     "ci_margins": margins[str(seed)]})  # fmt: skip
    saved_rows.write_text(json.dumps(rows, indent=2))  # for a later --resume, which keeps them
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run one suite's seeds (or time its step) and merge the rows into the results file."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", required=True, choices=sorted(CRITERIA))
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="decomposition seeds: 10-19 or 3,7")
    parser.add_argument("--max-steps", type=int, default=None, help="shorten the decomposition")
    parser.add_argument("--time-steps", type=int, default=None, help="only time N and 2N steps")
    parser.add_argument(
        "--target-max-steps", type=int, default=None, help="shorten the target (with --time-steps only)"
    )
    parser.add_argument(
        "--target-only", action="store_true", help="train (or find) the suite's target in --work and stop"
    )
    parser.add_argument("--jobs", type=int, default=1, help="decompositions at once (1 thread each)")
    parser.add_argument(
        "--members", action="store_true", help="the seeds as one member ensemble: one process, one run each"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (GPUs)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs in --work and continue stopped ones from their last.ckpt",
    )
    parser.add_argument(
        "--figures",
        default=None,
        choices=["all", "end", "off"],
        help="evaluation.figures (default: the config's)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "lightning_logs" / "spd_toy_suite")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{RESULTS_NAME}.json")
    args = parser.parse_args(argv)
    if args.seeds is None and args.time_steps is None and not args.target_only:
        parser.error("give --seeds, --time-steps or --target-only")
    if args.target_max_steps is not None and args.seeds and args.time_steps is None:
        parser.error("--target-max-steps is for --time-steps only: decompositions need the shipped target")
    meta = run_metadata()
    machine = Machine(args.threads, args.accelerator, args.tf32)
    args.work.mkdir(parents=True, exist_ok=True)
    target = ensure_target(base_suite(args.suite), args.work, machine, args.target_max_steps)
    if args.target_only:
        print(f"target: {target['path']} {json.dumps(target['checks'])}")
        return 0
    new_rows: list[dict[str, Any]] = []
    timing = None
    if args.time_steps is not None:
        timing = time_steps(args.suite, target, args.work, machine, args.time_steps)
        if args.members and args.seeds:  # beside one run's step: the ensemble's, and what it saves
            ensemble = time_steps(args.suite, target, args.work, machine, args.time_steps, args.seeds)
            if timing["step_s"] and ensemble["step_s"]:
                ensemble["runs_per_ensemble_time"] = round(
                    len(args.seeds) * timing["step_s"] / ensemble["step_s"], 2
                )
            timing["members"] = ensemble
        timing["target_max_steps"] = args.target_max_steps
    if args.seeds and args.members and args.time_steps is None:
        new_rows = decompose_members(args.suite, args.seeds, target, args.work, machine, args.max_steps,
                                     args.figures, args.resume)  # fmt: skip
    elif args.seeds and args.time_steps is None:
        run_seed = partial(decompose, args.suite, target=target, work=args.work, machine=machine,
                           max_steps=args.max_steps, figures=args.figures, resume=args.resume)  # fmt: skip
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_seed, seed=s) for s in args.seeds]
            new_rows = [f.result() for f in futures]
    results = load_existing(args.out)
    if args.target_max_steps is None:
        results["targets"][base_suite(args.suite)] = {"checks": target["checks"], "wall_s": target["wall_s"]}
    if timing is not None:
        results["timing"][args.suite] = timing
    replaced = {(r["suite"], r["seed"]) for r in new_rows}
    runs = [r for r in results["runs"] if (r["suite"], r["seed"]) not in replaced] + new_rows
    results["runs"] = sorted(runs, key=lambda r: (list(CRITERIA).index(r["suite"]), r["seed"]))
    commands = results.setdefault("commands", {}).setdefault(args.suite, [])
    if meta["command"] not in commands:
        commands.append(meta["command"])
    write_results(RESULTS_NAME, meta, results, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
