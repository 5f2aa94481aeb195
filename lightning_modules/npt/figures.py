"""NPT figures (matplotlib): per-layer equivalence error and the three perplexities over training, and the
per-token modulation norms of each converted layer.

The history is the module's `val_history` ({"equiv_rel/layer3": [(step, value), ...], "ppl_npt": ...}),
also stored under "history" in `npt_results.json`. Re-render a finished run:

    python -m lightning_modules.npt.figures lightning_logs/version_0 [--out DIR] [--norms]

`--norms` also loads the run's last checkpoint and target, runs one validation batch of its data (from
config.yaml) and draws the modulation-norm histograms: cheap for small targets, a full model load for big
ones, hence opt-in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_modules.common.plotting import new_figure, save_figures, spans_decades
from lightning_modules.common.runs import datamodule_from_config, first_val_batches

History = Mapping[str, Sequence[Sequence[float]]]  # name -> [(step, value), ...]
PPL_LABELS = {
    "ppl_original": "original model",
    "ppl_npt": "NPT (converted layers free-running)",
    "ppl_attention_dropped": "converted layers' attention dropped",
}
_LAYER = re.compile(r"^equiv_rel/layer(\d+)$")


def _xy(points: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray([(float(s), float(v)) for s, v in points], dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def equivalence_error_figure(history: History, step: int | None = None) -> Figure:
    """Per-layer relative equivalence error mean((y - t)²) / mean((t - h)²) over training steps, log y."""
    layers = sorted((int(m[1]), key) for key in history if (m := _LAYER.match(key)))
    fig, ax = new_figure(size=(8.0, 4.8))
    for i, key in layers:
        x, y = _xy(history[key])
        ax.plot(x, y, marker="o", ms=3, label=f"layer {i}")
    if "equiv_rel" in history:
        x, y = _xy(history["equiv_rel"])
        ax.plot(x, y, color="k", ls="--", lw=1.5, label="mean over layers")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("equivalence error / layer update (log scale)")
    if layers or "equiv_rel" in history:
        ax.legend(fontsize=8, ncol=2 if len(layers) > 8 else 1)
    at = "" if step is None else f" (to step {step})"
    ax.set_title(f"NPT equivalence error per layer, mean((y-t)²) / mean((t-h)²){at}")
    return fig


def perplexity_figure(history: History, step: int | None = None) -> Figure:
    """Validation perplexity of the original model, the NPT model and the attention-dropped model over
    training steps; log y when they span decades (dropping attention can cost orders of magnitude)."""
    fig, ax = new_figure(size=(8.0, 4.8))
    values: list[float] = []
    for key, label in PPL_LABELS.items():
        if key in history:
            x, y = _xy(history[key])
            values.extend(y.tolist())
            ax.plot(x, y, marker="o", ms=3, label=label, ls="--" if key != "ppl_npt" else "-")
    if spans_decades(values, 1.0):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    if values:
        ax.legend(fontsize=8)
    at = "" if step is None else f" (to step {step})"
    ax.set_title(f"NPT perplexity over training{at}")
    return fig


def modulation_norm_figure(norms: Mapping[int, Tensor], bins: int = 50, step: int | None = None) -> Figure:
    """Histogram per converted layer of the per-token norm of the attention's modulation (step outlines
    on shared bins; log-spaced bins when the norms span decades)."""
    flat = {i: n.detach().float().flatten().cpu().numpy() for i, n in sorted(norms.items())}
    everything = np.concatenate(list(flat.values())) if flat else np.zeros(1)
    positive = everything[everything > 0]
    log_x = spans_decades(positive.tolist()[:100_000]) if positive.size else False
    if log_x:
        edges = np.geomspace(positive.min(), positive.max(), bins + 1)
    else:
        edges = np.linspace(float(everything.min()), float(everything.max()) + 1e-12, bins + 1)
    fig, ax = new_figure(size=(8.0, 4.8))
    for i, values in flat.items():
        ax.hist(
            values, bins=edges, histtype="step", lw=1.5, label=f"layer {i} (median {np.median(values):.3g})"
        )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("per-token modulation norm ||u ΔW||" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("tokens (count)")
    if flat:
        ax.legend(fontsize=8)
    at = "" if step is None else f" (step {step})"
    ax.set_title(f"NPT modulation norm per token and layer{at}")
    return fig


def history_figures(history: History, step: int | None = None) -> dict[str, Figure]:
    """{tag: Figure} of the figures a history alone gives."""
    return {
        "equivalence_error": equivalence_error_figure(history, step),
        "perplexity": perplexity_figure(history, step),
    }


def norm_figure_from_checkpoint(run: Path, ckpt: Path | None = None) -> Figure:
    """Load the run's checkpoint (and its target), take one validation batch of its data and draw the
    modulation-norm histograms."""
    from .module import NPTLightningModule

    ckpt = ckpt or run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint {str(ckpt)!r} (give --ckpt)")
    config = run / "config.yaml"
    datamodule = datamodule_from_config(config) if config.is_file() else None
    if datamodule is None:
        raise FileNotFoundError(f"{str(config)!r} with a data section is needed for the modulation norms")
    module = NPTLightningModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    module.eval()
    (batch,) = first_val_batches(datamodule, 1)
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
    return modulation_norm_figure(module.modulation_norms(batch[0]), step=step)


def rerender(run: Path, out: Path | None = None, norms: bool = False, ckpt: Path | None = None) -> list[Path]:
    """Draw a finished run's figures from RUN_DIR/npt_results.json (and, with norms, its checkpoint)."""
    results_path = run / "npt_results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"no {str(results_path)!r}: it is written at the end of fit")
    results: dict[str, Any] = json.loads(results_path.read_text())
    figures = history_figures(results.get("history", {}), results.get("global_step"))
    if norms:
        figures["modulation_norm"] = norm_figure_from_checkpoint(run, ckpt)
    return save_figures(figures, out or run / "figures")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: re-render a finished NPT run's figures as PNGs."""
    parser = argparse.ArgumentParser(
        description="Re-render a finished NPT run's figures as PNGs from its npt_results.json (and checkpoint)."
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (holds npt_results.json)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/figures)")
    parser.add_argument("--norms", action="store_true", help="also the modulation norms (loads the model)")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint for --norms (default last.ckpt)")
    args = parser.parse_args(argv)
    try:
        paths = rerender(args.run_dir, args.out, args.norms, args.ckpt)
    except (FileNotFoundError, ValueError) as err:  # a user error: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if not args.norms:
        print("modulation norms: not drawn (they need the model; add --norms)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
