"""SPD loss orchestration (one training objective from the loss functions in `losses.py`) and per-batch
evaluation figures, kept out of the LightningModule so it stays readable and the benchmark can reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses as L
from .component_model import ComponentModel, stochastic_masks, weight_delta_masks
from .config import ObjectiveConfig
from .routing import Router, make_subset_router

# the stochastic output-recon terms: which modules each one masks (losses.stochastic_recon_loss)
RECON_ROUTING: dict[str, L.Routing] = {
    "stochastic_recon": "all",
    "stochastic_recon_layerwise": "layerwise",
    "stochastic_recon_subset": "subset",
}


# the two stochastic terms one forward serves when the layerwise one is batched all in one (SPDObjective)
FOLDED_TERMS = ("stochastic_recon", "stochastic_recon_layerwise")

# the terms that need no Delta = W - V U values when the sampled terms (MaskSampler's) take the delta term
# from the target's output: those, and the ones without a delta term (faithfulness forms Delta itself)
DELTA_FREE_TERMS = frozenset(
    {"importance_minimality", "faithfulness", "ci_masked_recon", "ci_masked_recon_subset",
     "ci_masked_recon_layerwise", "unmasked_recon", "stochastic_hidden_acts_recon", *RECON_ROUTING}
)  # fmt: skip


class ObjectiveOutput(NamedTuple):
    """Total loss, each term (unweighted), the CIs and the target's clean output and module inputs."""

    total: Tensor
    terms: dict[str, Tensor]
    ci: dict[str, Tensor]
    ci_upper: dict[str, Tensor]
    target_out: Tensor
    pre_weight_acts: dict[str, Tensor]


class SPDObjective(ObjectiveConfig):
    """total = sum_k coeff_k loss_k over the terms with a positive coefficient (see losses.py)."""

    def p(self, step_frac: float) -> float:
        """The importance-minimality exponent at this fraction of training."""
        return L.annealed_p(
            step_frac,
            self.importance_p,
            self.importance_p_end,
            self.p_anneal_start_frac,
            self.p_anneal_end_frac,
        )

    def subset_router(self) -> Router:
        """The router of the subset terms (subset_routing, subset_routing_p)."""
        return make_subset_router(self.subset_routing, self.subset_routing_p)

    def _folds_stochastic_terms(self, active: list[str], modules: int) -> bool:
        """Whether the all-modules and the layerwise stochastic terms run as one forward: when the layerwise
        forwards are batched all in one (layerwise_batch >= the modules) and the two terms come one after
        the other (nothing draws random numbers between them, so each draws the masks it would alone)."""
        if self.layerwise_batch < modules or not all(t in active for t in FOLDED_TERMS):
            return False
        return abs(active.index(FOLDED_TERMS[0]) - active.index(FOLDED_TERMS[1])) == 1

    def __call__(
        self, model: ComponentModel, batch: Tensor, step_frac: float, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        """All active terms for one batch (masks resampled independently for every term). For a member
        ensemble (model.members = k) each term is the mean over the members of each one's and the total
        the sum of the members' totals (members.py); `generator` then a MemberGenerators, or one generator
        drawing for all members."""
        if model.members is not None:
            self.check_members()
        with torch.no_grad():
            target_out, acts = model(batch, cache_acts=True)  # clean output, each module's input
        ci, ci_upper = model.calc_causal_importances(acts, sampling=self.sampling)
        # KL terms share the target's softmax, computed once per batch
        recon_target = L.KLTarget.from_logits(target_out) if self.output_loss_type == "kl" else target_out
        active = {k: c for k, c in self.loss_coeffs.items() if c > 0}
        # Delta's values: for faithfulness, and for the delta term unless the sampled terms take it from
        # the target's output and no other term (routed subset, PGD) needs them
        from_output = self.use_delta_component and self.delta_from_target_output
        routed = "stochastic_recon_subset" in active and self.subset_routing != "uniform_k_subset"
        sampled_only = active.keys() <= DELTA_FREE_TERMS and not routed
        values_needed = self.use_delta_component and not (from_output and sampled_only)
        deltas = model.weight_deltas() if values_needed or "faithfulness" in active else None
        recon_deltas = deltas if self.use_delta_component else None
        sampler = L.MaskSampler(
            ci, None if from_output else recon_deltas, self.sampling, self.n_mask_samples, generator,
            delta_from_output=from_output,
        )  # fmt: skip
        out_type = self.output_loss_type
        # under autocast not where Delta is formed for the sampled terms: the fold's rows would take their delta
        # term from the target's output instead, the same function rounded otherwise
        delta_formed = self.use_delta_component and not from_output
        fold = self._folds_stochastic_terms(list(active), len(ci))
        fold = fold and not (model.autocast_active and delta_formed) and model.members is None
        terms: dict[str, Tensor] = {}
        for name in active:
            if name in terms:  # computed with the term before it (fold)
                continue
            if fold and name in FOLDED_TERMS:
                all_loss, layerwise = L.folded_stochastic_recon_losses(
                    model, batch, recon_target, sampler, out_type, layerwise_first=name != FOLDED_TERMS[0]
                )
                folded = {FOLDED_TERMS[0]: all_loss, FOLDED_TERMS[1]: layerwise}
                terms |= {term: folded[term] for term in active if term in folded}  # in their order
            elif name == "faithfulness":
                terms[name] = L.faithfulness_loss(deltas)
            elif name == "importance_minimality":
                terms[name] = L.importance_minimality_loss(ci_upper, self.p(step_frac), members=model.members)
            elif name == "stochastic_recon_subset" and self.subset_routing != "uniform_k_subset":
                terms[name] = L.stochastic_recon_routed_loss(
                    model, batch, recon_target, ci, recon_deltas, self.subset_router(), self.sampling,
                    self.n_mask_samples, out_type, generator,
                )  # fmt: skip
            elif name in RECON_ROUTING:
                terms[name] = L.stochastic_recon_loss(
                    model, batch, recon_target, sampler, out_type, RECON_ROUTING[name], self.layerwise_batch
                )
            elif name == "ci_masked_recon":
                terms[name] = L.ci_masked_recon_loss(model, batch, recon_target, ci, out_type)
            elif name == "ci_masked_recon_subset":
                router = self.subset_router()
                terms[name] = L.ci_masked_recon_subset_loss(
                    model, batch, recon_target, ci, router, out_type, generator
                )
            elif name == "ci_masked_recon_layerwise":
                terms[name] = L.ci_masked_recon_layerwise_loss(model, batch, recon_target, ci, out_type)
            elif name == "unmasked_recon":
                terms[name] = L.unmasked_recon_loss(model, batch, recon_target, out_type)
            elif name in ("pgd_recon", "pgd_recon_layerwise"):
                p = self.pgd
                fn = L.pgd_recon_loss if name == "pgd_recon" else L.pgd_recon_layerwise_loss
                terms[name] = fn(
                    model, batch, recon_target, ci, recon_deltas, p.n_steps, p.step_size, p.init,
                    p.mask_scope, out_type, generator,
                )  # fmt: skip
            elif name == "pgd_recon_subset":
                p = self.pgd
                terms[name] = L.pgd_recon_subset_loss(
                    model, batch, recon_target, ci, self.subset_router(), recon_deltas, p.n_steps,
                    p.step_size, p.init, p.mask_scope, out_type, generator,
                )  # fmt: skip
            elif name == "stochastic_hidden_acts_recon":
                terms[name] = L.stochastic_hidden_acts_recon_loss(model, batch, acts, sampler)
        total = sum(self.loss_coeffs[k] * v for k, v in terms.items())
        if model.members is not None:  # the members' mean -> their sum: each member its own run's gradient
            total = total * model.members
        return ObjectiveOutput(total, terms, ci, ci_upper, target_out, acts)

    def check_members(self) -> None:
        """What member ensembles cannot run (members.py), as a clear error."""
        if self.output_loss_type != "mse":
            raise ValueError(
                f"members: output_loss_type must be 'mse' (toy targets), got {self.output_loss_type!r}"
            )
        if self.layerwise_batch > 1:
            raise ValueError(
                f"members: layerwise_batch must be 1 (row-sliced forwards), got {self.layerwise_batch}"
            )


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_batch(
    model: ComponentModel,
    batch: Tensor,
    output_loss_type: L.OutputLossType,
    use_delta_component: bool,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    l0_threshold: float = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(scalar metrics, ci) for one batch: recon losses of ci-masked / unmasked / stochastic / zero
    masks, faithfulness, mean target output^2, and two L0s per module: `l0_ci_gt_0` (components with
    ci > 0) and, for l0_threshold > 0, the reference's `l0_ci_gt_<threshold>` (ci > the alive threshold),
    each the mean over examples / tokens; with labels (LMs) CE and KL of each mask type."""
    target_out, acts = model(batch, cache_acts=True)
    ci, _ = model.calc_causal_importances(acts, sampling="continuous")
    deltas = model.weight_deltas()
    ones = {n: torch.ones_like(c) for n, c in ci.items()}
    zeros = {n: torch.zeros_like(c) for n, c in ci.items()}
    rounded = {n: (c > 0).to(c.dtype) for n, c in ci.items()}
    stoch_deltas = weight_delta_masks(ci, deltas, generator) if use_delta_component else None
    outputs = {
        "ci_masked": model(batch, masks=ci),
        "unmasked": model(batch, masks=ones),
        "stochastic": model(
            batch, masks=stochastic_masks(ci, "continuous", generator), weight_deltas_and_masks=stoch_deltas
        ),
        "rounded": model(batch, masks=rounded),
        "zero": model(batch, masks=zeros),
    }
    recon_target = L.KLTarget.from_logits(target_out) if output_loss_type == "kl" else target_out
    metrics: dict[str, Tensor] = {
        f"recon/{k}": L.output_recon_loss(v, recon_target, output_loss_type) for k, v in outputs.items()
    }
    metrics["faithfulness"] = L.faithfulness_loss(deltas)
    metrics["target_output_sq"] = target_out.float().pow(2).mean()  # the target's MSE against zero
    for name, c in ci.items():
        for key in l0_keys(l0_threshold):
            metrics[f"{key}/{name}"] = (c > l0_key_threshold(key)).sum(-1).float().mean()
    if labels is not None:
        kl_target = recon_target if output_loss_type == "kl" else L.KLTarget.from_logits(target_out)
        flat = labels.flatten()
        metrics["lm/ce_target"] = F.cross_entropy(target_out.flatten(0, -2).float(), flat)
        for kind, out in outputs.items():
            metrics[f"lm/ce_{kind}"] = F.cross_entropy(out.flatten(0, -2).float(), flat)
            metrics[f"lm/kl_{kind}"] = L.output_recon_loss(out, kl_target, "kl")
    return metrics, ci


def l0_keys(threshold: float) -> tuple[str, ...]:
    """Metric names of the L0s: 'l0_ci_gt_0' and, for threshold > 0, 'l0_ci_gt_<threshold>'."""
    return ("l0_ci_gt_0",) if threshold <= 0 else ("l0_ci_gt_0", f"l0_ci_gt_{threshold:g}")


def l0_key_threshold(key: str) -> float:
    """The CI threshold an l0_keys name counts above."""
    return float(key.removeprefix("l0_ci_gt_"))


def add_ce_unrecovered(metrics: dict[str, float]) -> dict[str, float]:
    """Add lm/ce_unrecovered[_kind] = (ce - ce_target) / (ce_zero - ce_target) where the CEs exist."""
    if "lm/ce_target" not in metrics or "lm/ce_zero" not in metrics:
        return metrics
    base, zero = metrics["lm/ce_target"], metrics["lm/ce_zero"]
    denom = zero - base if abs(zero - base) > 1e-12 else float("nan")
    for kind in ("ci_masked", "unmasked", "stochastic", "rounded"):
        if f"lm/ce_{kind}" in metrics:
            metrics[f"lm/ce_unrecovered_{kind}"] = (metrics[f"lm/ce_{kind}"] - base) / denom
    metrics["lm/ce_unrecovered"] = metrics.get("lm/ce_unrecovered_ci_masked", float("nan"))
    return metrics


class EvalAccumulator:
    """Example-weighted means of scalar metrics, alive components, CI histograms and activation density."""

    def __init__(
        self, module_to_c: dict[str, int], alive_threshold: float = 0.1, hist_bins: int = 50
    ) -> None:
        self.module_to_c, self.alive_threshold, self.hist_bins = dict(module_to_c), alive_threshold, hist_bins
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.alive = {n: torch.zeros(C, dtype=torch.bool) for n, C in self.module_to_c.items()}
        self.active = {n: torch.zeros(C, dtype=torch.float64) for n, C in self.module_to_c.items()}
        self.hist = {n: torch.zeros(self.hist_bins, dtype=torch.float64) for n in self.module_to_c}
        self.n_examples = 0

    @torch.no_grad()
    def update(self, metrics: dict[str, Tensor], ci: dict[str, Tensor]) -> None:
        """Add one batch (weights = examples or tokens in ci's leading dims)."""
        n = next(iter(ci.values())).shape[:-1].numel()
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
            self.weights[k] = self.weights.get(k, 0.0) + n
        for name, c in ci.items():
            flat = c.detach().float().flatten(0, -2).cpu()  # (n, C)
            on = flat > self.alive_threshold
            self.alive[name] |= on.any(0)
            self.active[name] += on.sum(0).double()
            self.hist[name] += torch.histc(flat, bins=self.hist_bins, min=0.0, max=1.0).double()
        self.n_examples += n

    def means(self) -> dict[str, float]:
        """Metric means plus alive_components/<module>."""
        out = {k: self.sums[k] / self.weights[k] for k in self.sums}
        out.update({f"alive_components/{n}": float(a.sum()) for n, a in self.alive.items()})
        return add_ce_unrecovered(out)

    def density(self) -> dict[str, Tensor]:
        """Per module: fraction of examples with ci > threshold, per component (C,)."""
        return {n: (a / max(1, self.n_examples)).float() for n, a in self.active.items()}


def faithfulness_warmup(model: ComponentModel, steps: int, lr: float, weight_decay: float) -> float:
    """Fit V, U to the target weights (faithfulness loss only) with their own AdamW; returns the last loss."""
    params = [p for comp in model.components.values() for p in (comp.V, comp.U)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            # members: the mean over the members -> their sum (each member its own run's gradient)
            loss = L.faithfulness_loss(model.weight_deltas()) * (model.members or 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return loss.detach().item() / (model.members or 1)


def write_results(
    path: Path, module_to_c: dict[str, int], metrics: dict[str, float], extra: dict[str, Any]
) -> dict[str, Any]:
    """spd_results.json: every final metric, regrouped per module (C and every `<key>/<module>` metric:
    alive_components, l0_ci_gt_0, l0_ci_gt_<threshold>, mmcs, ml2r, identity_ci_error, ... where
    computed) and for LMs the CE / KL figures under "lm"."""
    per_module: dict[str, dict[str, float]] = {name: {"C": C} for name, C in module_to_c.items()}
    for key, value in metrics.items():
        prefix, _, name = key.partition("/")
        if name in per_module and prefix not in ("lm", "recon"):
            per_module[name][prefix] = value
    lm = {k.removeprefix("lm/"): v for k, v in metrics.items() if k.startswith("lm/")}
    results = {**extra, "modules": per_module, "metrics": metrics, "lm": lm}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    return results
