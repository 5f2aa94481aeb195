"""The NP component: attention output modulates MLP weights by a per-token rank-k update (pure PyTorch).

For one converted pre-norm layer with input h, attention output ``a`` (b, s, d) and MLP input
``u = norm2(h)`` (b, s, d), component i = 0..k-1 has ``W_down[i]`` (d, r), ``W_a_up[i]`` (r, d) and
``W_b_up[i]`` (r, f)::

    z_i   = a W_down[i]          (b, s, r)   shared by every modulated target
    v_a_i = z_i W_a_up[i]        (b, s, d)
    v_b_i = z_i W_b_up[i]        (b, s, f)
    ΔW    = Σ_i v_a_i ⊗ v_b_i    (b, s, d, f)   per token, rank <= k, in (in, out) layout
    u (W + ΔW) = u W + Σ_i (u·v_a_i) v_b_i

Here W is the MLP input weight in (in, out) layout, i.e. ``linear.weight.T`` for an ``nn.Linear`` (the
gate of a SwiGLU MLP) and ``conv1d.weight`` itself for a GPT-2 ``Conv1D`` (``c_fc``). The fast form
(:meth:`NPComponent.modulation`) never builds ΔW or the v's: with ``q_i = W_a_up[i] u`` (r) the scalar
``u·v_a_i = z_i·q_i`` and ``Σ_i (z_i·q_i) v_b_i = concat_i((z_i·q_i) z_i) @ stack_i(W_b_up[i])``, one
(b·s, k·r) x (k·r, f) matmul, O(k·r) extra memory per token.

Modes (which MLP weights are modulated; all targets share z):

* ``"single"``: target ``"in"`` only: the MLP input weight (SwiGLU gate / GPT-2 ``c_fc``), pair
  (``W_a_up``, ``W_b_up``).
* ``"dual"``: also target ``"up"`` (the up projection of a gated MLP): same v_a, a second
  ``v_b2_i = z_i W_b2_up[i]`` (f); ``up(u) + Σ_i (u·v_a_i) v_b2_i``.
* ``"triple"``: also target ``"down"``: the down projection's input is the hidden activation
  ``x`` (b, s, f); ``v_a3_i = z_i W_a3_up[i]`` (f), ``v_b3_i = z_i W_b3_up[i]`` (d) and the down output
  becomes ``down(x) + Σ_i (x·v_a3_i) v_b3_i``.

Modulation kinds (``modulation``), with the same parameters and the same vectors v_a_i, v_b_i:

* ``"quadratic"`` (NPT): a target's output gets ``Σ_i (x·v_a_i) v_b_i`` (x its input), quadratic in a;
* ``"linear"`` (ablation): the vectors are added instead of multiplied: each target's input gets
  ``Σ_i v_a_i`` and its output ``Σ_i v_b_i``. For "in" the MLP input becomes ``u + Σ_i v_a_i`` (so it
  also feeds the up projection of a gated MLP) and the input projection's output gets ``+ Σ_i v_b_i``:
  the pre-activation ``(u + a P) W + a Q`` with ``P = W_down W_a_up`` (d x d) and ``Q = W_down W_b_up``
  (d x f) stacked over the k components, is linear in a with rank <= k·r per map. The parameter count is
  the quadratic one's exactly (the same tensors).

Init (``init``): ``"default"`` as :meth:`NPComponent.reset_parameters` describes; ``"identity"`` gives the
first component an identity-like ``W_a_up[0]`` (see :meth:`NPComponent.identity_init`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

MODES: dict[str, tuple[str, ...]] = {
    "single": ("in",),
    "dual": ("in", "up"),
    "triple": ("in", "up", "down"),
}
MODULATIONS = ("quadratic", "linear")
INITS = ("default", "identity")
# target -> (parameter name producing v_a, parameter name producing v_b)
_TARGET_PARAMS: dict[str, tuple[str, str]] = {
    "in": ("W_a_up", "W_b_up"),
    "up": ("W_a_up", "W_b2_up"),
    "down": ("W_a3_up", "W_b3_up"),
}


class NPFactors(NamedTuple):
    """Explicit per-component vectors (small shapes only); None for targets the mode lacks."""

    z: Tensor  # (b, s, k, r)
    v_a: Tensor  # (b, s, k, d)   target "in" (and "up")
    v_b: Tensor  # (b, s, k, f)   target "in"
    v_b2: Tensor | None  # (b, s, k, f)   target "up"
    v_a3: Tensor | None  # (b, s, k, f)   target "down"
    v_b3: Tensor | None  # (b, s, k, d)   target "down"


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class NPComponent(nn.Module):
    """k rank-r NP components mapping attention output to per-token rank-k MLP weight updates."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        rank: int,
        num_ranks: int = 1,
        mode: str = "single",
        init_scale: float = 0.01,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        modulation: str = "quadratic",
        init: str = "default",
    ) -> None:
        """Allocate stacked parameters (k, ., .) and initialise them from a private generator."""
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_ffn", d_ffn)
        _check_positive_int("rank", rank)
        _check_positive_int("num_ranks", num_ranks)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {sorted(MODES)}")
        if modulation not in MODULATIONS:
            raise ValueError(f"unknown modulation {modulation!r}; valid: {MODULATIONS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {INITS}")
        self.modulation_kind, self.init = modulation, init
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        self.d_model, self.d_ffn, self.rank, self.num_ranks = d_model, d_ffn, rank, num_ranks
        self.mode, self.init_scale, self.seed = mode, float(init_scale), seed
        k, d, f, r = num_ranks, d_model, d_ffn, rank
        kw = {"dtype": dtype, "device": device}
        self.W_down = nn.Parameter(torch.empty(k, d, r, **kw))  # a (d) -> z_i (r)
        self.W_a_up = nn.Parameter(torch.empty(k, r, d, **kw))  # z_i -> v_a_i (d)
        self.W_b_up = nn.Parameter(torch.empty(k, r, f, **kw))  # z_i -> v_b_i (f)
        self.W_b2_up: nn.Parameter | None = None
        self.W_a3_up: nn.Parameter | None = None
        self.W_b3_up: nn.Parameter | None = None
        if mode in ("dual", "triple"):
            self.W_b2_up = nn.Parameter(torch.empty(k, r, f, **kw))  # z_i -> v_b2_i (f), "up"
        if mode == "triple":
            self.W_a3_up = nn.Parameter(torch.empty(k, r, f, **kw))  # z_i -> v_a3_i (f), "down"
            self.W_b3_up = nn.Parameter(torch.empty(k, r, d, **kw))  # z_i -> v_b3_i (d), "down"
        self.reset_parameters(seed)

    @property
    def targets(self) -> tuple[str, ...]:
        """Modulated targets of this mode, a subset of ("in", "up", "down")."""
        return MODES[self.mode]

    def extra_repr(self) -> str:
        """Shapes and mode for print(module)."""
        return (
            f"d_model={self.d_model}, d_ffn={self.d_ffn}, rank={self.rank}, "
            f"num_ranks={self.num_ranks}, mode={self.mode!r}, modulation={self.modulation_kind!r}"
        )

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """One vectorised normal_ per stacked tensor from a private generator (no QR, no global RNG).

        W_down ~ N(0, 2/(d+r)) (Xavier normal per component); every up matrix ~ N(0, (init_scale/√r)²),
        so |v| does not grow with r. ``seed=None`` draws one seed from the global CPU generator (so
        ``torch.manual_seed`` still makes runs reproducible); the same seed on another device type gives
        different values (the generator lives on the parameters' device).
        """
        if self.W_down.device.type == "meta":
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device=self.W_down.device).manual_seed(int(seed))
        self.W_down.normal_(0.0, math.sqrt(2.0 / (self.d_model + self.rank)), generator=gen)
        up_std = self.init_scale / math.sqrt(self.rank)
        for name in ("W_a_up", "W_b_up", "W_b2_up", "W_a3_up", "W_b3_up"):
            p = getattr(self, name)
            if p is not None:
                p.normal_(0.0, up_std, generator=gen)
        if self.init == "identity":
            self.identity_init(gen)

    @torch.no_grad()
    def identity_init(self, gen: torch.Generator) -> None:
        """Identity-like start of component 0 (the reference's "improved" init of its first component).

        ``W_a_up[0]`` (r, d) becomes a tiled identity, row j = e_(j mod d), plus N(0, 0.1²) noise, so
        v_a_0 starts as z_0 written into the first coordinates of the model space (for r <= d); ``W_b_up[0]``
        becomes N(0, 0.01 · 2/(r + f)), a small Xavier-scaled start. The other components keep their draw.
        """
        r, d = self.rank, self.d_model
        w = self.W_a_up[0]
        w.normal_(0.0, 0.1, generator=gen)
        w[torch.arange(r, device=w.device), torch.arange(r, device=w.device) % d] += 1.0
        self.W_b_up[0].normal_(0.0, 0.1 * math.sqrt(2.0 / (r + self.d_ffn)), generator=gen)

    # ------------------------------------------------------------------ helpers
    def _pair(self, target: str) -> tuple[Tensor, Tensor]:
        if target not in self.targets:
            raise ValueError(
                f"target {target!r} is not modulated in mode {self.mode!r}; valid: {self.targets}"
            )
        name_a, name_b = _TARGET_PARAMS[target]
        return getattr(self, name_a), getattr(self, name_b)

    def project(self, a: Tensor) -> Tensor:
        """z = a W_down[i] for all i: (..., d) -> (..., k, r)."""
        return torch.einsum("...d,kdr->...kr", a, self.W_down)

    def factors(self, a: Tensor) -> NPFactors:
        """All explicit vectors z, v_a, v_b (, v_b2, v_a3, v_b3) for a (b, s, d); small shapes only."""
        z = self.project(a)  # (b, s, k, r)

        def up(w: Tensor | None) -> Tensor | None:
            return None if w is None else torch.einsum("...kr,krn->...kn", z, w)

        return NPFactors(
            z, up(self.W_a_up), up(self.W_b_up), up(self.W_b2_up), up(self.W_a3_up), up(self.W_b3_up)
        )

    def v_a(self, a: Tensor, target: str = "in") -> Tensor:
        """v_a_i for all i: (b, s, d) -> (b, s, k, n_in) (n_in = d, or f for "down")."""
        w_a, _ = self._pair(target)
        return torch.einsum("...kr,krn->...kn", self.project(a), w_a)

    def v_b(self, a: Tensor, target: str = "in") -> Tensor:
        """v_b_i for all i: (b, s, d) -> (b, s, k, n_out) (n_out = f, or d for "down")."""
        _, w_b = self._pair(target)
        return torch.einsum("...kr,krn->...kn", self.project(a), w_b)

    # ------------------------------------------------------------------ fast path
    def modulation(self, a: Tensor, u: Tensor, target: str = "in", z: Tensor | None = None) -> Tensor:
        """Σ_i (u·v_a_i) v_b_i = u ΔW without forming ΔW or v_a/v_b: (b,s,n_in) -> (b,s,n_out).

        ``u`` is the target's input ((b, s, d) for "in"/"up", the hidden activation (b, s, f) for
        "down"); pass ``z = self.project(a)`` to share it between targets.
        """
        w_a, w_b = self._pair(target)
        k, r = self.num_ranks, self.rank
        if z is None:
            z = self.project(a)  # (b, s, k, r)
        q = u @ w_a.reshape(k * r, -1).transpose(0, 1)  # (b, s, k·r): q_i = W_a_up[i] u
        q = q.unflatten(-1, (k, r))  # (b, s, k, r)
        c = (q * z).sum(-1, keepdim=True)  # (b, s, k, 1): u·v_a_i = z_i·q_i
        return (c * z).flatten(-2) @ w_b.reshape(k * r, -1)  # (b, s, k·r) @ (k·r, n_out) -> (b, s, n_out)

    def linear_input(self, z: Tensor, target: str = "in") -> Tensor:
        """Linear kind: Σ_i v_a_i = Σ_i z_i W_a[i], added to the target's input: (b,s,k,r) -> (b,s,n_in)."""
        w_a, _ = self._pair(target)
        return z.flatten(-2) @ w_a.reshape(self.num_ranks * self.rank, -1)

    def linear_output(self, z: Tensor, target: str = "in") -> Tensor:
        """Linear kind: Σ_i v_b_i = Σ_i z_i W_b[i], added to the target's output: (b,s,k,r) -> (b,s,n_out)."""
        _, w_b = self._pair(target)
        return z.flatten(-2) @ w_b.reshape(self.num_ranks * self.rank, -1)

    def forward(self, a: Tensor, u: Tensor, target: str = "in") -> Tensor:
        """Same as :meth:`modulation`: (b, s, n_in) -> (b, s, n_out)."""
        return self.modulation(a, u, target)

    def modulated_linear(
        self,
        u: Tensor,
        a: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        target: str = "in",
        z: Tensor | None = None,
    ) -> Tensor:
        """u Wᵀ + b + u ΔW, i.e. u (W' + ΔW) + b with W' = weightᵀ; weight in nn.Linear layout (out, in).

        For a GPT-2 ``Conv1D`` (weight stored (in, out)) pass ``conv.weight.t()`` and ``conv.bias``.
        """
        # (b, s, n_in) -> (b, s, n_out)
        return nn.functional.linear(u, weight, bias) + self.modulation(a, u, target, z=z)

    # ------------------------------------------------------------------ naive references
    def delta_w(self, a: Tensor, target: str = "in") -> Tensor:
        """Explicit per-token ΔW = Σ_i v_a_i ⊗ v_b_i, (b, s, d) -> (b, s, n_in, n_out); small shapes only."""
        return torch.einsum("...ki,...ko->...io", self.v_a(a, target), self.v_b(a, target))

    def modulation_explicit(self, a: Tensor, u: Tensor, target: str = "in") -> Tensor:
        """Reference u ΔW through the materialised ΔW: (b, s, n_in) -> (b, s, n_out)."""
        return torch.einsum("...i,...io->...o", u, self.delta_w(a, target))

    def modulation_vectors(self, a: Tensor, u: Tensor, target: str = "in") -> Tensor:
        """Reference Σ_i (u·v_a_i) v_b_i through explicit v_a, v_b of all k: (b,s,n_in) -> (b,s,n_out)."""
        c = torch.einsum("...ki,...i->...k", self.v_a(a, target), u)  # (b, s, k)
        return torch.einsum("...k,...ko->...o", c, self.v_b(a, target))

    # ------------------------------------------------------------------ regulariser and stats
    def _sq_norms(self, z: Tensor, w: Tensor) -> Tensor:
        """|z_i W[i]|² = z_iᵀ (W[i] W[i]ᵀ) z_i without forming the vectors: (b,s,k,r) -> (b,s,k)."""
        gram = w @ w.transpose(1, 2)  # (k, r, r)
        return torch.einsum("...kr,krt,...kt->...k", z, gram, z)

    def regularization(self, a: Tensor, z: Tensor | None = None) -> Tensor:
        """Σ over distinct v's of mean(v²) (mean over tokens, components, entries), via r x r Grams."""
        if z is None:
            z = self.project(a)
        total = z.new_zeros(())
        for name in ("W_a_up", "W_b_up", "W_b2_up", "W_a3_up", "W_b3_up"):
            w = getattr(self, name)
            if w is not None:
                total = total + self._sq_norms(z, w).mean() / w.shape[-1]
        return total

    @torch.no_grad()
    def stats(self, a: Tensor, u: Tensor | None = None, target: str = "in") -> dict[str, Tensor]:
        """Detached scalars: mean |v_a_i|, |v_b_i|, cos(v_a_i, a) (d-long v_a only), and |u ΔW| if u given."""
        w_a, w_b = self._pair(target)
        z = self.project(a)  # (b, s, k, r)
        na = self._sq_norms(z, w_a).clamp_min(0).sqrt()  # (b, s, k)
        out = {"v_a_norm": na.mean(), "v_b_norm": self._sq_norms(z, w_b).clamp_min(0).sqrt().mean()}
        if w_a.shape[-1] == a.shape[-1]:
            k, r = self.num_ranks, self.rank
            qa = (a @ w_a.reshape(k * r, -1).transpose(0, 1)).unflatten(-1, (k, r))  # (b, s, k, r)
            dot = (qa * z).sum(-1)  # (b, s, k): a·v_a_i
            eps = torch.finfo(dot.dtype).tiny
            out["cos_v_a_a"] = (dot / (na * a.norm(dim=-1, keepdim=True)).clamp_min(eps)).mean()
        if u is not None:
            out["modulation_norm"] = self.modulation(a, u, target, z=z).norm(dim=-1).mean()
        return out
