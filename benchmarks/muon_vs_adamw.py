"""AdamW (the main job as shipped) against Muon on the hidden matrices, on the main job's model and data.

Each arm runs `train.py fit --config configs/gpt2/tiny.yaml` in its own temporary directory (sharing the
repository's token cache), with the same seed, data order, batch and step count; a Muon arm only swaps the
optimizer for `MuonWithAdamW` (AdamW keeps the embeddings, norms and biases at the shipped 2e-3) with one
of the swept Muon learning rates. Recorded per arm: val/loss against tokens, the median step time, and the
steps it needs to reach AdamW's final validation loss (linear between validations). Results:
benchmarks/results/muon_vs_adamw.json, rendered into docs/benchmarks.md by `python -m benchmarks.report`.

    python benchmarks/muon_vs_adamw.py                          # 1200 steps an arm: about 3 min each, quiet
    python benchmarks/muon_vs_adamw.py --max-steps 600 --muon-lrs 0.02 0.04
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/muon_vs_adamw.py

from benchmarks.main_job import median_step_seconds, read_scalars, run_job  # noqa: E402
from benchmarks.results import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    load_average,
    run_metadata,
    write_results,
)

MUON = "lightning_modules.common.optim.MuonWithAdamW"


def arm_overrides(muon_lr: float | None) -> list[str]:
    """train.py overrides of an arm: none for AdamW, the optimizer swapped for a Muon arm."""
    if muon_lr is None:
        return []
    return [
        f"--model.init_args.optimizer={MUON}",
        f"--model.init_args.optimizer.lr={muon_lr}",
        "--model.init_args.optimizer.adamw_lr=0.002",  # the shipped AdamW peak, for the non-hidden tensors
        "--model.init_args.optimizer.adamw_weight_decay=0.1",
        "--model.init_args.optimizer.weight_decay=0.0",
    ]


def steps_to_reach(validations: list[dict[str, float]], target: float) -> float | None:
    """First step at which val/loss reaches `target`, linear between validations; None if it never does."""
    previous = None
    for point in validations:
        if point["val_loss"] <= target:
            if previous is None or previous["val_loss"] == point["val_loss"]:
                return float(point["step"])
            frac = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous["step"] + frac * (point["step"] - previous["step"])
        previous = point
    return None


def run_arm(name: str, muon_lr: float | None, common: list[str]) -> dict[str, Any]:
    """One training run; returns its validations (step, tokens, loss) and median step time."""
    with tempfile.TemporaryDirectory(prefix=f"muon_vs_adamw_{name}_") as tmp:
        workdir = Path(tmp)
        wall, _ = run_job(workdir, [*common, *arm_overrides(muon_lr)])
        run_dir = next((workdir / "lightning_logs").glob("version_*"))
        scalars = read_scalars(run_dir)
    val_steps = [step for step, _, _ in scalars["val/loss"]]
    step_s, clean = median_step_seconds(scalars["train/loss"], val_steps)
    return {
        "name": name,
        "optimizer": "AdamW" if muon_lr is None else "MuonWithAdamW",
        "muon_lr": muon_lr,
        "wall_s": wall,
        "median_step_s": step_s,
        "step_time_without_validation": clean,
        # Lightning stamps metrics with the 0-based index of the last optimizer step: +1 is steps done
        "validations": [{"step": s + 1, "val_loss": v} for s, v, _ in scalars["val/loss"]],
        "final_train_loss": scalars["train/loss"][-1][1],
    }


def summarise(arms: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """Add tokens, steps-to-AdamW's-final-loss and step-time ratios (against AdamW) to every arm."""
    adamw = arms[0]
    target = adamw["validations"][-1]["val_loss"]
    for arm in arms:
        for point in arm["validations"]:
            point["tokens"] = point["step"] * tokens_per_step
        reach = steps_to_reach(arm["validations"], target)
        arm["steps_to_adamw_final"] = reach
        arm["steps_fraction_of_adamw"] = None if reach is None else reach / adamw["validations"][-1]["step"]
        arm["step_time_ratio"] = arm["median_step_s"] / adamw["median_step_s"]
        arm["final_val_loss"] = arm["validations"][-1]["val_loss"]
    muon = [a for a in arms if a["muon_lr"] is not None and a["steps_to_adamw_final"] is not None]
    best = min(muon, key=lambda a: a["steps_to_adamw_final"], default=None)
    return {"adamw_final_val_loss": target, "best_muon": best["name"] if best else None}


def interleaved_step_times(muon_lr: float, rounds: int, steps: int) -> dict[str, Any]:
    """Seconds per optimizer step (forward, backward, clipping, step) of the main job's model and batch
    shape with AdamW and with Muon, in alternating rounds in this process: both see the same machine load."""
    import copy
    import time

    import torch
    import yaml

    from lightning_modules.common.optim import MuonWithAdamW, decay_param_groups, fused_qkv_splits
    from lightning_modules.gpt import GPT, GPTConfig

    tiny = yaml.safe_load((REPO_ROOT / "configs/gpt2/tiny.yaml").read_text())
    model_args, data_args = tiny["model"]["init_args"], tiny["data"]["init_args"]
    adamw_args = model_args["optimizer"]["init_args"]
    torch.manual_seed(0)
    config = GPTConfig(**model_args["config"], vocab_size=data_args["bpe_vocab_size"])
    models = {"adamw": GPT(config)}
    models["muon"] = copy.deepcopy(models["adamw"])
    named = list(models["muon"].named_parameters())
    optimizers = {
        "adamw": torch.optim.AdamW(
            decay_param_groups(models["adamw"].named_parameters()),
            lr=adamw_args["lr"], betas=tuple(adamw_args["betas"]), weight_decay=adamw_args["weight_decay"],
        ),
        "muon": MuonWithAdamW(
            named, lr=muon_lr, adamw_lr=adamw_args["lr"], adamw_weight_decay=adamw_args["weight_decay"],
            row_splits=fused_qkv_splits(models["muon"], (n for n, _ in named)),
        ),
    }  # fmt: skip
    tokens = torch.randint(0, config.vocab_size, (data_args["batch_size"], data_args["block_size"] + 1))

    def step(name: str) -> None:
        model, opt = models[name], optimizers[name]
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    times: dict[str, list[float]] = {"adamw": [], "muon": []}
    for name in times:  # warm-up: first-call allocations and the optimizers' state
        for _ in range(3):
            step(name)
    for r in range(rounds):
        for name in ("adamw", "muon") if r % 2 == 0 else ("muon", "adamw"):
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - start) / steps)
    ratios = [m / a for m, a in zip(times["muon"], times["adamw"], strict=True)]
    return {
        "rounds": rounds,
        "steps_per_round": steps,
        "threads": torch.get_num_threads(),
        "adamw_step_s": statistics.median(times["adamw"]),
        "muon_step_s": statistics.median(times["muon"]),
        "ratio_median": statistics.median(ratios),
        "ratio_rounds": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-steps", type=int, default=1200, help="optimizer steps per arm (tiny.yaml: 1200)"
    )
    parser.add_argument("--val-every", type=int, default=50, help="validate every N steps (all arms)")
    parser.add_argument("--val-windows", type=int, default=256, help="validation windows per check")
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.04], help="Muon LR sweep")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<name>.json)")
    parser.add_argument("--timing-rounds", type=int, default=10, help="interleaved step-timing rounds")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="add the interleaved step timing to an existing results file instead of training",
    )
    args = parser.parse_args()
    timing_lr = args.muon_lrs[0]
    if args.timing_only:
        path = args.out or RESULTS_DIR / "muon_vs_adamw.json"
        payload = json.loads(Path(path).read_text())
        payload["results"]["interleaved_timing"] = {
            "muon_lr": timing_lr,
            **interleaved_step_times(timing_lr, args.timing_rounds, 10),
        }
        meta = {**payload["meta"], "timing_command": command_line(), "timing_load_before": load_average()}
        write_results("muon_vs_adamw", meta, payload["results"], out=path)
        return
    tokens_per_step = 16 * 128  # tiny.yaml: 16 sequences of 128 tokens, no accumulation
    common = [
        f"--trainer.max_steps={args.max_steps}",
        f"--trainer.val_check_interval={args.val_every}",
        f"--data.init_args.val_windows={args.val_windows}",
        f"--data.init_args.cache_dir={REPO_ROOT / 'data_cache'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=10",
    ]
    meta = run_metadata()
    arms: list[dict[str, Any]] = []
    plan: list[tuple[str, float | None]] = [
        ("adamw", None),
        *((f"muon_lr{lr:g}", lr) for lr in args.muon_lrs),
    ]
    for name, lr in plan:
        arms.append(run_arm(name, lr, common))
        summary = summarise(arms, tokens_per_step)  # written after every arm: a cut-short sweep still reports
        if len(arms) == len(plan):
            timing = interleaved_step_times(timing_lr, args.timing_rounds, 10)
            summary["interleaved_timing"] = {"muon_lr": timing_lr, **timing}
        results = {
            "config": "configs/gpt2/tiny.yaml",
            "max_steps": args.max_steps,
            "tokens_per_step": tokens_per_step,
            "val_every": args.val_every,
            "val_windows": args.val_windows,
            "muon_lrs_planned": args.muon_lrs,
            "arms": arms,
            **summary,
        }
        path = write_results("muon_vs_adamw", meta, results, out=args.out)
        last = arms[-1]
        print(
            f"{name}: final val/loss {last['final_val_loss']:.4f}, steps to AdamW's final "
            f"{last['steps_to_adamw_final']}, step time x{last['step_time_ratio']:.3f} "
            f"(median {statistics.median([last['median_step_s']]):.3f} s) -> {path}",
            flush=True,
        )


if __name__ == "__main__":
    main()
