"""Causal-importance (CI) functions: small networks giving one pre-sigmoid importance per component.

- `mlp`: C independent MLPs, component c's sees only its scalar act g_c = (x V)_c (1 -> hidden -> 1);
- `vector_mlp`: C independent MLPs, each on the module's whole input vector (d_in -> hidden -> 1);
- `shared_mlp`: one MLP d_in -> hidden -> C.
The C independent MLPs are batched: stacked weights (C, a, b) applied with one einsum per layer.
On CPU, `mlp` with one hidden layer (the reference's recipes) runs through `ScalarMLPFunction`, a
cache-blocked forward/backward (see there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

CI_FN_KINDS = ("mlp", "vector_mlp", "shared_mlp")
# whether eager CPU calls of `mlp` take ScalarMLPFunction (off: autograd's graph, as on a GPU; the kernel-launch
# count of benchmarks/spd_step_launches.py counts a GPU's step so)
BLOCKED_CPU_PATH = True


def _kaiming_(weight: Tensor, fan_in: int, gain: float) -> None:
    """In place N(0, gain^2 / fan_in)."""
    with torch.no_grad():
        weight.normal_(0.0, gain / math.sqrt(fan_in))


class _ParallelMLP(nn.Module):
    """C independent MLPs with layer sizes dims[0] -> ... -> dims[-1] = 1, GELU between layers."""

    def __init__(self, C: int, dims: Sequence[int]) -> None:
        super().__init__()
        self.C = C
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        n_layers = len(dims) - 1
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = nn.Parameter(torch.empty(C, a, b))  # (C, in, out)
            _kaiming_(w, a, math.sqrt(2.0) if i < n_layers - 1 else 1.0)
            self.weights.append(w)
            self.biases.append(nn.Parameter(torch.zeros(C, b)))  # (C, out)

    def _layers(self, h: Tensor, start: int) -> Tensor:
        """Apply layers start.. to h (..., C, in) -> (..., C) (GELU before every layer after the first)."""
        return parallel_layers(h, list(self.weights), list(self.biases), start)


def parallel_layers(h: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], start: int) -> Tensor:
    """C independent MLPs' layers start.. on h (..., C, in) -> (..., C): weights (C, in, out), biases
    (C, out), GELU before every layer after the first."""
    for i in range(start, len(weights)):
        if i > 0:
            h = nn.functional.gelu(h)
        w = weights[i]  # (C, in, out)
        if w.shape[-1] == 1:  # the output layer: a per-component dot product, cheaper than a bmm
            h = (h * w[..., 0]).sum(-1, keepdim=True) + biases[i]
        else:
            h = torch.einsum("...ci,cio->...co", h, w) + biases[i]
    return h.squeeze(-1)


def scalar_mlps(g: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """C independent scalar MLPs 1 -> ... -> 1 on g (..., C) -> (..., C), weights[i] (C, in, out), biases[i]
    (C, out); on eager CPU calls with one hidden layer through ScalarMLPFunction (BLOCKED_CPU_PATH)."""
    blocked = BLOCKED_CPU_PATH and len(weights) == 2 and g.device.type == "cpu"
    if blocked and not torch.compiler.is_compiling():
        # eager CPU only: on GPUs and under torch.compile, autograd's graph is fused anyway
        w1, w2 = weights[0][:, 0, :], weights[1][..., 0]  # (C, H) each
        return ScalarMLPFunction.apply(g, w1, biases[0], w2, biases[1][:, 0])
    # First layer has fan-in 1: an elementwise affine map per (component, hidden unit).
    h = g.unsqueeze(-1) * weights[0][:, 0, :] + biases[0]  # (..., C, h0)
    return parallel_layers(h, weights, biases, start=1)


# float32 (rows, C, hidden) tensors autograd's graph of one-hidden-layer scalar MLPs creates per module and step:
# four in the forward (product, bias, GELU, product with the output weights), five in the backward
# (tests/test_spd_eager_cost.py checks the estimate below against the profiler's allocations)
EAGER_SCALAR_MLP_TENSORS = 9


def eager_scalar_mlp_bytes(
    rows: int, module_to_c: dict[str, int], hidden: Sequence[int], members: int = 1
) -> int:
    """About the bytes the `mlp` CI functions' eager graph (a GPU's, without compile) allocates in one step on
    `rows` inputs (examples or tokens): (rows, C, hidden) float32 tensors per module, EAGER_SCALAR_MLP_TENSORS
    of them per hidden layer."""
    per_row = sum(c * h for c in module_to_c.values() for h in hidden)
    return EAGER_SCALAR_MLP_TENSORS * 4 * rows * per_row * members


_BLOCK_ELEMENTS = 1 << 18  # ~1 MiB of float32 per (rows, C, H) block: stays in L2 cache


class ScalarMLPFunction(torch.autograd.Function):
    """C scalar MLPs 1 -> H -> 1 (GELU), out[n, c] = sum_h w2 gelu(g w1 + b1) + b2, with a hand-written
    backward over row blocks (CPU).

    Why not autograd: the (rows, C, H) hidden tensors are the step's largest (TMS: 4096 x 20 x 16), and
    autograd's graph keeps h and gelu(h) and makes ~6 more such temporaries in the backward, each swept
    from DRAM. Here forward keeps only gelu(h); the backward recomputes h block by block and does every
    per-element op on a block while it sits in cache, accumulating the parameter gradients (the speed-up is
    in benchmarks/spd_speed.py's table, docs/benchmarks.md). Matches autograd to float rounding
    (tests/test_spd_core.py).
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:  # noqa: D102
        dtype = torch.result_type(g, w1)
        g2 = g.reshape(-1, g.shape[-1]).to(dtype).contiguous()
        w1, b1, w2 = w1.to(dtype), b1.to(dtype), w2.to(dtype)
        n_rows = g2.shape[0]
        n_blocks = max(1, -(-n_rows * w1.numel() // _BLOCK_ELEMENTS))
        rows = max(1, -(-n_rows // n_blocks))  # equal blocks: no ragged tail block
        out = torch.empty_like(g2)
        acts = g2.new_empty(*g2.shape, w1.shape[-1])  # gelu(h) (rows, C, H), kept for the backward
        for g_blk, out_blk, a_blk in zip(g2.split(rows), out.split(rows), acts.split(rows)):
            torch.ops.aten.gelu.out(torch.addcmul(b1, g_blk.unsqueeze(-1), w1), out=a_blk)
            torch.sum(a_blk * w2, -1, out=out_blk)
        ctx.save_for_backward(g2, w1, b1, w2, acts)
        ctx.rows, ctx.g_shape, ctx.g_dtype = rows, g.shape, g.dtype
        return out.add_(b2).reshape(g.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        g2, w1, b1, w2, acts = ctx.saved_tensors
        go2 = grad_out.reshape(-1, g2.shape[-1]).to(g2.dtype).contiguous()  # may arrive expanded/strided
        grad_g = torch.empty_like(g2)
        grad_w1, grad_b1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2)
        blocks = zip(*(t.split(ctx.rows) for t in (g2, go2, grad_g, acts)))
        for g_blk, go_blk, gg_blk, a_blk in blocks:
            h = torch.addcmul(b1, g_blk.unsqueeze(-1), w1)  # (n, C, H), recomputed in cache
            go3 = go_blk.unsqueeze(-1)
            grad_w2 += (a_blk * go3).sum(0)
            grad_h = torch.ops.aten.gelu_backward(go3 * w2, h)
            grad_b1 += grad_h.sum(0)
            grad_w1 += torch.mul(grad_h, g_blk.unsqueeze(-1), out=h).sum(0)
            torch.sum(grad_h.mul_(w1), -1, out=gg_blk)
        grad_g = grad_g.reshape(ctx.g_shape).to(ctx.g_dtype) if ctx.needs_input_grad[0] else None
        return grad_g, grad_w1, grad_b1, grad_w2, go2.sum(0)


class MLPCiFn(_ParallelMLP):
    """C independent scalar MLPs: g (..., C) -> pre-sigmoid CI (..., C)."""

    takes_component_acts = True

    def __init__(self, C: int, hidden_dims: Sequence[int]) -> None:
        super().__init__(C, [1, *hidden_dims, 1])

    def forward(self, g: Tensor) -> Tensor:
        """g (..., C) -> (..., C)."""
        return scalar_mlps(g, list(self.weights), list(self.biases))


class VectorMLPCiFn(_ParallelMLP):
    """C independent MLPs on the module input: x (..., d_in) -> pre-sigmoid CI (..., C)."""

    takes_component_acts = False

    def __init__(self, C: int, d_in: int, hidden_dims: Sequence[int]) -> None:
        super().__init__(C, [d_in, *hidden_dims, 1])

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> (..., C)."""
        x = x.to(self.weights[0].dtype)
        h = torch.einsum("...i,cio->...co", x, self.weights[0]) + self.biases[0]  # (..., C, h0)
        return self._layers(h, start=1)


class SharedMLPCiFn(nn.Module):
    """One MLP on the module input: x (..., d_in) -> hidden -> pre-sigmoid CI (..., C)."""

    takes_component_acts = False

    def __init__(self, C: int, d_in: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        dims = [d_in, *hidden_dims, C]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(nn.GELU())
            lin = nn.Linear(a, b)
            _kaiming_(lin.weight, a, math.sqrt(2.0) if i < len(dims) - 2 else 1.0)
            nn.init.zeros_(lin.bias)
            layers.append(lin)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> (..., C)."""
        return self.net(x.to(self.net[0].weight.dtype))


CiFn = MLPCiFn | VectorMLPCiFn | SharedMLPCiFn


def make_ci_fn(kind: str, C: int, d_in: int, hidden: Sequence[int]) -> CiFn:
    """Build a CI function by kind ('mlp', 'vector_mlp', 'shared_mlp'); ValueError otherwise."""
    hidden = [int(h) for h in hidden]
    if kind == "mlp":
        return MLPCiFn(C, hidden)
    if kind == "vector_mlp":
        return VectorMLPCiFn(C, d_in, hidden)
    if kind == "shared_mlp":
        return SharedMLPCiFn(C, d_in, hidden)
    raise ValueError(f"unknown CI function kind {kind!r}; valid kinds: {list(CI_FN_KINDS)}")
