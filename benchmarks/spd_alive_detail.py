"""Which components a finished toy-suite decomposition counts as alive, beyond one per feature, and how.

A component is alive when its CI exceeds the threshold (0.1) on some evaluated input. For each run of
`spd_toy_suite.py` (its last checkpoint), this evaluates fresh inputs from the run's own data settings and
splits each module's alive components into the features' own ones (the argmax component of each
single-feature input 0.75 e_j) and the others; for every other one it records on what fraction of the
inputs it fires, its largest CI, and how many features were on in the inputs it fired on. A run whose
extra components fire on a handful of many-feature inputs at a CI just above 0.1 has recovered the ground
truth and fails the exact alive count on rare interference; one whose features share components has not.

    python benchmarks/spd_alive_detail.py                  # every run under lightning_logs/spd_toy_suite
    python benchmarks/spd_alive_detail.py --runs tms_40-10_seed12 --examples 32768
    python benchmarks/spd_alive_detail.py --runs tms_40-10_seed12 --examples 1048576 --suffix _1M

Writes benchmarks/results/spd_alive_detail.json (merging runs into it); `python -m benchmarks.report`
renders the table in docs/spd.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS_DIR, run_metadata, write_results  # noqa: E402
from benchmarks.spd_toy_suite import run_dir  # noqa: E402
from datamodules.sparse_features import sparse_feature_batch  # noqa: E402
from lightning_modules.spd import SPDLightningModule  # noqa: E402
from lightning_modules.spd.metrics import single_feature_cis  # noqa: E402

RUNS_DIR = ROOT / "lightning_logs" / "spd_toy_suite" / "runs"
NAME = "spd_alive_detail"


def component_weight_norms(components: Any) -> Tensor:
    """|V[:, c] U[c, :]|_F = |V[:, c]| |U[c, :]| per component c (C,): how much of the weight each holds.
    A component can hold almost none (U near 0) while its CI input x V[:, c] is not small."""
    return components.V.norm(dim=0) * components.U.norm(dim=1)


@torch.no_grad()
def alive_detail(run: Path, examples: int, seed: int, threshold: float, chunk: int = 32768) -> dict[str, Any]:
    """Per module: alive count, the features' own components, and the other alive ones' firing. The inputs
    are drawn at once (the same sample for any chunk) and evaluated `chunk` at a time (memory)."""
    version = run_dir(run)
    config = yaml.safe_load((version / "config.yaml").read_text())
    data = config["data"]["init_args"]
    n_features = int(data["n_features"])
    module = SPDLightningModule.load_from_checkpoint(
        version / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    cm = module.build().eval()
    x = sparse_feature_batch(
        examples,
        n_features,
        float(data["feature_prob"]),
        torch.Generator().manual_seed(seed),
        value_range=tuple(data.get("value_range", (0.0, 1.0))),
    )
    n_on = (x != 0).sum(-1).float()
    fired: dict[str, Tensor] = {}  # per module and component: inputs with CI > threshold
    max_ci: dict[str, Tensor] = {}
    on_fired: dict[str, Tensor] = {}  # the features on, summed over those inputs
    for start in range(0, examples, chunk):
        xs, ns = x[start : start + chunk], n_on[start : start + chunk]
        ci = cm.calc_causal_importances(cm(xs, cache_acts=True).cache)[0]
        for name, c in ci.items():
            c = c.reshape(xs.shape[0], -1)
            fires = (c > threshold).float()  # (chunk, C)
            if name not in fired:
                fired[name], on_fired[name] = torch.zeros(c.shape[1]), torch.zeros(c.shape[1])
                max_ci[name] = torch.full((c.shape[1],), -torch.inf)
            fired[name] += fires.sum(0)
            on_fired[name] += ns @ fires
            max_ci[name] = torch.maximum(max_ci[name], c.amax(0))
    single = single_feature_cis(cm, n_features)
    modules = {}
    for name, count in fired.items():
        alive = count > 0
        own = set(single[name].argmax(-1).tolist())
        norms = component_weight_norms(cm.component(name))
        extra = [
            {
                "component": comp,
                "inputs": int(count[comp]),
                "rate": float(count[comp] / examples),
                "max_ci": float(max_ci[name][comp]),
                "mean_features_on": float(on_fired[name][comp] / count[comp]),
                "weight_norm": float(norms[comp]),
            }
            for comp in alive.nonzero().flatten().tolist()
            if comp not in own
        ]
        modules[name] = {
            "alive": int(alive.sum()),
            "features_own": len(own),
            "own_min_weight_norm": float(norms[sorted(own)].min()),
            "extra": extra,
        }
    return {
        "run": run.name,
        "global_step": json.loads((version / "spd_results.json").read_text())["global_step"],
        "examples": examples,
        "data_seed": seed,
        "threshold": threshold,
        "mean_features_on": float(n_on.mean()),
        "modules": modules,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", nargs="*", default=None, help="run directory names (default: all seeded runs)"
    )
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument(
        "--examples",
        type=int,
        default=32768,
        help="inputs evaluated (4x the suite's count: its 2 validation batches of 4096)",
    )
    parser.add_argument("--data-seed", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument(
        "--suffix", default="", help="appended to each run's row name (e.g. _1M for a larger sample)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.runs if args.runs else sorted(p.name for p in args.runs_dir.glob("*_seed*"))
    meta = run_metadata()
    out = args.out or RESULTS_DIR / f"{NAME}.json"
    rows = json.loads(out.read_text())["results"]["runs"] if out.exists() else {}
    for name in names:
        row = alive_detail(args.runs_dir / name, args.examples, args.data_seed, args.threshold)
        row["run"] = name + args.suffix
        rows[row["run"]] = row
        for module, m in row["modules"].items():
            worst = max((e["rate"] for e in m["extra"]), default=0.0)
            print(
                f"{row['run']} {module}: {m['alive']} alive, {m['features_own']} features' own, "
                f"{len(m['extra'])} others (max firing rate {worst:.1e})"
            )
    write_results(NAME, meta, {"runs": dict(sorted(rows.items()))}, out=out)


if __name__ == "__main__":
    main()
