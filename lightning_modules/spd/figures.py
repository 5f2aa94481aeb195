"""SPD figures (matplotlib): CI histograms, component activation density, single-feature CIs, feature
cosines, the TMS plane picture, and for language models L0 per module and the CE / KL of each mask type.

`spd_figures` returns {tag: Figure}; the module logs them at every validation and at the end of fit, where
they are also written as PNGs under `figures/` beside `spd_results.json`. Re-render a finished run from
its last checkpoint, without training:

    python -m lightning_modules.spd.figures lightning_logs/version_0 [--out DIR] [--batches N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from lightning_modules.common.plotting import heatmap, new_figure, save_figures, spans_decades
from lightning_modules.common.runs import datamodule_from_config, first_val_batches

from .component_model import ComponentModel
from .metrics import feature_component_cosines, feature_space, identity_permutation, single_feature_cis

MASK_KINDS = ("unmasked", "ci_masked", "rounded", "stochastic", "zero")  # eval_batch's mask types


def _step(step: int | None) -> str:
    return "" if step is None else f" (step {step})"


def ci_histogram_figure(name: str, counts: Tensor, step: int | None = None) -> Figure:
    """Counts of causal-importance values in equal bins over [0, 1], log count axis (CIs pile up at 0)."""
    c = counts.detach().double().cpu().numpy()
    edges = np.linspace(0.0, 1.0, len(c) + 1)
    fig, ax = new_figure()
    ax.bar(edges[:-1], c, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white", lw=0.3)
    if (c > 0).any():
        ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("causal importance (the CI the masks use)")
    ax.set_ylabel("count over validation inputs and components (log scale)")
    ax.set_title(f"CI histogram: {name}{_step(step)}")
    return fig


def component_density_figure(name: str, density: Tensor, threshold: float, step: int | None = None) -> Figure:
    """Fraction of validation inputs on which each component has CI > threshold, components sorted by it."""
    d = density.detach().double().cpu()
    order = torch.argsort(d, descending=True, stable=True)
    values = d[order].numpy()
    fig, ax = new_figure()
    x = np.arange(len(values))
    if len(values) <= 100:
        ax.bar(x, values, width=0.9, color="tab:green")
    else:  # thousands of bars draw slowly and unreadably: a filled step curve shows the same
        ax.fill_between(x, values, step="mid", color="tab:green", lw=0)
    if spans_decades(values):
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(1e-3, float(values.max(initial=0.0)) * 1.05))
    if len(values) <= 40:
        ax.set_xticks(np.arange(len(values)), [str(i) for i in order.tolist()], fontsize=8)
        ax.set_xlabel("component index (sorted by density)")
    else:
        ax.set_xlabel(f"component rank by density (of {len(values)})")
    ax.set_ylabel(f"fraction of inputs with CI > {threshold:g}")
    alive = int((d > 0).sum())
    ax.set_title(f"Component activation density: {name}{_step(step)}; {alive} of {len(values)} alive")
    return fig


def single_feature_ci_figure(name: str, ci: Tensor, step: int | None = None) -> Figure:
    """(n_features, C) CIs of one-hot inputs, columns permuted so the best assignment is the diagonal."""
    n_f, C = ci.shape
    cols = identity_permutation(ci).tolist() if n_f <= C else list(range(C))
    fig, ax = new_figure(size=(max(6.4, 2.5 + 0.25 * C), max(4.8, 1.5 + 0.25 * n_f)))
    heatmap(
        ax,
        ci[:, cols].detach().float().cpu().numpy(),
        vmin=0.0,
        vmax=1.0,
        cmap="Blues",
        xlabels=[str(c) for c in cols],
        ylabels=[str(j) for j in range(n_f)],
        colorbar_label="causal importance (0 to 1)",
    )
    ax.set_xlabel("component index (permuted to the identity)")
    ax.set_ylabel("input feature (one-hot, value 0.75)")
    ax.set_title(f"Single-feature CIs: {name}{_step(step)}")
    return fig


def feature_cosine_figure(name: str, cos: Tensor, step: int | None = None) -> Figure:
    """(n_features, C) cosine of each component's column V[j, c] U[c] with the target's feature column."""
    n_f, C = cos.shape
    cols = identity_permutation(cos.abs()).tolist() if n_f <= C else list(range(C))
    fig, ax = new_figure(size=(max(6.4, 2.5 + 0.25 * C), max(4.8, 1.5 + 0.25 * n_f)))
    heatmap(
        ax,
        cos[:, cols].detach().float().cpu().numpy(),
        vmin=-1.0,
        vmax=1.0,
        cmap="RdBu_r",
        xlabels=[str(c) for c in cols],
        ylabels=[str(j) for j in range(n_f)],
        colorbar_label="cosine similarity (-1 to 1)",
    )
    ax.set_xlabel("component index (permuted to the identity)")
    ax.set_ylabel("target feature")
    ax.set_title(f"Component vs target feature cosines: {name}{_step(step)}")
    return fig


def tms_plane_figure(
    name: str, W: Tensor, V: Tensor, U: Tensor, ci: Tensor, step: int | None = None
) -> Figure:
    """The paper's TMS picture for 2 hidden dimensions: each feature's target direction W[:, j] (solid) and
    the column V[j, c] U[c] of the component c with the largest single-feature CI for feature j (dashed).

    W (2, n_features), V (n_features, C), U (C, 2) in feature space (metrics.feature_space); ci
    (n_features, C) single-feature CIs."""
    W, V, U = W.detach().float().cpu(), V.detach().float().cpu(), U.detach().float().cpu()
    n_f = W.shape[1]
    picked = ci.detach().float().cpu().argmax(1)  # (n_features,)
    fig, ax = new_figure(size=(6.4, 6.4))
    colours = [f"C{j % 10}" for j in range(n_f)]
    reach = float(W.norm(dim=0).max().clamp_min(1e-6))
    for j in range(n_f):
        c = int(picked[j])
        comp = V[j, c] * U[c]  # (2,)
        reach = max(reach, float(comp.norm()))
        ax.plot([0, W[0, j]], [0, W[1, j]], color=colours[j], lw=6, alpha=0.35, solid_capstyle="round")
        ax.plot([0, comp[0]], [0, comp[1]], color=colours[j], lw=1.8, ls="--", marker="o", ms=4)
        ax.annotate(f"f{j}", (float(W[0, j]), float(W[1, j])), color=colours[j], fontsize=9,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.annotate(f"c{c}", (float(comp[0]), float(comp[1])), color=colours[j], fontsize=8,
                    xytext=(4, -10), textcoords="offset points")  # fmt: skip
    lim = 1.15 * reach
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel("hidden dimension 1 (weight units)")
    ax.set_ylabel("hidden dimension 2 (weight units)")
    handles = [
        Line2D([], [], color="0.3", lw=6, alpha=0.35, label="target feature direction W[:, j] (fj)"),
        Line2D([], [], color="0.3", lw=1.5, ls="--", marker="o", ms=4,
               label="component with the top CI for feature j: V[j, c] U[c] (cc)"),
    ]  # fmt: skip
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    ax.set_title(f"TMS features and recovered components: {name}{_step(step)}")
    return fig


def l0_figure(l0: Mapping[str, float], module_to_c: Mapping[str, int], step: int | None = None) -> Figure:
    """Mean number of active components (CI > 0) per token for each decomposed module, horizontal bars."""
    names = list(l0)
    values = np.array([l0[n] for n in names], dtype=np.float64)
    fig, ax = new_figure(size=(8.0, max(4.8, 1.2 + 0.3 * len(names))))
    y = np.arange(len(names))
    ax.barh(y, values, color="tab:purple")
    ax.set_yticks(y, [f"{n} (C={module_to_c.get(n, '?')})" for n in names], fontsize=8)
    ax.invert_yaxis()  # model order, top to bottom
    if spans_decades(values):
        ax.set_xscale("log")
    for yi, v in zip(y, values):
        ax.annotate(f"{v:.3g}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xlabel("L0: mean number of components with CI > 0 per token")
    ax.set_ylabel("decomposed module")
    ax.set_title(f"L0 per module{_step(step)}")
    return fig


def lm_mask_figure(metrics: Mapping[str, float], step: int | None = None) -> Figure:
    """CE against the labels (points, the target's CE as a line) and KL to the target (bars, log axis when
    they span decades) for each mask type."""
    kinds = [k for k in MASK_KINDS if f"lm/ce_{k}" in metrics]
    ce = [float(metrics[f"lm/ce_{k}"]) for k in kinds]
    kl = [float(metrics.get(f"lm/kl_{k}", float("nan"))) for k in kinds]
    fig, (ax_ce, ax_kl) = new_figure(1, 2, size=(10.0, 4.8))
    x = np.arange(len(kinds))
    ax_ce.plot(x, ce, "o", color="tab:orange", ms=8)  # points, not bars: CEs differ far from zero
    if "lm/ce_target" in metrics:
        ax_ce.axhline(float(metrics["lm/ce_target"]), color="k", ls="--", lw=1,
                      label=f"target {metrics['lm/ce_target']:.3f}")  # fmt: skip
        ax_ce.legend(fontsize=8)
    ax_kl.bar(x, kl, color="tab:red")
    if spans_decades(kl):
        ax_kl.set_yscale("log")
    for ax, vals in ((ax_ce, ce), (ax_kl, kl)):
        ax.set_xticks(x, kinds, rotation=20)
        ax.set_xlabel("masks")
        for xi, v in zip(x, vals):
            ax.annotate(
                f"{v:.4g}", (xi, v), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=7
            )
    ax_ce.margins(x=0.15, y=0.2)
    ax_ce.set_ylabel("cross-entropy vs labels (nats/token)")
    ax_kl.set_ylabel("KL(target || masked) (nats/token)")
    ax_ce.set_title("CE per mask type")
    ax_kl.set_title("KL to the target per mask type")
    fig.suptitle(f"Language-model reconstruction by mask type{_step(step)}")
    return fig


@torch.no_grad()
def toy_figures(model: ComponentModel, step: int | None = None) -> dict[str, Figure]:
    """Single-feature CI and feature-cosine heatmaps per module, the plane picture where the target has 2
    hidden dimensions along a feature axis (TMS n_hidden 2)."""
    n_f = int(model.target_model.n_features)
    cis = single_feature_cis(model, n_f)
    figures: dict[str, Figure] = {}
    for name in model.module_names:
        ci = cis[name].cpu()  # (n_features, C)
        figures[f"single_feature_ci/{name}"] = single_feature_ci_figure(name, ci, step)
        comp = model.component(name)
        fs = feature_space(model.target_model, model.target_weight(name), comp.V, comp.U)
        if fs is None:
            continue
        figures[f"feature_cosine/{name}"] = feature_cosine_figure(
            name, feature_component_cosines(*fs).cpu(), step
        )
        if fs[0].shape[0] == 2:
            figures[f"tms_plane/{name}"] = tms_plane_figure(name, *fs, ci, step)
    return figures


def spd_figures(
    model: ComponentModel,
    hist: Mapping[str, Tensor] | None,
    density: Mapping[str, Tensor] | None,
    metrics: Mapping[str, float],
    alive_threshold: float,
    step: int | None = None,
) -> dict[str, Figure]:
    """{tag: Figure} for one evaluation: per module the CI histogram and activation density (when
    validation data was seen), toy heatmaps / plane, and for LMs L0 per module and CE / KL per mask type."""
    figures: dict[str, Figure] = {}
    for name in model.module_names:
        if hist is not None and name in hist:
            figures[f"ci_histogram/{name}"] = ci_histogram_figure(name, hist[name], step)
        if density is not None and name in density:
            figures[f"component_density/{name}"] = component_density_figure(
                name, density[name], alive_threshold, step
            )
    if hasattr(model.target_model, "n_features"):
        figures.update(toy_figures(model, step))
    l0 = {n: metrics[f"l0_ci_gt_0/{n}"] for n in model.module_names if f"l0_ci_gt_0/{n}" in metrics}
    if l0 and any(k.startswith("lm/") for k in metrics):
        figures["l0"] = l0_figure(l0, model.module_to_c, step)
    if any(k.startswith("lm/ce_") for k in metrics):
        figures["lm_masks"] = lm_mask_figure(metrics, step)
    return figures


# ----------------------------------------------------------------------------- re-rendering a finished run
def rerender(
    run: Path, out: Path | None = None, batches: int | None = None, ckpt: Path | None = None
) -> list[Path]:
    """Load the run's checkpoint, evaluate up to `batches` validation batches of its data (from its
    config.yaml; none: the data-free figures only) and write every figure as a PNG; returns the paths."""
    from .module import SPDLightningModule

    ckpt = ckpt or run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        found = sorted((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
        raise FileNotFoundError(f"no checkpoint {str(ckpt)!r}; found: {[str(p) for p in found] or 'none'}")
    module = SPDLightningModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    module.eval()
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
    module.build()
    module._open_eval()  # the model, or each member's one-member copy
    config = run / "config.yaml"
    datamodule = datamodule_from_config(config) if config.is_file() else None
    n_batches = batches if batches is not None else module.eval_cfg.final_eval_batches
    if datamodule is not None:
        for batch in first_val_batches(datamodule, n_batches):
            module._eval_step(batch)
    else:
        print(
            f"{run}: no config.yaml with a data section; drawing the figures that need no data",
            file=sys.stderr,
        )
    paths = []
    for seed, cm, acc in module._evals:  # a member's figures where its run would write them
        seen = acc.n_examples > 0
        metrics = module._summary(cm, acc)[0] if seen else {}
        figures = spd_figures(
            cm,
            acc.hist if seen else None,
            acc.density() if seen else None,
            metrics,
            module.eval_cfg.ci_alive_threshold,
            step,
        )
        folder = out or run
        folder = folder if seed is None else folder / "members" / f"seed_{seed}"
        paths += save_figures(figures, folder / "figures" if out is None else folder)
    module._close_eval()
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: re-render a finished SPD run's figures as PNGs."""
    parser = argparse.ArgumentParser(
        description="Re-render a finished SPD run's figures as PNGs from its checkpoint, without training."
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (holds checkpoints/ and config.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/figures)")
    parser.add_argument(
        "--ckpt", type=Path, default=None, help="checkpoint (default RUN_DIR/checkpoints/last.ckpt)"
    )
    parser.add_argument(
        "--batches", type=int, default=None, help="validation batches (default: final_eval_batches)"
    )
    args = parser.parse_args(argv)
    try:
        paths = rerender(args.run_dir, args.out, args.batches, args.ckpt)
    except (FileNotFoundError, ValueError) as err:  # a user error: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
