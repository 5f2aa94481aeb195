"""SPD losses as plain functions (total = sum_k coeff_k * loss_k).

Notation: ci = lower-leaky causal importances {module: (..., C)}, ci_upper = upper-leaky ones,
Delta = W_target - (V U)^T, r ~ U(0, 1), masks m = ci + (1 - ci) r (fresh for every term and sample; the
stochastic terms draw them through one `MaskSampler`, each term only adding its body).
Output losses: 'mse' = sum (y - y_hat)^2 / numel; 'kl' = KL(softmax(target) || softmax(pred)) summed
over the last (vocab) dim and averaged over the other (token) dims. Wherever a loss takes `target_out`,
a `KLTarget` (the target's softmax prepared once per batch) may stand in for the logits with 'kl'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from .component_model import (
    ComponentModel,
    Sampling,
    WeightDeltaAndMask,
    stochastic_masks,
    uniform_k_subset_routing_masks,
    weight_delta_masks,
)
from .members import uniform
from .routing import Router

OutputLossType = Literal["mse", "kl"]
DeltaMasks = dict[str, WeightDeltaAndMask]  # {module: (Delta (d_out, d_in), r (...))}
Routing = Literal["all", "layerwise", "subset"]
ROUTINGS = ("all", "layerwise", "subset")


@dataclass(eq=False)
class KLTarget:
    """A target distribution prepared once per batch for repeated KL terms: probs and sum_v p log p."""

    probs: Tensor  # (..., vocab) float32
    neg_entropy: Tensor  # (...)
    # head_projection's cache: id(weight) -> (weight, p W)
    _projections: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    # head_cast's cache: (id(weight), dtype) -> (weight, bias, the two cast)
    _casts: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor | None, Tensor, Tensor | None]] = field(
        default_factory=dict, repr=False
    )
    # block_buffers' cache: (rows, vocab) -> two float32 (rows, vocab) buffers
    _buffers: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    # repeat's cache: k -> this target repeated k times; on a repeat: (the target repeated, k)
    _repeats: dict[int, KLTarget] = field(default_factory=dict, repr=False)
    _repeat_of: tuple[KLTarget, int] | None = field(default=None, repr=False)

    @classmethod
    def from_logits(cls, logits: Tensor) -> KLTarget:
        """From target logits (..., vocab); no gradient flows to the (frozen) target."""
        log_p = torch.log_softmax(logits.detach().float(), dim=-1)
        probs = log_p.exp()
        return cls(probs, (probs * log_p).sum(-1))

    def head_projection(self, weight: Tensor) -> Tensor:
        """p W (N, d) in float32 for a frozen head's weight (V, d), formed once per batch and head: every
        fused KL term of the batch then takes the p part of its gradient, p W, from it (_HeadKL)."""
        cached = self._projections.get(id(weight))
        if cached is None or cached[0] is not weight:
            if self._repeat_of is not None:  # the source's, repeated: k times fewer multiply-adds
                source, k = self._repeat_of
                projection = source.head_projection(weight).repeat(k, 1)
            else:
                probs = self.probs.reshape(-1, weight.shape[0])
                with torch.autocast(probs.device.type, enabled=False):
                    projection = probs @ weight.detach().float()
            cached = self._projections[id(weight)] = (weight, projection)
        return cached[1]

    def repeat(self, k: int) -> KLTarget:
        """This target repeated k times along the first (batch) dim, for a batch repeated so (made once per
        batch and k; it shares this target's head casts and block buffers)."""
        if k == 1:
            return self
        cached = self._repeats.get(k)
        if cached is None:
            cached = self._repeats[k] = KLTarget(
                repeat_rows(self.probs, k), repeat_rows(self.neg_entropy, k), _casts=self._casts,
                _buffers=self._buffers, _repeat_of=(self, k),
            )  # fmt: skip
        return cached

    def head_cast(
        self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """A frozen head's weight and bias cast to `dtype` (autocast's), once per batch and head: autocast
        casts a frozen weight anew on every call (it caches only casts of weights that require grad), which
        for the fused head would be once per block of rows and per KL term."""
        key = (id(weight), dtype)
        cached = self._casts.get(key)
        if cached is None or cached[0] is not weight or cached[1] is not bias:
            cast = (weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
            cached = self._casts[key] = (weight, bias, *cast)
        return cached[2], cached[3]

    def block_buffers(self, rows: int, vocab: int) -> tuple[Tensor, Tensor]:
        """Two float32 (rows, vocab) buffers on the probs' device, made once per batch, for the fused head's
        CPU blocks (the logits and the product p * zc) of every KL term of the batch: reused, they stay in
        the core's caches, where a fresh 2 MiB block per matmul and per product cost ~3% of a tiny-LM step."""
        cached = self._buffers.get((rows, vocab))
        if cached is None:
            make = partial(torch.empty, rows, vocab, dtype=torch.float32, device=self.probs.device)
            cached = self._buffers[(rows, vocab)] = (make(), make())
        return cached


KLBlock = Callable[..., tuple[Tensor, Tensor, Tensor]]  # (z, probs, out, product=None) -> (e, s, cross)


def kl_block(
    z: Tensor, probs: Tensor, out: Tensor, product: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """For a block of logits z (rows, V) and the target's probs (rows, V): (e, s, cross) with
    e = exp(z - max z), written into `out` (which may be z), s = sum_v e (rows, 1) and
    cross = p . (z - max z) (rows,), its products p * (z - max z) written into `product` when given.

    With zc = z - max(z) per row, p . z - logsumexp(z) = p . zc - log s: the maxima cancel, and each row's KL
    is formed before summing, so the float32 sums are of the size of the KLs, not of the logits."""
    zc = torch.sub(z, z.amax(-1, keepdim=True), out=out)
    cross = torch.linalg.vecdot(probs, zc) if product is None else torch.mul(probs, zc, out=product).sum(-1)
    e = zc.exp_()
    return e, e.sum(-1, keepdim=True), cross


def _kl_block_out_of_place(
    z: Tensor, probs: Tensor, out: Tensor, product: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """kl_block written without in-place updates (e is a new tensor, `out` and `product` unused), for
    torch.compile to fuse into one pass over the block after the max. Eager, those passes and the (rows, V)
    product p * zc are the block's largest cost after its two matmuls (~0.9 ms against ~1.4 ms of matmul
    per 128 x 4096 block on one CPU core)."""
    zc = z - z.amax(-1, keepdim=True)
    e = zc.exp()
    return e, e.sum(-1, keepdim=True), (probs * zc).sum(-1)


_COMPILED_KL_BLOCK: list[KLBlock] = []


def compiled_kl_block() -> KLBlock:
    """kl_block fused by torch.compile (compiled once per process, on first use; a new block shape
    recompiles). ComponentModel.compiled_kl switches the KL terms to it (SPDLightningModule's compile)."""
    if not _COMPILED_KL_BLOCK:
        _COMPILED_KL_BLOCK.append(torch.compile(_kl_block_out_of_place))
    return _COMPILED_KL_BLOCK[0]


class _KLFromLogits(torch.autograd.Function):
    """mean_n KL(p_n || softmax(z_n)) = mean_n [sum_v p log p - p . z + logsumexp(z)] (sum_v p = 1).

    Written out because it is the LM step's largest elementwise cost (18 (tokens, vocab) KLs per tiny-LM
    step): log_softmax + mul + sum and their autograd backward sweep the (tokens, vocab) logits ~7 times.
    Here the forward also forms the gradient, softmax(z) - p, and on CPU runs over blocks of rows small
    enough (~512 KiB) to stay in cache between its passes (max, subtract, dot, exp, sum, divide, subtract);
    the backward only scales it.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, z: Tensor, probs: Tensor, neg_entropy: Tensor, block: KLBlock = kl_block
    ) -> Tensor:
        n, vocab = z.shape
        rows = n if z.device.type != "cpu" else max(8, 2**17 // vocab)
        grad = torch.empty_like(z)  # (N, V): softmax(z) - p
        total = z.new_zeros(())
        for r in range(0, n, rows):
            p_r, g_r = probs[r : r + rows], grad[r : r + rows]
            e, s, cross = block(z[r : r + rows], p_r, g_r)  # e: exp(z - max), the unnormalised softmax
            total += (neg_entropy[r : r + rows] - cross + s.log().squeeze(-1)).sum()
            e.div_(s).sub_(p_r)
            if e is not g_r:  # the compiled block returns a new tensor
                g_r.copy_(e)
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * (grad_out / grad.shape[0]), None, None, None


def kl_from_logits(pred: Tensor, target: KLTarget, block: KLBlock = kl_block) -> Tensor:
    """Mean over tokens of KL(target || softmax(pred)), pred (..., vocab) logits, in float32 (`block`:
    kl_block, or compiled_kl_block())."""
    vocab = pred.shape[-1]
    z = pred.float().reshape(-1, vocab).contiguous()
    probs = target.probs.reshape(-1, vocab).contiguous()
    return _KLFromLogits.apply(z, probs, target.neg_entropy.reshape(-1).to(z.dtype), block)


def head_block_rows(device_type: str, vocab: int) -> int:
    """Rows per block of the fused head: ~2 MiB of float32 logits on a CPU (the core's cache), ~256 MiB
    elsewhere (bounded memory)."""
    return max(8, (2**19 if device_type == "cpu" else 2**26) // vocab)


class _HeadKL(torch.autograd.Function):
    """mean_n KL(p_n || softmax(h_n W^T + b)) from the final hidden states h (N, d) and a frozen output
    head W (V, d), b (V): the output projection fused with _KLFromLogits' computation, over blocks of rows.

    The unfused form writes the (N, V) logits, reads them back for the KL, keeps the (N, V) gradient
    softmax(z) - p until the backward and multiplies it by W there. Here each block's logits stay in
    cache (CPU; bounded blocks on GPUs), the block's gradient to h, (softmax(z) - p) W, is formed at
    once, and only the (N, d) gradient is kept: memory per KL term d / V of the unfused one's (1/65 for
    GPT-2). No gradient to W or b (the target is frozen).

    Where the logits come out in float32, the gradient is formed as (exp(z - m) W) / s - pW with
    s = sum exp(z - m) and pW = p W formed once per batch (KLTarget.head_projection): no (rows, V) passes
    for the division and the subtraction of p (the cancellation in that subtraction is the one in
    softmax(z) - p in float32 already; tested). The value's p . z is taken from the rounded logits, as
    the unfused form does: h . pW would differ from it by the logits' rounding, which is not small
    against a small KL. The matmuls run in the dtype of the weight given, with autocast off: under
    autocast head_kl_loss passes the head cast once per batch to autocast's dtype (KLTarget.head_cast),
    so they run as the head's Linear would under autocast; in a low-precision head or under autocast,
    softmax(z) - p is formed in float32 before the low-precision matmul. `buffers` (a float32 head on a
    CPU only; head_kl_loss passes KLTarget.block_buffers there) take each block's logits and products.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        probs: Tensor,
        neg_entropy: Tensor,
        p_weight: Tensor,
        block: KLBlock = kl_block,
        buffers: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        rows = head_block_rows(h.device.type, vocab)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None  # (N, d): (softmax(z) - p) W
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        autocast_off = torch.autocast(h.device.type, enabled=False)
        exact = weight.dtype == torch.float32
        for r in range(0, n, rows):
            p_r, h_r = probs[r : r + rows], h[r : r + rows].to(weight.dtype)
            with autocast_off:  # (rows, V): into the buffers when given (CPU, float32 head), else fresh
                if buffers is None:
                    z, product = torch.nn.functional.linear(h_r, weight, bias).float(), None
                else:
                    z, product = (b[: p_r.shape[0]] for b in buffers)
                    if bias is None:
                        torch.mm(h_r, weight.t(), out=z)
                    else:
                        torch.addmm(bias, h_r, weight.t(), out=z)
            # the same steps as _KLFromLogits.forward, in z's storage
            e, s, cross = block(z, p_r, z, product)
            total += (neg_entropy[r : r + rows] - cross + s.log().squeeze(-1)).sum()
            if not need_grad:
                continue
            with autocast_off:
                if exact:
                    grad[r : r + rows] = torch.mm(e, weight).div_(s).sub_(p_weight[r : r + rows])
                else:
                    grad[r : r + rows] = e.div_(s).sub_(p_r).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        return (grad * (grad_out / grad.shape[0]).to(grad.dtype), *[None] * 7)


def head_kl_loss(
    h: Tensor, weight: Tensor, bias: Tensor | None, target: KLTarget, block: KLBlock = kl_block
) -> Tensor:
    """kl_from_logits(h W^T + b, target) from the final hidden states h (..., d) and a frozen head
    (weight (V, d), bias (V) or None), without forming the (tokens, V) logits (see _HeadKL); `block`:
    kl_block, or compiled_kl_block()."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("head_kl_loss needs a frozen head (no gradient to its weight or bias)")
    vocab = weight.shape[0]
    probs = target.probs.reshape(-1, vocab).contiguous()
    neg_entropy = target.neg_entropy.reshape(-1).float()
    p_weight = target.head_projection(weight)
    device = h.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        weight, bias = target.head_cast(weight, bias, torch.get_autocast_dtype(device))
    h2 = h.reshape(-1, h.shape[-1]).contiguous()
    buffers = None
    if device == "cpu" and weight.dtype == torch.float32:
        buffers = target.block_buffers(min(h2.shape[0], head_block_rows(device, vocab)), vocab)
    return _HeadKL.apply(h2, weight, bias, probs, neg_entropy, p_weight, block, buffers)


def masked_recon_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor | KLTarget,
    output_loss_type: OutputLossType,
    **forward_kwargs: Any,
) -> Tensor:
    """L(model(batch, **forward_kwargs), target_out) for a masked forward. A KL against a KLTarget on a
    model with an output head set skips the head in the forward and fuses it into the KL (head_kl_loss):
    the same value and gradients, without the (tokens, vocab) logits."""
    targets = [(target_out, batch.shape[0])]
    return masked_recon_losses(model, batch, targets, output_loss_type, **forward_kwargs)[0]


def masked_recon_losses(
    model: ComponentModel,
    batch: Tensor,
    targets: list[tuple[Tensor | KLTarget, int]],
    output_loss_type: OutputLossType,
    **forward_kwargs: Any,
) -> list[Tensor]:
    """masked_recon_loss of consecutive row groups of one masked forward: targets = [(target, rows), ...]
    in order, each group's loss against its own target (with the output head fused into a KL as there)."""
    if sum(n for _, n in targets) != batch.shape[0]:
        raise ValueError(
            f"the row groups {[n for _, n in targets]} do not add up to the batch {batch.shape[0]}"
        )
    kl_targets = all(isinstance(t, KLTarget) for t, _ in targets)
    head = model.fusable_head() if output_loss_type == "kl" and kl_targets else None
    block = compiled_kl_block() if model.compiled_kl else kl_block
    out = model(batch, head_input=head is not None, **forward_kwargs)
    losses, start = [], 0
    for target, n in targets:
        rows = out[start : start + n]
        if head is not None:
            losses.append(head_kl_loss(rows, *head, target, block))
        else:
            losses.append(output_recon_loss(rows, target, output_loss_type, block))
        start += n
    return losses


def output_recon_loss(
    pred: Tensor, target: Tensor | KLTarget, output_loss_type: OutputLossType, block: KLBlock = kl_block
) -> Tensor:
    """mse: sum (pred - target)^2 / numel;  kl: mean over tokens of sum_v p_t (log p_t - log p_pred).

    For kl, `target` may be a KLTarget (prepared once per batch): the same value, without recomputing
    the target's softmax for every term and mask sample."""
    if output_loss_type == "mse":
        return (pred - target).pow(2).sum() / pred.numel()
    if output_loss_type == "kl":
        if not isinstance(target, KLTarget):
            target = KLTarget.from_logits(target)
        return kl_from_logits(pred, target, block)
    raise ValueError(f"unknown output_loss_type {output_loss_type!r}; valid: ['mse', 'kl']")


def annealed_p(
    step_frac: float, p_start: float, p_end: float | None, start_frac: float = 1.0, end_frac: float = 1.0
) -> float:
    """p_start before start_frac, p_end after end_frac, linear in between (p_start if p_end is None)."""
    if p_end is None or step_frac < start_frac:
        return p_start
    if step_frac >= end_frac:
        return p_end
    return p_start + (p_end - p_start) * (step_frac - start_frac) / (end_frac - start_frac)


def importance_minimality_loss(
    ci_upper: dict[str, Tensor], p: float, eps: float = 1e-12, beta: float = 0.0, members: int | None = None
) -> Tensor:
    """sum_layers sum_c mean_batch (ci_upper + eps)^p  (times 1 + beta log2(1 + sum_batch) if beta); with
    `members` (ci_upper (k, ..., C)), the mean over the members of each one's."""
    total = torch.zeros((), device=next(iter(ci_upper.values())).device)
    for ci in ci_upper.values():
        powered = (ci + eps).pow(p)
        # (members, n, C): every member's batch apart (beta's sum must not run over the other members')
        powered = powered.flatten(0, -2).unsqueeze(0) if members is None else powered.flatten(1, -2)
        per_component_mean = powered.mean(1)  # (members, C)
        if beta:
            per_component_mean = per_component_mean * (1 + beta * torch.log2(1 + powered.sum(1)))
        members_here = per_component_mean.shape[0]
        total = total + (
            per_component_mean.sum() if members_here == 1 else per_component_mean.sum() / members_here
        )
    return total


def faithfulness_loss(weight_deltas: dict[str, Tensor]) -> Tensor:
    """sum_layers sum Delta^2 / sum_layers numel(Delta)."""
    sq = sum(d.pow(2).sum() for d in weight_deltas.values())
    return sq / sum(d.numel() for d in weight_deltas.values())


@dataclass
class MaskSampler:
    """How the stochastic terms draw their masks: for each of n_mask_samples, component masks
    m = ci + (1 - ci) r for every module (ci order), then, with weight_deltas, one delta mask r ~ U(0, 1)
    per module and position; then whatever the term's own body draws, all from `generator`."""

    ci: dict[str, Tensor]
    weight_deltas: dict[str, Tensor] | None = None
    sampling: Sampling = "continuous"
    n_mask_samples: int = 1
    generator: torch.Generator | None = None
    # with no weight_deltas: delta masks still drawn, the delta term taken from the target's output
    delta_from_output: bool = False

    def draw(self) -> tuple[dict[str, Tensor], DeltaMasks | None]:
        """One sample's component masks and (with a delta term) delta masks."""
        masks = stochastic_masks(self.ci, self.sampling, self.generator)
        if self.weight_deltas is None and not self.delta_from_output:
            return masks, None
        return masks, weight_delta_masks(self.ci, self.weight_deltas, self.generator)

    def mean(
        self, body: Callable[[dict[str, Tensor], DeltaMasks | None], Iterable[tuple[Tensor, int]]]
    ) -> Tensor:
        """sum of every (value, count) the body yields over the samples / sum of the counts (0 if none)."""
        total, n = 0.0, 0
        for _ in range(self.n_mask_samples):
            for value, count in body(*self.draw()):
                total = total + value
                n += count
        if n == 0:
            return torch.zeros((), device=next(iter(self.ci.values())).device)
        return total / n


def stochastic_recon_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    sampler: MaskSampler,
    output_loss_type: OutputLossType = "mse",
    routing: Routing = "all",
    layerwise_batch: int = 1,
) -> Tensor:
    """Mean over samples of L(model(x; masked by m, + r Delta), target_out), where the masked modules are
    'all': every module; 'layerwise': one module l at a time, the others the target (the mean also runs
    over l); 'subset': per position a random k-subset of modules (k ~ U{1..L}, drawn after the masks).
    The masked forwards start from the clean forward's recorded activations where the model holds them
    for this batch (ComponentModel's reuse_clean_prefix: e.g. a layerwise forward of block 3's module
    skips blocks 0-2).

    layerwise_batch > 1 runs the layerwise forwards that many modules at a time as one forward of the
    batch repeated (the i-th copy's rows masked in the i-th module only: ComponentModel's row_slices); the
    same losses and gradients (tested), with as many times fewer operator calls (kernel launches on a
    GPU), but from the embeddings (no clean prefix) and with that many times the activations' memory."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; valid: {list(ROUTINGS)}")
    if layerwise_batch < 1:
        raise ValueError(f"layerwise_batch must be >= 1, got {layerwise_batch}")
    ref = next(iter(sampler.ci.values()))

    def body(masks: dict[str, Tensor], deltas: DeltaMasks | None) -> Iterator[tuple[Tensor, int]]:
        if routing == "layerwise" and layerwise_batch > 1:
            names = list(masks)
            for i in range(0, len(names), layerwise_batch):
                yield batched_layerwise_loss(
                    model, batch, target_out, output_loss_type, names[i : i + layerwise_batch], masks, deltas
                )
            return
        if routing == "layerwise":
            for name in masks:
                one_delta = None if deltas is None else {name: deltas[name]}
                one_mask = {name: masks[name]}
                loss = masked_recon_loss(
                    model, batch, target_out, output_loss_type,
                    masks=one_mask, weight_deltas_and_masks=one_delta, reuse_clean_prefix=True,
                )  # fmt: skip
                yield loss, 1
            return
        subset = (
            uniform_k_subset_routing_masks(list(masks), ref.shape[:-1], ref.device, sampler.generator)
            if routing == "subset"
            else None
        )
        loss = masked_recon_loss(
            model, batch, target_out, output_loss_type,
            masks=masks, weight_deltas_and_masks=deltas, routing_masks=subset, reuse_clean_prefix=True,
        )  # fmt: skip
        yield loss, 1

    return sampler.mean(body)


def repeat_rows(x: Tensor | KLTarget, k: int) -> Tensor | KLTarget:
    """x repeated k times along its first (batch) dim."""
    if isinstance(x, KLTarget):
        return x.repeat(k)
    return x.repeat(k, *[1] * (x.dim() - 1)) if k > 1 else x


def batched_layerwise_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor | KLTarget,
    output_loss_type: OutputLossType,
    names: list[str],
    masks: dict[str, Tensor],
    deltas: DeltaMasks | None,
) -> tuple[Tensor, int]:
    """(sum over `names` of the layerwise loss of each module alone, len(names)) from one forward of the
    batch repeated len(names) times, copy i masked in module names[i] only: every output loss here is a mean
    over rows of equal-sized copies, so the repeated batch's loss times len(names) is that sum."""
    k, rows = len(names), batch.shape[0]
    loss = masked_recon_loss(
        model, repeat_rows(batch, k), repeat_rows(target_out, k), output_loss_type,
        masks={name: masks[name] for name in names},
        weight_deltas_and_masks=None if deltas is None else {name: deltas[name] for name in names},
        row_slices={name: (i * rows, (i + 1) * rows) for i, name in enumerate(names)},
    )  # fmt: skip
    return loss * k, k


def folded_stochastic_recon_losses(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor | KLTarget,
    sampler: MaskSampler,
    output_loss_type: OutputLossType = "mse",
    layerwise_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """(stochastic_recon_loss with routing 'all', the same with 'layerwise') from one forward per mask
    sample: the batch repeated 1 + (modules) times, copy 0 masked in every module with the 'all' term's
    masks, copy 1 + i in module i only with the layerwise term's (ComponentModel's row_slices: every module
    masks copy 0 and its own copy). The masks are drawn as the two terms would draw them one after the
    other (every sample of the 'all' term, then of the layerwise one; the reverse with layerwise_first), so
    the values and gradients are theirs; one forward and backward instead of two, for (modules + 1) times
    the batch's activations."""
    first = [sampler.draw() for _ in range(sampler.n_mask_samples)]
    second = [sampler.draw() for _ in range(sampler.n_mask_samples)]
    if layerwise_first:
        first, second = second, first
    names = list(sampler.ci)
    k, rows = len(names), batch.shape[0]
    slices = {name: [(0, rows), ((1 + i) * rows, (2 + i) * rows)] for i, name in enumerate(names)}
    wide_batch = repeat_rows(batch, 1 + k)
    all_total: Tensor | float = 0.0
    layerwise_total: Tensor | float = 0.0
    for (masks, deltas), (lw_masks, lw_deltas) in zip(first, second):
        both_masks = {name: torch.cat([masks[name], lw_masks[name]]) for name in names}
        both_deltas = None
        if deltas is not None:
            both_deltas = {
                name: (deltas[name][0], torch.cat([deltas[name][1], lw_deltas[name][1]])) for name in names
            }
        all_loss, layerwise_mean = masked_recon_losses(
            model, wide_batch, [(target_out, rows), (repeat_rows(target_out, k), k * rows)], output_loss_type,
            masks=both_masks, weight_deltas_and_masks=both_deltas, row_slices=slices,
        )  # fmt: skip
        all_total = all_total + all_loss
        layerwise_total = layerwise_total + layerwise_mean  # the mean over modules of each one's loss
    return all_total / sampler.n_mask_samples, layerwise_total / sampler.n_mask_samples


def stochastic_hidden_acts_recon_loss(
    model: ComponentModel, batch: Tensor, pre_weight_acts: dict[str, Tensor], sampler: MaskSampler
) -> Tensor:
    """sum over samples and modules of sum (input under masks - clean input)^2 / total numel
    (modules with integer inputs, i.e. embeddings, are skipped)."""

    def body(masks: dict[str, Tensor], deltas: DeltaMasks | None) -> Iterator[tuple[Tensor, int]]:
        cache = model(batch, masks=masks, weight_deltas_and_masks=deltas, cache_acts=True).cache
        for name, clean in pre_weight_acts.items():
            if clean.is_floating_point():
                squares = (cache[name] - clean).pow(2).sum()
                members = model.members or 1
                if members > 1 and cache[name].dim() == clean.dim():  # upstream of every mask: all alike
                    squares = squares * members
                yield squares, clean.numel() * members

    return sampler.mean(body)


def ci_masked_recon_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    output_loss_type: OutputLossType = "mse",
) -> Tensor:
    """L(model(x; all modules masked by m = ci, no delta), target_out)."""
    return masked_recon_loss(model, batch, target_out, output_loss_type, masks=ci)


def unmasked_recon_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    output_loss_type: OutputLossType = "mse",
) -> Tensor:
    """L(model(x; all modules run V U with mask 1, no delta), target_out)."""
    ones = {
        name: torch.ones(C, device=model.component(name).V.device, dtype=model.component(name).V.dtype)
        for name, C in model.module_to_c.items()
    }
    return masked_recon_loss(model, batch, target_out, output_loss_type, masks=ones)


def pgd_sources(
    shapes: dict[str, tuple[int, ...]],
    init: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The PGD mask sources' start, one tensor of the given shape per module: U(0, 1), ones or zeros."""
    if init not in ("random", "ones", "zeros"):
        raise ValueError(f"unknown PGD init {init!r}; valid: ['random', 'ones', 'zeros']")
    if init == "random":
        return {n: uniform(sh, generator, device, dtype) for n, sh in shapes.items()}
    value = 1.0 if init == "ones" else 0.0
    return {n: torch.full(sh, value, device=device, dtype=dtype) for n, sh in shapes.items()}


def masks_from_sources(
    ci: dict[str, Tensor], sources: dict[str, Tensor], weight_deltas: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, WeightDeltaAndMask] | None]:
    """(masks ci + (1 - ci) s, {module: (delta, s_delta)} or None): each source (..., C [+ 1]) broadcast
    over ci's leading shape, its last entry the delta's mask when there are weight deltas."""
    masks: dict[str, Tensor] = {}
    delta_masks: dict[str, WeightDeltaAndMask] | None = {} if weight_deltas is not None else None
    for name, c in ci.items():
        s = sources[name].expand(*c.shape[:-1], -1)
        masks[name] = c + (1 - c) * s[..., : c.shape[-1]]
        if delta_masks is not None:
            delta_masks[name] = (weight_deltas[name], s[..., -1])
    return masks, delta_masks


def pgd_recon_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    weight_deltas: dict[str, Tensor] | None = None,
    n_steps: int = 1,
    step_size: float = 0.1,
    init: Literal["random", "ones", "zeros"] = "random",
    mask_scope: Literal["unique_per_datapoint", "shared_across_batch"] = "unique_per_datapoint",
    output_loss_type: OutputLossType = "mse",
    generator: torch.Generator | None = None,
    routing_masks: dict[str, Tensor] | None = None,
) -> Tensor:
    """Adversarial masks: sources s in [0, 1] (one extra for the delta), n_steps of s += step sign(dL/ds)
    then clamp; loss L(model(x; m = ci + (1 - ci) s, delta mask s_delta), target_out). The modules
    masked are those in ci; routing_masks (fixed over the steps) route positions as in a subset term."""
    ref = next(iter(ci.values()))
    lead_shape = ref.shape[:-1]
    src_lead = lead_shape if mask_scope == "unique_per_datapoint" else (1,) * len(lead_shape)
    if model.members is not None and mask_scope != "unique_per_datapoint":
        src_lead = (lead_shape[0], *src_lead[1:])  # shared across each member's batch, not across members
    extra = 0 if weight_deltas is None else 1
    shapes = {name: (*src_lead, c.shape[-1] + extra) for name, c in ci.items()}
    sources = pgd_sources(shapes, init, ref.device, ref.dtype, generator)

    def loss_at(srcs: dict[str, Tensor], ci_: dict[str, Tensor], deltas_: dict[str, Tensor] | None) -> Tensor:
        masks, dm = masks_from_sources(ci_, srcs, deltas_)
        return masked_recon_loss(
            model, batch, target_out, output_loss_type,
            masks=masks, weight_deltas_and_masks=dm, routing_masks=routing_masks,
        )  # fmt: skip

    # The inner steps only need d loss / d s, so they use detached ci and deltas (same values).
    ci_d = {k: v.detach() for k, v in ci.items()}
    deltas_d = None if weight_deltas is None else {k: v.detach() for k, v in weight_deltas.items()}
    for _ in range(n_steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in sources.items()}
        with torch.enable_grad():
            loss = loss_at(leaves, ci_d, deltas_d)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        sources = {
            k: (v.detach() + step_size * g.sign()).clamp_(0.0, 1.0)
            for (k, v), g in zip(leaves.items(), grads)
        }
    return loss_at(sources, ci, weight_deltas)


# ----------------------------------------------------------------------------- routed and layerwise terms
# The reference's CI-masked and PGD subset / layerwise variants. A subset term draws its routing masks
# from a router (routing.py): the stochastic one after each sample's masks, the PGD one before its
# sources. A layerwise term masks one module at a time (the others run the target) and averages over them.
def _route(router: Router, ci: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
    """The router's masks for every module in ci, over ci's leading shape."""
    ref = next(iter(ci.values()))
    return router(list(ci), tuple(ref.shape[:-1]), ref.device, generator)


def ci_masked_recon_subset_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    router: Router,
    output_loss_type: OutputLossType = "mse",
    generator: torch.Generator | None = None,
) -> Tensor:
    """L(model(x; masks = ci, no delta, routed per the router), target_out)."""
    routing = _route(router, ci, generator)
    return masked_recon_loss(model, batch, target_out, output_loss_type, masks=ci, routing_masks=routing)


def ci_masked_recon_layerwise_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    output_loss_type: OutputLossType = "mse",
) -> Tensor:
    """mean over modules l of L(model(x; module l masked by ci_l, no delta, the others the target))."""
    total = sum(
        masked_recon_loss(model, batch, target_out, output_loss_type, masks={name: c})
        for name, c in ci.items()
    )
    return total / len(ci)


def stochastic_recon_routed_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    weight_deltas: dict[str, Tensor] | None,
    router: Router,
    sampling: Sampling = "continuous",
    n_mask_samples: int = 1,
    output_loss_type: OutputLossType = "mse",
    generator: torch.Generator | None = None,
) -> Tensor:
    """stochastic_recon_subset with any router: mean over samples of L(model(x; m, r Delta, routed)),
    each sample drawing masks, then delta masks, then routing masks."""
    total = torch.zeros((), device=next(iter(ci.values())).device)
    for _ in range(n_mask_samples):
        masks = stochastic_masks(ci, sampling, generator)
        deltas = None if weight_deltas is None else weight_delta_masks(ci, weight_deltas, generator)
        routing = _route(router, ci, generator)
        total = total + masked_recon_loss(
            model, batch, target_out, output_loss_type,
            masks=masks, weight_deltas_and_masks=deltas, routing_masks=routing,
        )  # fmt: skip
    return total / n_mask_samples


def pgd_recon_subset_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    router: Router,
    weight_deltas: dict[str, Tensor] | None = None,
    n_steps: int = 1,
    step_size: float = 0.1,
    init: Literal["random", "ones", "zeros"] = "random",
    mask_scope: Literal["unique_per_datapoint", "shared_across_batch"] = "unique_per_datapoint",
    output_loss_type: OutputLossType = "mse",
    generator: torch.Generator | None = None,
) -> Tensor:
    """pgd_recon with routing masks drawn once (before the sources) and kept over the PGD steps."""
    routing = _route(router, ci, generator)
    return pgd_recon_loss(
        model, batch, target_out, ci, weight_deltas, n_steps, step_size, init, mask_scope, output_loss_type,
        generator, routing,
    )  # fmt: skip


def pgd_recon_layerwise_loss(
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    weight_deltas: dict[str, Tensor] | None = None,
    n_steps: int = 1,
    step_size: float = 0.1,
    init: Literal["random", "ones", "zeros"] = "random",
    mask_scope: Literal["unique_per_datapoint", "shared_across_batch"] = "unique_per_datapoint",
    output_loss_type: OutputLossType = "mse",
    generator: torch.Generator | None = None,
) -> Tensor:
    """mean over modules l of pgd_recon with only module l masked (its own sources, its own PGD run)."""
    total = torch.zeros((), device=next(iter(ci.values())).device)
    for name, c in ci.items():
        one_delta = None if weight_deltas is None else {name: weight_deltas[name]}
        total = total + pgd_recon_loss(
            model, batch, target_out, {name: c}, one_delta, n_steps, step_size, init, mask_scope,
            output_loss_type, generator,
        )  # fmt: skip
    return total / len(ci)
