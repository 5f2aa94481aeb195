"""The naive SPD reference: the same method as `lightning_modules.spd` without its optimisations.

Hooks registered and removed on every forward, target weights re-read and copied on every use, einsum
everywhere under plain autograd, KL through log_softmax with the target's recomputed every term, float32.
It draws its random numbers in the order `SPDObjective` does, so with the same seed and batch both give
the same losses and gradients (tests/test_spd_fast_vs_naive.py; benchmarks/spd_speed.py times both).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.sparse_features import sparse_feature_batch
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT
from lightning_modules.spd import losses as L
from lightning_modules.spd.ci_functions import MLPCiFn, SharedMLPCiFn, VectorMLPCiFn
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from lightning_modules.spd.targets import output_head_name
from lightning_modules.spd.toy_models import TMSModel, train_toy_model

# the terms NaiveSPD.losses computes, and the setups both implementations are compared (and timed) on
COEFFS = {"importance_minimality": 3e-3, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0}
CONFIGS: dict[str, dict[str, Any]] = {
    "tms_5-2": dict(kind="tms", batch=4096, patterns={"linear1": 20, "linear2": 20}, ci="mlp", hidden=[16]),
    "tiny_lm": dict(
        kind="lm",
        batch=8,
        seq=64,
        patterns={
            "transformer.h.*.attn.c_attn": 96,
            "transformer.h.*.attn.c_proj": 64,
            "transformer.h.*.mlp.c_fc": 128,
            "transformer.h.*.mlp.c_proj": 128,
        },
        ci="shared_mlp",
        hidden=[128],
    ),
}


# ----------------------------------------------------------------------------- the naive implementation
def naive_output_loss(pred: Tensor, target_out: Tensor, output_loss_type: str) -> Tensor:
    """MSE, or KL through log_softmax of both sides, the target's recomputed on every call."""
    if output_loss_type == "mse":
        return (pred - target_out).pow(2).sum() / pred.numel()
    log_p, log_q = torch.log_softmax(target_out.float(), -1), torch.log_softmax(pred.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class NaiveSPD(nn.Module):
    """The same SPD method without our optimisations (shares V, U and CI weights with `ours` at start)."""

    def __init__(self, ours: ComponentModel) -> None:
        super().__init__()
        self.target = copy.deepcopy(ours.target_model)
        for module in self.target.modules():
            module._forward_hooks.clear()  # the copy carried our persistent hooks; the naive way adds its own
        self.target.requires_grad_(False)
        self._target_modules = dict(self.target.named_modules())
        self.names = list(ours.module_names)
        self.V = nn.ParameterDict(
            {n.replace(".", "-"): nn.Parameter(ours.component(n).V.detach().clone()) for n in self.names}
        )
        self.U = nn.ParameterDict(
            {n.replace(".", "-"): nn.Parameter(ours.component(n).U.detach().clone()) for n in self.names}
        )
        self.ci_fns = nn.ModuleDict({n.replace(".", "-"): copy.deepcopy(ours.ci_fn(n)) for n in self.names})

    def vu(self, name: str) -> tuple[Tensor, Tensor]:
        key = name.replace(".", "-")
        return self.V[key], self.U[key]

    def target_weight(self, name: str) -> Tensor:
        """Re-read and copied on every call (no cache)."""
        return self._target_modules[name].weight.detach().clone()

    def run(
        self,
        x: Tensor,
        masks: dict[str, Tensor] | None = None,
        deltas: dict | None = None,
        cache: bool = False,
        routing: dict[str, Tensor] | None = None,
    ):
        """Register a hook per module, run the target, remove the hooks (routing[name] (...) bool: where
        False, the module keeps the target's output)."""
        acts: dict[str, Tensor] = {}
        masks, deltas, routing = masks or {}, deltas or {}, routing or {}

        def hook(module: nn.Module, args: tuple, output: Tensor, name: str) -> Tensor | None:
            inp = args[0]
            if cache:
                acts[name] = inp
            if name not in masks:
                return None
            V, U = self.vu(name)
            out = ((inp @ V) * masks[name]) @ U
            if name in deltas:
                delta, r = deltas[name]
                out = out + r.unsqueeze(-1) * (inp @ delta.t())
            if module.bias is not None:
                out = out + module.bias
            if name in routing:
                out = torch.where(routing[name].unsqueeze(-1), out, output)
            return out

        handles = [self._target_modules[n].register_forward_hook(partial(hook, name=n)) for n in self.names]
        try:
            out = self.target(x)
        finally:
            for h in handles:
                h.remove()
        return (out, acts) if cache else out

    def ci(self, acts: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """CI functions evaluated with einsum in every layer."""
        lower, upper = {}, {}
        for name in self.names:
            fn = self.ci_fns[name.replace(".", "-")]
            V, _ = self.vu(name)
            if isinstance(fn, MLPCiFn):
                h = (acts[name] @ V).unsqueeze(-1) * fn.weights[0][:, 0, :] + fn.biases[0]
            elif isinstance(fn, VectorMLPCiFn):
                h = torch.einsum("...i,cio->...co", acts[name], fn.weights[0]) + fn.biases[0]
            if isinstance(fn, SharedMLPCiFn):
                s = fn.net(acts[name])
            else:
                for i in range(1, len(fn.weights)):
                    h = torch.einsum("...ci,cio->...co", nn.functional.gelu(h), fn.weights[i]) + fn.biases[i]
                s = h.squeeze(-1)
            lower[name], upper[name] = lower_leaky_hard_sigmoid(s), upper_leaky_hard_sigmoid(s)
        return lower, upper

    def losses(self, x: Tensor, output_loss_type: str, p: float) -> dict[str, Tensor]:
        """importance minimality + stochastic recon + layerwise, drawing randoms in our order."""
        with torch.no_grad():
            target_out, acts = self.run(x, cache=True)
        ci, ci_upper = self.ci(acts)
        deltas = {n: self.target_weight(n) - (self.vu(n)[0] @ self.vu(n)[1]).t() for n in self.names}
        terms = {"importance_minimality": L.importance_minimality_loss(ci_upper, p)}

        def draw() -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
            masks = {
                n: ci[n] + (1 - ci[n]) * torch.rand(ci[n].shape, device=ci[n].device) for n in self.names
            }
            dm = {n: (deltas[n], torch.rand(ci[n].shape[:-1], device=ci[n].device)) for n in self.names}
            return masks, dm

        masks, dm = draw()
        out = self.run(x, masks=masks, deltas=dm)
        terms["stochastic_recon"] = naive_output_loss(out, target_out, output_loss_type)
        masks, dm = draw()
        total = 0.0
        for n in self.names:
            total = total + naive_output_loss(
                self.run(x, masks={n: masks[n]}, deltas={n: dm[n]}), target_out, output_loss_type
            )
        terms["stochastic_recon_layerwise"] = total / len(self.names)
        return terms


# ----------------------------------------------------------------------------- setup
def build(name: str, device: str, seed: int = 0) -> tuple[ComponentModel, Tensor, str]:
    """(our ComponentModel, a batch, output loss type) for a config."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    if cfg["kind"] == "tms":
        target = TMSModel(5, 2)
        train_toy_model(target, steps=300, batch=1024, seed=seed)
        x = sparse_feature_batch(cfg["batch"], 5, 0.05, torch.Generator().manual_seed(seed))
        loss_type = "mse"
    else:
        target = GPT(GPTConfig(block_size=256, vocab_size=4096, n_layer=4, n_head=4, n_embd=128))
        x = torch.randint(0, 4096, (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(seed))
        loss_type = "kl"
    cm = ComponentModel(
        target.to(device), cfg["patterns"], cfg["ci"], cfg["hidden"], "leaky_hard",
        output_head=output_head_name(target),  # as SPDLightningModule builds it: the LM's head fused into the KL
    )  # fmt: skip
    return cm, x.to(device), loss_type


# ----------------------------------------------------------------------------- the reference's variants
# Naive forms of the reference's routed, layerwise and PGD terms (goodfire-ai/spd spd/metrics/*.py,
# spd/routing.py, spd/metrics/pgd_utils.py), written the reference's way: sum of losses over forwards
# divided by the summed example counts, routers as explicit masks, PGD on leaf sources with the reference's
# update s <- clamp(s + step sign(grad), 0, 1). They draw random numbers in the order ours do.
def naive_sum_loss(pred: Tensor, target_out: Tensor, output_loss_type: str) -> tuple[Tensor, int]:
    """(summed loss, examples): elements for MSE, tokens for KL (the reference's calc_sum_recon_loss_lm)."""
    n = pred.numel() if output_loss_type == "mse" else pred.shape[:-1].numel()
    return naive_output_loss(pred, target_out, output_loss_type) * n, n


def naive_uniform_k_routing(
    names: list[str], shape: tuple[int, ...], g: torch.Generator
) -> dict[str, Tensor]:
    """k ~ U{1..L} per position, then the modules whose rank in a random permutation is below k."""
    k = torch.randint(1, len(names) + 1, shape, generator=g)
    ranks = torch.rand((len(names), *shape), generator=g).argsort(0).argsort(0)
    return {n: ranks[i] < k for i, n in enumerate(names)}


def naive_static_routing(names: list[str], shape: tuple[int, ...], p: float, g: torch.Generator) -> dict:
    """Each (module, position) routed with probability p."""
    return {n: torch.rand(shape, generator=g) < p for n in names}


def naive_layer_routing(names: list[str], shape: tuple[int, ...], layer: str) -> dict[str, Tensor]:
    """The reference's LayerRouter: every position of `layer`, nothing of the others."""
    return {n: torch.full(shape, n == layer, dtype=torch.bool) for n in names}


def naive_ci_masked_subset(
    naive: NaiveSPD, x: Tensor, target_out: Tensor, ci: dict, routing: dict, kind: str
):
    """CIMaskedReconSubsetLoss: masks = ci, no delta, routed."""
    s, n = naive_sum_loss(naive.run(x, masks=ci, routing=routing), target_out, kind)
    return s / n


def naive_ci_masked_layerwise(naive: NaiveSPD, x: Tensor, target_out: Tensor, ci: dict, kind: str) -> Tensor:
    """CIMaskedReconLayerwiseLoss: one module masked by its ci per forward, summed losses / summed counts."""
    total, count = 0.0, 0
    for name in naive.names:
        s, n = naive_sum_loss(naive.run(x, masks={name: ci[name]}), target_out, kind)
        total, count = total + s, count + n
    return total / count


def naive_pgd(
    naive: NaiveSPD,
    x: Tensor,
    target_out: Tensor,
    ci: dict[str, Tensor],
    deltas: dict[str, Tensor] | None,
    sources: dict[str, Tensor],
    n_steps: int,
    step_size: float,
    kind: str,
    routing: dict[str, Tensor] | None = None,
) -> Tensor:
    """pgd_masked_recon_loss_update from given start sources (..., C [+1]) for every module in `sources`."""
    lead = next(iter(ci.values())).shape[:-1]
    adv = {k: v.clone().requires_grad_(True) for k, v in sources.items()}

    def forward() -> Tensor:
        masks, dm = {}, {}
        for name, src in adv.items():
            s = src.expand(*lead, -1)
            C = ci[name].shape[-1]
            masks[name] = ci[name] + (1 - ci[name]) * s[..., :C]
            if deltas is not None:
                dm[name] = (deltas[name], s[..., -1])
        s, n = naive_sum_loss(naive.run(x, masks=masks, deltas=dm, routing=routing), target_out, kind)
        return s / n

    for _ in range(n_steps):
        with torch.enable_grad():
            loss = forward()
        grads = torch.autograd.grad(loss, list(adv.values()))
        with torch.no_grad():
            for src, g in zip(adv.values(), grads):
                src.add_(step_size * g.sign()).clamp_(0.0, 1.0)
    return forward()


def naive_pgd_multibatch(
    naive: NaiveSPD,
    batches: list[Tensor],
    sources: dict[str, Tensor],
    n_steps: int,
    step_size: float,
    kind: str,
    use_delta: bool,
    route=None,
) -> float:
    """calc_multibatch_pgd_masked_recon_loss: shared sources, gradients of the summed losses accumulated
    over the batches (target output and CIs recomputed per batch), sign step; final summed loss / count.
    route(names, lead_shape) -> routing masks, called per batch after its CIs (None: every module)."""
    adv = {k: v.clone().requires_grad_(True) for k, v in sources.items()}

    def sweep() -> tuple[float, int, dict[str, Tensor]]:
        total, count = 0.0, 0
        acc = {k: torch.zeros_like(v) for k, v in adv.items()}
        for x in batches:
            with torch.no_grad():
                target_out, acts = naive.run(x, cache=True)
                ci, _ = naive.ci(acts)
                deltas = (
                    {n: naive.target_weight(n) - (naive.vu(n)[0] @ naive.vu(n)[1]).t() for n in naive.names}
                    if use_delta
                    else None
                )
            lead = next(iter(ci.values())).shape[:-1]
            routing = None if route is None else route(naive.names, tuple(lead))
            masks, dm = {}, {}
            with torch.enable_grad():
                for name, src in adv.items():
                    s = src.expand(*lead, -1)
                    masks[name] = ci[name] + (1 - ci[name]) * s[..., : ci[name].shape[-1]]
                    if deltas is not None:
                        dm[name] = (deltas[name], s[..., -1])
                out = naive.run(x, masks=masks, deltas=dm, routing=routing)
                s_loss, n = naive_sum_loss(out, target_out, kind)
            for k, g in zip(adv, torch.autograd.grad(s_loss, list(adv.values()))):
                acc[k] += g
            total, count = total + float(s_loss.detach()), count + n
        return total, count, acc

    for _ in range(n_steps):
        _, _, acc = sweep()
        with torch.no_grad():
            for k, src in adv.items():
                src.add_(step_size * acc[k].sign()).clamp_(0.0, 1.0)
    total, count, _ = sweep()
    return total / count
