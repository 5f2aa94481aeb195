"""Figures as uint8 image tensors (3, H, W) for TensorBoard's add_image, without matplotlib.

Heatmaps: [0, 1] values white -> dark blue; signed values blue (-1) / white (0) / red (+1). Bar charts
are dark bars on white. No axes or text: the TensorBoard tag names what is shown.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BLUE = torch.tensor([0.13, 0.27, 0.62])
_RED = torch.tensor([0.75, 0.15, 0.15])
_WHITE = torch.ones(3)
_GRID = 0.85  # gridline grey


def _to_uint8(rgb: Tensor) -> Tensor:
    """(H, W, 3) floats in [0, 1] -> (3, H, W) uint8."""
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(2, 0, 1).contiguous()


def heatmap(values: Tensor, signed: bool = False, cell: int | None = None, max_side: int = 640) -> Tensor:
    """(rows, cols) matrix -> (3, H, W) uint8; cells of `cell` px (default: fit max_side), 1 px grid."""
    v = values.detach().float().cpu()
    if v.dim() == 1:
        v = v[None]
    rows, cols = v.shape
    cell = cell or max(2, min(24, max_side // max(rows, cols)))
    if signed:
        scale = v.abs().max().clamp_min(1e-12)
        t = (v / scale).clamp(-1, 1)[..., None]  # (rows, cols, 1)
        rgb = torch.where(t >= 0, _WHITE + t * (_RED - _WHITE), _WHITE - t * (_BLUE - _WHITE))
    else:
        t = v.clamp(0, 1)[..., None]
        rgb = _WHITE + t * (_BLUE - _WHITE)  # (rows, cols, 3)
    img = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # (rows*cell, cols*cell, 3)
    if cell >= 4:  # gridlines between cells
        img[::cell, :, :] = _GRID
        img[:, ::cell, :] = _GRID
    return _to_uint8(img)


def bar_chart(values: Tensor, height: int = 120, bar_width: int | None = None, log: bool = False) -> Tensor:
    """(n,) non-negative values -> (3, height, n * bar_width) uint8 bar chart (log1p scale if log)."""
    v = values.detach().double().cpu().clamp_min(0)
    if log:
        v = torch.log1p(v)
    n = v.numel()
    bar_width = bar_width or max(2, min(16, 640 // max(1, n)))
    top = v.max().item()
    heights = (v / top * (height - 2)).round().long() if top > 0 else torch.zeros(n, dtype=torch.long)
    rows = torch.arange(height)[:, None]  # (height, 1)
    filled = rows >= (height - heights)[None, :]  # (height, n): bars grow from the bottom
    img = torch.where(filled[..., None], _BLUE, _WHITE).float()  # (height, n, 3)
    img = img.repeat_interleave(bar_width, 1)
    if bar_width >= 4:
        img[:, ::bar_width, :] = _WHITE  # gaps between bars
    img[-1, :, :] = 0.0  # baseline
    return _to_uint8(img)


def spd_figures(
    module_names: list[str],
    hist: dict[str, Tensor],
    density: dict[str, Tensor],
    mats: dict[str, dict[str, Tensor]],
) -> dict[str, Tensor]:
    """{tag: image}: CI histograms (log counts), component activation density (sorted), and for toys the
    single-feature CIs and component-vs-feature cosines (both permuted towards the identity)."""
    images = {}
    for name in module_names:
        images[f"ci_histogram/{name}"] = bar_chart(hist[name], log=True)
        images[f"component_density/{name}"] = bar_chart(density[name].sort(descending=True).values)
        for kind, mat in mats.get(name, {}).items():
            images[f"{kind}/{name}"] = heatmap(mat, signed=kind == "feature_cosine")
    return images
