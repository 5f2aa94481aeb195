"""Multi-batch PGD evaluation: one adversarial mask source per module, shared by every example of several
batches, optimised against their summed reconstruction loss.

The per-batch PGD terms (losses.pgd_recon_loss and its subset / layerwise variants) attack each batch
on its own; this evaluation asks how bad a single fixed mask can be over many inputs, the reference's
`PGDMultiBatchReconLoss` (routing 'all') and `PGDMultiBatchReconSubsetLoss` (routing by a subset router).
Per step: for each batch, the target output and the CIs are recomputed (nothing is kept across batches),
d(summed loss)/d(sources) accumulated; then s += step_size sign(grad), clamped to [0, 1]. The value is the
summed loss over the batches at the final sources divided by their example count (tokens for 'kl',
elements for 'mse'), so one batch gives exactly losses.pgd_recon_loss with mask_scope shared_across_batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from . import losses as L
from .component_model import ComponentModel, Sampling
from .config import ObjectiveConfig
from .routing import Router, make_subset_router


def _init_sources(
    model: ComponentModel,
    n_lead: int,
    extra: int,
    init: str,
    device: torch.device,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """One (1, ..., 1, C [+1]) source per module: U(0, 1), ones or zeros."""
    shapes = {name: (*(1,) * n_lead, C + extra) for name, C in model.module_to_c.items()}
    return L.pgd_sources(shapes, init, device, generator=generator)


def _batch_sum_loss(
    model: ComponentModel,
    batch: Tensor,
    sources: dict[str, Tensor],
    use_delta_component: bool,
    output_loss_type: L.OutputLossType,
    sampling: Sampling,
    router: Router | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """(summed recon loss of this batch under masks ci + (1 - ci) s, its example count)."""
    with torch.no_grad():
        target_out, acts = model(batch, cache_acts=True)
        ci, _ = model.calc_causal_importances(acts, sampling=sampling)
        deltas = model.weight_deltas() if use_delta_component else None
    lead = next(iter(ci.values())).shape[:-1]
    routing = None if router is None else router(list(ci), tuple(lead), batch.device, generator)
    masks, dm = L.masks_from_sources(ci, sources, deltas)
    n = target_out.numel() if output_loss_type == "mse" else target_out.shape[:-1].numel()
    recon_target = L.KLTarget.from_logits(target_out) if output_loss_type == "kl" else target_out
    loss = L.masked_recon_loss(
        model, batch, recon_target, output_loss_type,
        masks=masks, weight_deltas_and_masks=dm, routing_masks=routing,
    )  # fmt: skip
    return loss * n, n


def pgd_multibatch_recon_loss(
    model: ComponentModel,
    batches: Callable[[], Iterable[Tensor]],
    n_steps: int,
    step_size: float,
    init: str = "random",
    output_loss_type: L.OutputLossType = "mse",
    use_delta_component: bool = True,
    sampling: Sampling = "continuous",
    router: Router | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Recon loss at sources optimised over all of `batches()` (called once per step and once more: it
    must give the same batches every time); router None routes every module everywhere."""
    first = next(iter(batches()))
    device = first.device
    with torch.no_grad():  # the CIs' number of leading dims: (batch,) for toys, (batch, seq) for LMs
        probe = model.component_acts(model(first, cache_acts=True).cache)
    n_lead = next(iter(probe.values())).dim() - 1
    sources = _init_sources(model, n_lead, int(use_delta_component), init, device, generator)

    def sweep(need_grad: bool) -> tuple[float, int, dict[str, Tensor]]:
        total, count = 0.0, 0
        grads = {k: torch.zeros_like(v) for k, v in sources.items()}
        for batch in batches():
            leaves = {k: v.detach().requires_grad_(need_grad) for k, v in sources.items()}
            with torch.enable_grad() if need_grad else torch.no_grad():
                loss, n = _batch_sum_loss(
                    model, batch, leaves, use_delta_component, output_loss_type, sampling, router, generator
                )
            if need_grad:
                for k, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
                    grads[k] += g
            total += float(loss.detach())
            count += n
        return total, count, grads

    for _ in range(n_steps):
        _, _, grads = sweep(need_grad=True)
        sources = {k: (v + step_size * grads[k].sign()).clamp_(0.0, 1.0) for k, v in sources.items()}
    total, count, _ = sweep(need_grad=False)
    return total / max(count, 1)


def pgd_multibatch_metrics(
    model: ComponentModel,
    objective: ObjectiveConfig,
    batches: Iterable[Tensor],
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """{'pgd_multibatch_recon[_subset]': value} per objective.pgd.multibatch_routings over the first
    multibatch_n_batches of `batches` (inputs only; kept in a list so every step sees the same ones);
    {} when multibatch_n_batches is 0 or there are no batches."""
    p = objective.pgd
    kept = list(itertools.islice(batches, p.multibatch_n_batches))
    if not kept:
        return {}
    out = {}
    for routing in p.multibatch_routings:
        router = (
            None
            if routing == "all"
            else make_subset_router(objective.subset_routing, objective.subset_routing_p)
        )
        key = "pgd_multibatch_recon" if routing == "all" else "pgd_multibatch_recon_subset"
        with torch.inference_mode(False), torch.enable_grad():
            out[key] = pgd_multibatch_recon_loss(
                model, lambda: kept, p.multibatch_n_steps, p.multibatch_step_size, p.multibatch_init,
                objective.output_loss_type, objective.use_delta_component, objective.sampling, router,
                generator,
            )  # fmt: skip
    return out
