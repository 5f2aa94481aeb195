"""Plot the committed benchmark results (benchmarks/results/*.json) as PNGs in docs/img/ for the docs.

One plot per results file of a plotted kind, named after it (docs/img/<stem>.png); each carries the line
saying where and how it was measured (`benchmarks.report.provenance`), so a copied plot stays citable.

    python -m benchmarks.plots            # (re)draw every plot
    python -m benchmarks.plots --check    # exit 1 naming each plot that is missing (PNG bytes vary with the
                                          # matplotlib version, so they are not compared)
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/plots.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from benchmarks.report import provenance  # noqa: E402
from benchmarks.results import REPO_ROOT, RESULTS_DIR  # noqa: E402
from lightning_modules.common.plotting import new_figure, save_png, spans_decades  # noqa: E402

IMG_DIR = REPO_ROOT / "docs" / "img"
Payload = dict[str, Any]


def _footnote(fig: Figure, meta: dict[str, Any]) -> None:
    """The provenance line under the plot, wrapped."""
    text = provenance(meta).replace("`", "")
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(text, 150)), fontsize=6, color="0.35", va="bottom")
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))


def plot_gpt_speed(payload: Payload) -> Figure:
    """Training tokens/s per architecture switch (median over rounds, whiskers: the rounds' range)."""
    r = payload["results"]
    rows = list(r["switches"].items())
    names = [name for name, _ in rows]
    median = np.array([row["tokens_per_s"] for _, row in rows])
    rounds = [row.get("all_rounds_tokens_per_s") or [row["tokens_per_s"]] for _, row in rows]
    low = median - np.array([min(x) for x in rounds])
    high = np.array([max(x) for x in rounds]) - median
    fig, ax = new_figure(size=(8.0, max(4.8, 1.4 + 0.35 * len(rows))))
    y = np.arange(len(rows))
    ax.barh(y, median, xerr=np.clip(np.vstack([low, high]), 0, None), color="tab:blue", capsize=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    base = r["switches"].get("baseline", {}).get("tokens_per_s")
    if base:
        ax.axvline(base, color="k", ls="--", lw=1, label=f"baseline {base:,.0f} tokens/s")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("training throughput (tokens/s; bar: median, whiskers: range over rounds)")
    ax.set_ylabel("variant (switch against the baseline)")
    setup, size = r["setup"], r["size"]
    ax.set_title(
        f"GPT training speed per variant\n{setup['device_type']}, {setup['precision']}, "
        f"{size['n_layer']} layers x {size['n_embd']} wide, batch {size['batch']} x {size['block_size']} tokens"
    )
    _footnote(fig, payload["meta"])
    return fig


def plot_muon_vs_adamw(payload: Payload) -> Figure:
    """Validation loss against training tokens for each optimizer arm."""
    r = payload["results"]
    fig, ax = new_figure(size=(8.0, 5.2))
    for arm in r["arms"]:
        tokens = np.array([v["tokens"] for v in arm["validations"]]) / 1e6
        loss = [v["val_loss"] for v in arm["validations"]]
        label = "AdamW" if arm["muon_lr"] is None else f"Muon lr {arm['muon_lr']:g} (+ AdamW)"
        ax.plot(tokens, loss, marker="o", ms=3, label=f"{label}: final {loss[-1]:.3f}")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8)
    ax.set_title(f"Muon against AdamW on {r['config']}: validation loss over {r['max_steps']} steps")
    _footnote(fig, payload["meta"])
    return fig


SPD_IMPLS = {
    "naive": "naive (hooks per call, einsum)",
    "ours": "ours",
    "ours_compile": "ours + torch.compile",
}


def plot_spd_speed(payload: Payload) -> Figure:
    """Training step time of the naive implementation, ours and ours compiled, one panel per config."""
    r = payload["results"]
    configs = list(r["configs"].items())
    fig, axes = new_figure(1, len(configs), size=(4.5 * len(configs), 4.8), squeeze=False)
    for ax, (name, row) in zip(axes.flat, configs):
        impls = [k for k in SPD_IMPLS if k in row]
        ms = [row[k]["step_ms"] for k in impls]
        x = np.arange(len(impls))
        ax.bar(x, ms, color=["tab:gray", "tab:blue", "tab:green"][: len(impls)])
        for xi, v in zip(x, ms):
            speedup = ms[0] / v if impls[0] == "naive" else float("nan")
            ax.annotate(f"{v:.1f} ms\n{speedup:.2f}x", (xi, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", fontsize=7)  # fmt: skip
        ax.set_xticks(x, [SPD_IMPLS[k] for k in impls], rotation=15, fontsize=8)
        ax.set_ylim(0, max(ms) * 1.25)
        ax.set_xlabel("implementation")
        ax.set_ylabel("training step time (ms, median)")
        ax.set_title(name)
    fig.suptitle(
        f"SPD training step: ours against a naive implementation ({r['device']}, {r['threads']} thread)"
    )
    _footnote(fig, payload["meta"])
    return fig


NPT_VARIANTS = {
    "dense": "dense u W^T\n(forward only)",
    "loop": "per-component loop",
    "batched": "batched einsum",
    "factored": "factored (ours)",
    "materialised": "materialised ΔW",
}


def plot_npt_component(payload: Payload) -> Figure:
    """Forward and forward+backward time of each way to compute u (W + ΔW) at the file's k·r (log time)."""
    r = payload["results"]
    variants = [k for k in NPT_VARIANTS if k in r["variants"]]
    fwd = [r["variants"][k]["fwd_ms"] for k in variants]
    both = [r["variants"][k]["fwd_bwd_ms"] for k in variants]
    fig, ax = new_figure(size=(8.0, 4.8))
    x = np.arange(len(variants))
    ax.bar(x - 0.2, fwd, width=0.4, label="forward", color="tab:blue")
    ax.bar(x + 0.2, [v if v is not None else 0 for v in both], width=0.4, label="forward + backward",
           color="tab:orange")  # fmt: skip
    if spans_decades([*fwd, *(v for v in both if v)], 1.0):
        ax.set_yscale("log")
    ax.set_xticks(x, [NPT_VARIANTS[k] for k in variants], rotation=15)
    ax.set_xlabel("way of computing the modulated projection")
    ax.set_ylabel("time (ms, median" + (", log scale)" if ax.get_yscale() == "log" else ")"))
    ax.legend(fontsize=8)
    kr = r["k"] * r["r"]
    ax.set_title(
        f"NPT component cost at k·r = {r['k']}·{r['r']} = {kr} (d {r['d']}, f {r['f']}, "
        f"{r['batch']} x {r['seq']} tokens, {r['device']})"
    )
    _footnote(fig, payload["meta"])
    return fig


NPT_SWEEP_COLOURS = {
    "loop": "tab:red",
    "batched": "tab:purple",
    "factored": "tab:blue",
    "materialised": "tab:gray",
}
NPT_SWEEP_MARKERS = ("o", "s", "^", "D", "v")


def plot_npt_component_sweep(payload: Payload) -> Figure:
    """Forward+backward time against k·r, log-log: colour is the form, marker (one line each) the rank r."""
    r = payload["results"]
    ranks = sorted({p["r"] for p in r["points"]})
    ks = sorted({p["k"] for p in r["points"]})
    fig, ax = new_figure(size=(8.0, 5.4))
    for form in r["variants"]:
        colour = NPT_SWEEP_COLOURS.get(form)
        for rank, marker in zip(ranks, NPT_SWEEP_MARKERS):
            pts = sorted((p for p in r["points"] if p["r"] == rank), key=lambda p: p["kr"])
            ax.plot([p["kr"] for p in pts], [p[f"{form}_fwd_bwd_ms"] for p in pts], color=colour,
                    marker=marker, ms=4, lw=1.2, alpha=0.9)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    krs = sorted({p["kr"] for p in r["points"]})
    ax.set_xticks(krs, [str(x) for x in krs])
    ax.minorticks_off()
    forms = [
        Line2D([], [], color=NPT_SWEEP_COLOURS.get(f), lw=2, label=NPT_VARIANTS[f].replace("\n", " "))
        for f in r["variants"]
    ]
    marks = [
        Line2D(
            [],
            [],
            color="k",
            ls="",
            marker=m,
            label=f"r = {rank} (k = {', '.join(map(str, ks))} along the line)",
        )
        for rank, m in zip(ranks, NPT_SWEEP_MARKERS)
    ]
    ax.legend(handles=forms + marks, fontsize=8, loc="best")
    ax.set_xlabel("k·r (components x rank, log scale)")
    ax.set_ylabel("forward + backward time (ms, median, log scale)")
    ax.set_title(
        f"NPT component cost against k·r (d {r['d']}, f {r['f']}, {r['batch']} x {r['seq']} tokens, "
        f"{r['device']}, {r['threads']} thread)"
    )
    _footnote(fig, payload["meta"])
    return fig


PLOTTERS: dict[str, Callable[[Payload], Figure]] = {
    "gpt_speed": plot_gpt_speed,
    "muon_vs_adamw": plot_muon_vs_adamw,
    "spd_speed": plot_spd_speed,
    "npt_component": plot_npt_component,
    "npt_component_sweep": plot_npt_component_sweep,
}


def plotted(results_dir: Path = RESULTS_DIR) -> dict[str, Callable[[Payload], Figure]]:
    """{results stem: plotter} for every results file of a plotted kind (the longest kind its stem starts
    with, so npt_component_sweep_cpu is a sweep, not an npt_component result)."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        kinds = [k for k in PLOTTERS if path.stem == k or path.stem.startswith(k + "_")]
        if kinds:
            out[path.stem] = PLOTTERS[max(kinds, key=len)]
    return out


def draw_all(results_dir: Path = RESULTS_DIR, out_dir: Path = IMG_DIR) -> list[Path]:
    """Draw every plot into out_dir; returns the paths written."""
    paths = []
    for stem, plotter in plotted(results_dir).items():
        payload = json.loads((results_dir / f"{stem}.json").read_text())
        paths.append(save_png(plotter(payload), out_dir / f"{stem}.png"))
    return paths


def missing(results_dir: Path = RESULTS_DIR, out_dir: Path = IMG_DIR) -> list[Path]:
    """The plots that should exist and do not."""
    return [
        out_dir / f"{stem}.png" for stem in plotted(results_dir) if not (out_dir / f"{stem}.png").is_file()
    ]


def main(argv: list[str] | None = None) -> int:
    """Draw (or with --check, check the presence of) every plot; 1 when one is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="draw nothing; fail on a missing plot")
    parser.add_argument("--out", type=Path, default=IMG_DIR, help="output directory (default docs/img)")
    args = parser.parse_args(argv)
    if args.check:
        absent = missing(out_dir=args.out)
        for path in absent:
            print(f"missing plot {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
        return 1 if absent else 0
    for path in draw_all(out_dir=args.out):
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
