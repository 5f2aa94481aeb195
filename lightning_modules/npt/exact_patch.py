"""Exact rank-1 weight patches of a pre-norm block (Dherin et al. 2025, arXiv:2507.16003), pure PyTorch.

A pre-norm block computes ``h + a + MLP(norm2(h + a))``. With ``u = norm2(h)``, ``z = norm2(h + a)``,
``δ = z - u`` and an MLP input weight W (nn.Linear layout (f, d)), the rank-1 patch
``v_a = u / |u|²`` (d), ``v_b = W δ`` (f) gives ``u Wᵀ + (u·v_a) v_b = W u + W δ = W z`` exactly
(column form: ``(W + v_b v_aᵀ) u = W z``). Patching every MLP input weight (gate and up) this way makes
the MLP's hidden activation ``s`` equal the unpatched one at z, and the down-projection patch
``v_a = s / |s|²`` (f), ``v_b = a`` (d) re-adds the attention output dropped from the residual, so
``h + MLP_patched(u) == h + a + MLP(z)``. NPT's v's depend on ``a`` alone, so they can only approximate
this patch; :func:`patch_gap` measures how far a learned modulation is from it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def exact_rank1_patch(u: Tensor, z: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(v_a, v_b) = (u/|u|², W (z - u)) with u Wᵀ + (u·v_a) v_b = z Wᵀ; u, z (..., d), weight (f, d).

    For a GPT-2 ``Conv1D`` pass ``conv.weight.t()``. Tokens with u = 0 get v_a = 0 (no exact patch).
    """
    sq = u.square().sum(-1, keepdim=True)  # (..., 1)
    v_a = u / sq.clamp_min(torch.finfo(u.dtype).tiny)  # (..., d)
    v_b = (z - u) @ weight.transpose(-1, -2)  # (..., f)
    return v_a, v_b


def exact_down_patch(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(v_a, v_b) = (s/|s|², a) for the down projection: s Wᵀ + (s·v_a) v_b = s Wᵀ + a; s (..., f), a (..., d)."""
    sq = s.square().sum(-1, keepdim=True)  # (..., 1)
    return s / sq.clamp_min(torch.finfo(s.dtype).tiny), a


def rank1_modulation(u: Tensor, v_a: Tensor, v_b: Tensor) -> Tensor:
    """(u·v_a) v_b for one vector pair per token, or Σ_i (u·v_a_i) v_b_i for (..., k, n) stacks."""
    if v_a.dim() == u.dim():  # single pair: (..., n_in), (..., n_out)
        return (u * v_a).sum(-1, keepdim=True) * v_b  # (..., n_out)
    c = torch.einsum("...ki,...i->...k", v_a, u)  # (..., k)
    return torch.einsum("...k,...ko->...o", c, v_b)  # (..., n_out)


def modulation_gap(m_learned: Tensor, m_exact: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over tokens of |m_learned - m_exact| / |m_exact| for modulations of shape (..., n_out).

    Tokens with m_exact = 0 (a = 0, so nothing to patch) are skipped; NaN when every token is such.
    """
    num = (m_learned - m_exact).norm(dim=-1)  # (...)
    den = m_exact.norm(dim=-1)  # (...)
    keep = den > eps
    return (num[keep] / den[keep]).mean()


def patch_gap(
    v_a_learned: Tensor, v_b_learned: Tensor, v_a_exact: Tensor, v_b_exact: Tensor, u: Tensor
) -> Tensor:
    """Relative gap between the learned u ΔW and the exact patch's (u·v_a) v_b, averaged over tokens.

    Learned v's are (b, s, d), (b, s, f) or stacks (b, s, k, d), (b, s, k, f); exact ones (b, s, d),
    (b, s, f); u (b, s, d). At large shapes compute the learned modulation with
    ``NPComponent.modulation`` and call :func:`modulation_gap` instead.
    """
    return modulation_gap(
        rank1_modulation(u, v_a_learned, v_b_learned), rank1_modulation(u, v_a_exact, v_b_exact)
    )
