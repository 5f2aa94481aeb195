"""ComponentModel: a frozen target model whose chosen weight matrices can be swapped for masked components.

Forward hooks are registered once, at construction, on every decomposed module. They do nothing
unless a forward call has set this model's per-call state (masks, weight deltas, routing, cache),
so a plain target forward costs nothing extra and no hooks are added or removed per step.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .ci_functions import CiFn, make_ci_fn
from .components import Components, make_components, module_in_out, module_kind, target_weight
from .sigmoids import get_sigmoid

Sampling = Literal["continuous", "binomial"]
WeightDeltaAndMask = tuple[Tensor, Tensor | None]  # (d_out, d_in) delta, (...) mask or None (= 1)


class OutputWithCache(NamedTuple):
    """Model output and each decomposed module's input (keyed by module name)."""

    output: Tensor
    cache: dict[str, Tensor]


@dataclass
class _CallState:
    """What the persistent hooks consult during one ComponentModel.forward call."""

    masks: dict[str, Tensor]
    deltas: dict[str, WeightDeltaAndMask]
    routing: dict[str, Tensor]
    cache: dict[str, Tensor] | None


def match_target_modules(model: nn.Module, patterns: dict[str, int]) -> dict[str, int]:
    """Module name -> C for decomposable modules matched by fnmatch patterns (each exactly once)."""
    candidates = [name for name, m in model.named_modules() if module_kind(m) is not None]
    owner: dict[str, str] = {}
    module_to_c: dict[str, int] = {}
    for pattern, C in patterns.items():
        if isinstance(C, bool) or not isinstance(C, int) or C < 1:
            raise ValueError(f"pattern {pattern!r}: C must be an int >= 1, got {C!r}")
        matched = [name for name in candidates if fnmatch.fnmatch(name, pattern)]
        if not matched:
            raise ValueError(
                f"pattern {pattern!r} matched no Linear/Conv1D/Embedding module; candidates: {candidates}"
            )
        for name in matched:
            if name in owner:
                raise ValueError(f"module {name!r} matched by both pattern {owner[name]!r} and {pattern!r}")
            owner[name] = pattern
            module_to_c[name] = C
    return {name: module_to_c[name] for name in candidates if name in module_to_c}  # model order


def _key(name: str) -> str:
    """ModuleDict key for a dotted module name."""
    return name.replace(".", "-")


class ComponentModel(nn.Module):
    """A frozen target plus components and CI functions for the modules matched by the patterns."""

    def __init__(
        self,
        target_model: nn.Module,
        target_module_patterns: dict[str, int],
        ci_fn_type: str = "mlp",
        ci_fn_hidden_dims: Sequence[int] = (16,),
        sigmoid_type: str = "leaky_hard",
        output_attr: str | None = None,
    ) -> None:
        super().__init__()
        target_model.requires_grad_(False)
        target_model.eval()
        self.target_model = target_model
        self.module_to_c = match_target_modules(target_model, target_module_patterns)
        self.module_names = list(self.module_to_c)
        self.sigmoid_type = sigmoid_type
        self._lower_and_upper_sigmoids(sigmoid_type)  # validate the name now
        self.output_attr = output_attr

        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        self._modules_by_name: dict[str, nn.Module] = {}
        for name, C in self.module_to_c.items():
            module = target_model.get_submodule(name)
            self._modules_by_name[name] = module
            device = target_weight(module).device
            self.components[_key(name)] = make_components(module, C).to(device)
            if module_kind(module) == "embedding" and ci_fn_type != "mlp":
                raise ValueError(f"module {name!r} is an Embedding: only ci_fn_type='mlp' is supported")
            d_in = module_in_out(module)[0]
            self.ci_fns[_key(name)] = make_ci_fn(ci_fn_type, C, d_in, ci_fn_hidden_dims).to(device)

        self._state: _CallState | None = None
        self._target_weight_cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}
        self._hook_handles = [
            self._modules_by_name[name].register_forward_hook(
                partial(self._hook, name=name), with_kwargs=True
            )
            for name in self.module_names
        ]

    # ----------------------------------------------------------------- accessors
    def component(self, name: str) -> Components:
        """The components replacing module `name`."""
        return self.components[_key(name)]

    def ci_fn(self, name: str) -> CiFn:
        """The CI function of module `name`."""
        return self.ci_fns[_key(name)]

    def target_weight(self, name: str) -> Tensor:
        """Frozen target weight of `name` ((d_out, d_in) or (vocab, d)), cached until it changes."""
        w = self._modules_by_name[name].weight
        stamp = (w.device, w.dtype, w.data_ptr(), w._version, w.shape)
        cached = self._target_weight_cache.get(name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, target_weight(self._modules_by_name[name]).detach().contiguous())
            self._target_weight_cache[name] = cached
        return cached[1]

    def weight_deltas(self) -> dict[str, Tensor]:
        """Delta = W_target - component weight per module, with gradient to V and U."""
        return {name: self.target_weight(name) - self.component(name).weight for name in self.module_names}

    def component_acts(self, pre_weight_acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """g = x V (or V[ids]) per module from the modules' inputs: {name: (..., C)}."""
        return {name: self.component(name).component_acts(x) for name, x in pre_weight_acts.items()}

    def train(self, mode: bool = True) -> ComponentModel:
        """Set train/eval mode for components and CI functions; the frozen target always stays in eval."""
        super().train(mode)
        self.target_model.eval()  # no dropout etc. in the target, whatever Lightning asks
        return self

    def remove_hooks(self) -> None:
        """Detach the persistent hooks from the target (the model is unusable for masked forwards after)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # ----------------------------------------------------------------- forward
    def _extract_output(self, raw: Any) -> Tensor:
        """Pick the tensor out of the target's raw output (`output_attr`: None, 'idx_<i>' or an attribute)."""
        if self.output_attr is None:
            out = raw
        elif self.output_attr.startswith("idx_"):
            out = raw[int(self.output_attr[4:])]
        else:
            out = getattr(raw, self.output_attr)
        if not isinstance(out, Tensor):
            raise TypeError(f"target output is {type(out).__name__}, not a Tensor; set output_attr")
        return out

    def forward(
        self,
        *args: Any,
        masks: dict[str, Tensor] | None = None,
        weight_deltas_and_masks: dict[str, WeightDeltaAndMask] | None = None,
        routing_masks: dict[str, Tensor] | None = None,
        cache_acts: bool = False,
        **kwargs: Any,
    ) -> Tensor | OutputWithCache:
        """Target forward; modules named in `masks` run through their components.

        masks[name] (..., C) (or broadcastable) masks module `name`'s component acts; a module with a
        mask may also get (delta (d_out, d_in), delta_mask (...) or None) in weight_deltas_and_masks;
        routing_masks[name] (...) bool picks, per position, components (True) or the target (False).
        With cache_acts, returns OutputWithCache whose cache holds every decomposed module's input.
        """
        if masks is None and not cache_acts:
            if weight_deltas_and_masks or routing_masks:
                raise ValueError("weight_deltas_and_masks / routing_masks need masks")
            return self._extract_output(self.target_model(*args, **kwargs))
        masks = masks or {}
        deltas = weight_deltas_and_masks or {}
        routing = routing_masks or {}
        for what, d in (("masks", masks), ("weight_deltas_and_masks", deltas), ("routing_masks", routing)):
            unknown = set(d) - set(self.module_to_c)
            if unknown:
                raise ValueError(f"{what} has non-decomposed modules {sorted(unknown)}")
        unmasked = (set(deltas) | set(routing)) - set(masks)
        if unmasked:
            raise ValueError(f"modules {sorted(unmasked)} have a weight delta or routing mask but no mask")
        if self._state is not None:
            raise RuntimeError("ComponentModel.forward is not re-entrant")
        cache: dict[str, Tensor] | None = {} if cache_acts else None
        self._state = _CallState(masks, deltas, routing, cache)
        try:
            out = self._extract_output(self.target_model(*args, **kwargs))
        finally:
            self._state = None
        return OutputWithCache(out, cache) if cache is not None else out

    def _hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, *, name: str
    ) -> Tensor | None:
        """Persistent forward hook: cache the input and/or replace the output per the call state."""
        state = self._state
        if state is None:
            return None
        x = args[0] if args else next(iter(kwargs.values()))  # the module's single input
        if state.cache is not None:
            state.cache[name] = x
        mask = state.masks.get(name)
        if mask is None:
            return None
        delta, delta_mask = state.deltas.get(name, (None, None))
        out = self.component(name)(x, mask=mask, weight_delta=delta, delta_mask=delta_mask)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and module_kind(module) != "embedding":
            out = out + bias
        out = out.to(output.dtype)
        route = state.routing.get(name)
        if route is not None:
            out = torch.where(route.unsqueeze(-1), out, output)
        return out

    # ----------------------------------------------------------------- causal importances
    @staticmethod
    def _lower_and_upper_sigmoids(sigmoid_type: str) -> tuple[Any, Any]:
        """'leaky_hard' -> (lower_leaky_hard, upper_leaky_hard); any other name is used for both."""
        if sigmoid_type == "leaky_hard":
            return get_sigmoid("lower_leaky_hard"), get_sigmoid("upper_leaky_hard")
        fn = get_sigmoid(sigmoid_type)
        return fn, fn

    def calc_causal_importances(
        self,
        pre_weight_acts: dict[str, Tensor],
        sigmoid_type: str | None = None,
        detach_inputs: bool = False,
        sampling: Sampling = "continuous",
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(ci_lower, ci_upper) dicts of (..., C) from each module's (clean target) input.

        sigmoid_type defaults to the model's; 'leaky_hard' means lower-leaky for ci_lower (masks,
        reconstruction, L0) and upper-leaky for ci_upper (importance minimality). With binomial
        sampling, ci_lower uses 1.05 s - 0.05 u (u ~ U(0, 1)) as the reference does.
        """
        lower_fn, upper_fn = self._lower_and_upper_sigmoids(sigmoid_type or self.sigmoid_type)
        ci_lower: dict[str, Tensor] = {}
        ci_upper: dict[str, Tensor] = {}
        for name, x in pre_weight_acts.items():
            ci_fn = self.ci_fn(name)
            inp = self.component(name).component_acts(x) if ci_fn.takes_component_acts else x
            if detach_inputs:
                inp = inp.detach()
            s = ci_fn(inp)  # (..., C) pre-sigmoid
            s_lower = 1.05 * s - 0.05 * torch.rand_like(s) if sampling == "binomial" else s
            ci_lower[name] = lower_fn(s_lower)
            ci_upper[name] = upper_fn(s)
        return ci_lower, ci_upper


# --------------------------------------------------------------------- mask sampling
def stochastic_masks(
    ci: dict[str, Tensor], sampling: Sampling = "continuous", generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """m = ci + (1 - ci) r, r ~ U(0, 1) ('continuous') or {0, 1} ('binomial'), per element."""
    masks = {}
    for name, c in ci.items():
        if sampling == "continuous":
            r = torch.rand(c.shape, generator=generator, device=c.device, dtype=c.dtype)
        elif sampling == "binomial":
            r = torch.randint(0, 2, c.shape, generator=generator, device=c.device).to(c.dtype)
        else:
            raise ValueError(f"unknown sampling {sampling!r}; valid: ['continuous', 'binomial']")
        masks[name] = c + (1 - c) * r
    return masks


def weight_delta_masks(
    ci: dict[str, Tensor], weight_deltas: dict[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, WeightDeltaAndMask]:
    """(delta, r) per module with r ~ U(0, 1) of shape ci[name].shape[:-1] (per example/position)."""
    out = {}
    for name, c in ci.items():
        r = torch.rand(c.shape[:-1], generator=generator, device=c.device, dtype=c.dtype)
        out[name] = (weight_deltas[name], r)
    return out


def uniform_k_subset_routing_masks(
    module_names: Sequence[str],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per position: k ~ U{1..n_modules}, then a uniformly random k-subset of modules is routed (True)."""
    n = len(module_names)
    shape = tuple(shape)
    k = torch.randint(1, n + 1, shape, generator=generator, device=device)  # (...)
    ranks = torch.rand((n, *shape), generator=generator, device=device).argsort(0).argsort(0)  # (n, ...)
    return {name: ranks[i] < k for i, name in enumerate(module_names)}


def tie_component_weights_(model: ComponentModel, src: str, dst: str) -> None:
    """Make dst's V, U share storage with src's U^T, V^T (TMS's tied linear2 = linear1^T).

    Uses `.data` like the reference: both parameters get gradients and optimizer updates, which
    land in the same memory. Device moves break the tie: call it again after moving.
    """
    s, d = model.component(src), model.component(dst)
    d.V.data = s.U.data.t()
    d.U.data = s.V.data.t()
