"""SPD evaluation metrics: L0, alive components, MMCS / ML2R, identity-CI error, single-feature CIs."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .component_model import ComponentModel


def ci_l0(ci: dict[str, Tensor], threshold: float = 0.0) -> dict[str, float]:
    """Per module: mean over batch/positions of the number of components with ci > threshold."""
    return {name: (c > threshold).sum(-1).float().mean().item() for name, c in ci.items()}


class AliveComponentsTracker:
    """Tracks, over batches, which components had ci > threshold on some input."""

    def __init__(self, module_to_c: dict[str, int], threshold: float = 0.1) -> None:
        self.threshold = threshold
        self.module_to_c = dict(module_to_c)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen."""
        self.alive: dict[str, Tensor] = {
            n: torch.zeros(C, dtype=torch.bool) for n, C in self.module_to_c.items()
        }

    @torch.no_grad()
    def update(self, ci: dict[str, Tensor]) -> None:
        """OR in the components active (ci > threshold) anywhere in this batch."""
        for name, c in ci.items():
            seen = (c > self.threshold).flatten(0, -2).any(0).cpu()  # (C,)
            self.alive[name] = self.alive[name] | seen

    def n_alive(self) -> dict[str, int]:
        """Number of alive components per module."""
        return {name: int(a.sum()) for name, a in self.alive.items()}


@torch.no_grad()
def mmcs_ml2r(
    target_weight: Tensor, V: Tensor, U: Tensor, select: Literal["cosine", "norm"] = "cosine"
) -> tuple[float, float]:
    """(MMCS, ML2R) of target columns W[:, j] (W (d_out, d_in)) against component columns V[j, c] U[c].

    For each input feature j one component c_j is picked. 'cosine' is the paper's definition (and the
    reference's TMS analysis): c_j maximises the cosine of V[j, c] U[c] with W[:, j], so MMCS =
    mean_j max_c cos. 'norm' picks the largest |V[j, c]| ||U[c]|| instead (the component that carries
    feature j, not one that happens to point its way). ML2R = mean_j ||V[j, c_j] U[c_j]|| / ||W[:, j]||.
    """
    W = target_weight.float()  # (d_out, d_in)
    V, U = V.float(), U.float()  # (d_in, C), (C, d_out)
    w_norm = W.norm(dim=0).clamp_min(1e-12)  # (d_in,)
    u_norm = U.norm(dim=1).clamp_min(1e-12)  # (C,)
    col_norm = V.abs() * u_norm  # (d_in, C): ||V[j, c] U[c]||
    cos = V.sign() * (W.t() @ U.t()) / (w_norm[:, None] * u_norm[None, :])  # (d_in, C)
    pick = col_norm.argmax(1) if select == "norm" else cos.argmax(1)  # (d_in,)
    idx = torch.arange(W.shape[1])
    return cos[idx, pick].mean().item(), (col_norm[idx, pick] / w_norm).mean().item()


def linear_sum_assignment_max(score: np.ndarray) -> np.ndarray:
    """Column assigned to each row maximising the total score (rows <= cols), Hungarian algorithm.

    Shortest-augmenting-path form with row/column potentials, O(rows^2 cols), the inner scan over
    columns vectorised with numpy.
    """
    cost = -np.asarray(score, dtype=np.float64)  # minimise
    n, m = cost.shape
    if n > m:
        raise ValueError(f"need rows <= cols, got {cost.shape}")
    u = np.zeros(n + 1)  # row potentials (1-based, 0 = virtual)
    v = np.zeros(m + 1)  # column potentials
    match = np.zeros(m + 1, dtype=np.int64)  # match[col] = row (1-based), 0 = free
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        way = np.zeros(m + 1, dtype=np.int64)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # (m,)
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(masked.argmin()) + 1
            delta = masked[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # augment along the alternating path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    rows_to_col = np.zeros(n, dtype=np.int64)
    for j in range(1, m + 1):
        if match[j]:
            rows_to_col[match[j] - 1] = j - 1
    return rows_to_col


def identity_permutation(score: Tensor) -> Tensor:
    """Column order (C,) putting the best assignment of score (n_features, C >= n_features) on the diagonal."""
    cols = linear_sum_assignment_max(score.detach().float().cpu().numpy()).tolist()
    chosen = set(cols)
    return torch.tensor([*cols, *(c for c in range(score.shape[1]) if c not in chosen)], device=score.device)


def permute_to_identity(ci: Tensor) -> Tensor:
    """Reorder the columns of ci (n_features, C >= n_features) so that the diagonal sum is maximal."""
    return ci[:, identity_permutation(ci)]


def identity_ci_error(ci: Tensor, tolerance: float = 0.1) -> int:
    """After the best permutation: # off-diagonal entries > tol plus # diagonal entries < 1 - tol."""
    n, C = ci.shape
    if n > C:
        raise ValueError(f"need at least as many components as features, got ci of shape {tuple(ci.shape)}")
    p = permute_to_identity(ci)
    off = torch.ones_like(p, dtype=torch.bool)
    off[:, :n].fill_diagonal_(False)
    return int((p[off] > tolerance).sum() + (p[:, :n].diagonal() < 1 - tolerance).sum())


@torch.no_grad()
def single_feature_cis(
    model: ComponentModel, n_features: int, input_magnitude: float = 0.75
) -> dict[str, Tensor]:
    """ci_lower per module on the one-hot inputs input_magnitude * e_j: {name: (n_features, C)}."""
    device = next(model.parameters()).device
    x = input_magnitude * torch.eye(n_features, device=device)
    acts = model(x, cache_acts=True).cache
    ci_lower, _ = model.calc_causal_importances(acts)
    return ci_lower


def identity_ci_errors(
    model: ComponentModel, n_features: int, module_names: Iterable[str] | None = None
) -> dict[str, int]:
    """identity_ci_error of the single-feature CI matrix of each (given) module."""
    cis = single_feature_cis(model, n_features)
    names = list(module_names) if module_names is not None else list(cis)
    return {name: identity_ci_error(cis[name]) for name in names}


def ce_unrecovered(ce: float, ce_target: float, ce_zero: float) -> float:
    """(ce - ce_target) / (ce_zero - ce_target): 0 = as good as the target, 1 = as bad as zero masks."""
    return (ce - ce_target) / (ce_zero - ce_target)


# --------------------------------------------------------------------- toy-model reports
def feature_component_cosines(W: Tensor, V: Tensor, U: Tensor) -> Tensor:
    """(n_features, C): cosine of component column V[j, c] U[c] with the target column W[:, j]."""
    W, V, U = W.float(), V.float(), U.float()
    w_norm = W.norm(dim=0).clamp_min(1e-12)  # (n_features,)
    u_norm = U.norm(dim=1).clamp_min(1e-12)  # (C,)
    return V.sign() * (W.t() @ U.t()) / (w_norm[:, None] * u_norm[None, :])


def feature_space(
    target: nn.Module, weight: Tensor, V: Tensor, U: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(W', V', U') with the toy's true features as W' columns and V' rows, or None if there is no
    feature axis: the input (TMS linear1), the output (TMS linear2: transposed), or the residual stream
    read through the fixed embedding W_E (ResidMLP mlp_in: W W_E^T, W_E V)."""
    n_f = int(target.n_features)
    d_out, d_in = weight.shape
    if d_in == n_f:
        return weight, V, U
    if d_out == n_f:
        return weight.t(), U.t(), V.t()
    w_e = getattr(target, "W_E", None)  # (n_features, d_embed)
    if isinstance(w_e, Tensor) and d_in == w_e.shape[1]:
        return weight @ w_e.t(), w_e @ V, U
    return None


@torch.no_grad()
def toy_module_report(
    model: ComponentModel, identity_patterns: Sequence[str] | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Tensor]]]:
    """Per decomposed module of a toy target: ({mmcs, ml2r, identity_ci_error}, {single_feature_ci,
    feature_cosine} matrices permuted towards the identity). identity_ci_error only for modules matching
    identity_patterns (None: all) with C >= n_features; mmcs / ml2r only where `feature_space` applies."""
    n_f = int(model.target_model.n_features)
    cis = single_feature_cis(model, n_f)
    stats: dict[str, dict[str, float]] = {}  # mmcs / ml2r: the paper's (max cosine); *_by_norm: see mmcs_ml2r
    mats: dict[str, dict[str, Tensor]] = {}
    for name in model.module_names:
        comp = model.component(name)
        s: dict[str, float] = {}
        m: dict[str, Tensor] = {}
        ci = cis[name]  # (n_features, C)
        fits = ci.shape[1] >= n_f
        m["single_feature_ci"] = permute_to_identity(ci) if fits else ci
        if fits and (identity_patterns is None or any(fnmatch.fnmatch(name, p) for p in identity_patterns)):
            s["identity_ci_error"] = float(identity_ci_error(ci))
        fs = feature_space(model.target_model, model.target_weight(name), comp.V, comp.U)
        if fs is not None:
            s["mmcs"], s["ml2r"] = mmcs_ml2r(*fs, select="cosine")
            s["mmcs_by_norm"], s["ml2r_by_norm"] = mmcs_ml2r(*fs, select="norm")
            cos = feature_component_cosines(*fs)
            m["feature_cosine"] = cos[:, identity_permutation(cos.abs())] if fits else cos
        stats[name], mats[name] = s, m
    return stats, mats
