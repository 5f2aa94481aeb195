"""How far SPD runs got, read from their TensorBoard event files: steps, step time, alive components.

For runs stopped before they wrote spd_results.json (a time-limited device lease, say): per run the last
logged optimizer step, the median seconds per step between train/loss points (leaving out the intervals
that hold a validation, as benchmarks/main_job.py does), and each validation's alive components per module.
Rows go to a results file under benchmarks/results/ with the machine given on the command line (the runs'
own machine, not this one):

    python benchmarks/spd_run_progress.py RUN_DIR [RUN_DIR ...] --name spd_run_progress_resid_mlp2_gpu \
        --commit cfcd0e2 --dirty --cpu "not read" --cores 16 --gpu "NVIDIA H200" --torch "not read" \
        --command "bash benchmarks/spd_toy_gpu.sh" --note "5 runs at once on one GPU, stopped by the budget"

The date is the last event's; the load averages are unknown (null). `python -m benchmarks.report` renders
the file as a table (kind spd_run_progress).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.main_job import median_step_seconds, read_scalars  # noqa: E402
from benchmarks.results import RESULTS_DIR  # noqa: E402


def run_progress(run: Path) -> dict[str, Any]:
    """One run directory (any depth above its events file): steps reached, step time, alive history."""
    events = sorted(run.rglob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"no TensorBoard events under {run}")
    scalars = read_scalars(events[-1].parent)
    loss = scalars["train/loss"]  # [(step index, value, wall time)]
    alive = {
        tag.removeprefix("val/alive_components/"): [[step + 1, value] for step, value, _ in points]
        for tag, points in scalars.items()
        if tag.startswith("val/alive_components/")
    }  # +1: a validation is stamped with the index of the step it follows; rows name steps done
    validations = sorted({step for points in alive.values() for step, _ in points})
    step_s, _ = median_step_seconds(loss, [step - 1 for step in validations])
    return {
        "run": run.name,
        "last_step": loss[-1][0] + 1,
        "train_wall_s": round(loss[-1][2] - loss[0][2], 1),
        "median_step_ms": round(1000 * step_s, 2),  # intervals holding a validation left out
        "alive_components": alive,
        "last_wall_time": loss[-1][2],  # popped by main for the date
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--name", required=True, help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--commit", required=True, help="the commit the runs ran")
    parser.add_argument("--dirty", action="store_true", help="the runs' tree had uncommitted changes")
    parser.add_argument("--cpu", required=True, help="the runs' machine's CPU model")
    parser.add_argument("--cores", type=int, required=True, help="the runs' machine's CPU cores")
    parser.add_argument("--gpu", default=None, help="the runs' GPU, if any")
    parser.add_argument("--torch", required=True, help="the runs' torch version")
    parser.add_argument("--command", required=True, help="the command that made the runs")
    parser.add_argument("--note", default="", help="how the runs were made and stopped")
    args = parser.parse_args(argv)
    rows = [run_progress(run) for run in args.runs]
    for row in rows:
        print(f"{row['run']}: step {row['last_step']}, {row['median_step_ms']} ms/step")
    last = max(row.pop("last_wall_time") for row in rows)
    meta = {
        "commit": args.commit, "dirty": args.dirty,
        "date": _dt.datetime.fromtimestamp(last, _dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": args.cpu, "cores": args.cores, "torch": args.torch, "command": args.command,
        "load_before": None, "load_after": None, "note": args.note, "source": "the runs' TensorBoard events",
    }  # fmt: skip
    if args.gpu:
        meta["gpu"] = args.gpu
    out = RESULTS_DIR / f"{args.name}.json"  # not results.write_results: its load figures are this machine's
    out.write_text(json.dumps({"meta": meta, "results": {"runs": rows}}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
