"""Member ensembles: k decompositions of one target trained at once, each as its own run would be.

A ComponentModel built with `members=k` holds k sets of components and CI functions, stacked along a new
leading dim: V (k, d_in, C), U (k, C, d_out), CI-function parameters (k, ...). The frozen target and the
batch are shared. A masked forward runs the target once up to the first masked module (shared, (batch,
d)); from there the activations carry the member dim, (k, batch, d), through the rest of the target
(broadcasting: a toy target's layers apply to any leading dims). CIs and masks are (k, batch, C).

Every loss term is a mean over its leading dims, so with equal batches it is the mean over the members of
each member's own term; SPDObjective multiplies the total by k, which makes it the sum of the members'
totals: each member's parameters get exactly their own run's gradient, and AdamW (elementwise) updates
them as that run's optimizer would. One step issues about as many kernel launches as one run's step, for
k runs' work: a GPU running toy recipes at the reference's sizes waits for launches, not arithmetic.

Random draws: with a `MemberGenerators` (one torch.Generator per member, each seeded as that member's own
run seeds its generator) every mask, delta mask, routing mask and PGD start is drawn member by member, so
member i draws exactly the numbers its own run would: the ensemble computes the same losses as the k runs
(to float rounding; tests/test_spd_members.py).

Members need a target whose decomposed modules take (batch, features) inputs (the toy models) and the mse
output loss; row-sliced forwards (the batched layerwise term) are not for members.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .ci_functions import MLPCiFn, scalar_mlps

if TYPE_CHECKING:
    from .component_model import ComponentModel


class MemberGenerators(tuple):
    """One torch.Generator per member: a draw of shape (k, ...) takes member i's (...) from generator i."""

    @property
    def device(self) -> torch.device:
        """The generators' device."""
        return self[0].device


Generator = torch.Generator | MemberGenerators | None


def _per_member(shape: Sequence[int], generators: MemberGenerators) -> tuple[int, ...]:
    shape = tuple(shape)
    if not shape or shape[0] != len(generators):
        raise ValueError(
            f"a draw for {len(generators)} members needs a leading dim of {len(generators)}: {shape}"
        )
    return shape[1:]


def uniform(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """torch.rand(shape); with MemberGenerators, member i's slice drawn from generator i."""
    if isinstance(generator, MemberGenerators):
        rest = _per_member(shape, generator)
        return torch.stack([torch.rand(rest, generator=g, device=device, dtype=dtype) for g in generator])
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def integers(
    low: int,
    high: int,
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """torch.randint(low, high, shape); with MemberGenerators, member i's slice drawn from generator i."""
    if isinstance(generator, MemberGenerators):
        rest = _per_member(shape, generator)
        return torch.stack([torch.randint(low, high, rest, generator=g, device=device) for g in generator])
    return torch.randint(low, high, tuple(shape), generator=generator, device=device)


class StackedCiFn(nn.Module):
    """k CI functions of one kind and shape, their parameters stacked (k, ...), applied with vmap."""

    def __init__(self, fns: Sequence[nn.Module]) -> None:
        super().__init__()
        template = copy.deepcopy(fns[0])
        # `mlp`: scalar MLPs, independent per (member, component): one call with the members' components
        # side by side (k C of them) instead of vmap (ScalarMLPFunction, the CPU's, has no vmap rule)
        self.scalar = isinstance(template, MLPCiFn)
        # not a submodule: .to() and state_dict leave it alone; functional_call swaps in the members' tensors
        self.__dict__["_template"] = template.to("meta")
        self.takes_component_acts = fns[0].takes_component_acts
        self.names = [name for name, _ in fns[0].named_parameters()]
        # in the template's parameter order (a ParameterDict would sort the names)
        self.stacked = nn.ParameterList(
            [torch.stack([dict(fn.named_parameters())[name].detach() for fn in fns]) for name in self.names]
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (n, d) shared by the members or (k, n, d) one per member -> (k, n, C)."""
        params = dict(zip(self.names, self.stacked))
        if self.scalar:  # x: the component acts g (k, n, C)
            k, n, C = x.shape
            weights = [params[f"weights.{i}"].flatten(0, 1) for i in range(len(self.stacked) // 2)]
            biases = [params[f"biases.{i}"].flatten(0, 1) for i in range(len(self.stacked) // 2)]
            side_by_side = x.permute(1, 0, 2).reshape(n, k * C)  # (n, k C)
            return scalar_mlps(side_by_side, weights, biases).reshape(n, k, C).permute(1, 0, 2)

        def one(p: dict[str, Tensor], inp: Tensor) -> Tensor:
            return functional_call(self._template, p, (inp,))

        return vmap(one, in_dims=(0, 0 if x.dim() == 3 else None))(params, x)

    def load_member(self, i: int, fn: nn.Module) -> None:
        """Copy a single CI function's parameters into member i."""
        own = dict(fn.named_parameters())
        with torch.no_grad():
            for name, stacked in zip(self.names, self.stacked):
                stacked[i].copy_(own[name])

    def member(self, i: int, fn: nn.Module) -> nn.Module:
        """Copy member i's parameters into a single CI function of the same kind and shape (returned)."""
        own = dict(fn.named_parameters())
        with torch.no_grad():
            for name, stacked in zip(self.names, self.stacked):
                own[name].copy_(stacked[i])
        return fn


def load_members(ensemble: ComponentModel, singles: Sequence[ComponentModel]) -> None:
    """Set the ensemble's member i to single model i's components and CI functions (same target and
    modules): the ensemble then starts where the k runs start."""
    if len(singles) != ensemble.members:
        raise ValueError(f"{len(singles)} models for an ensemble of {ensemble.members} members")
    with torch.no_grad():
        for i, single in enumerate(singles):
            if single.module_names != ensemble.module_names:
                raise ValueError("members must decompose the same modules")
            for name in ensemble.module_names:
                mine, theirs = ensemble.component(name), single.component(name)
                mine.V[i].copy_(theirs.V)
                mine.U[i].copy_(theirs.U)
                ensemble.ci_fn(name).load_member(i, single.ci_fn(name))


def member_model(ensemble: ComponentModel, i: int, single: ComponentModel) -> ComponentModel:
    """Copy member i of the ensemble into `single`, a one-member ComponentModel of the same target and
    modules (e.g. for evaluation with the single-run code), and return it."""
    with torch.no_grad():
        for name in ensemble.module_names:
            mine, theirs = ensemble.component(name), single.component(name)
            theirs.V.copy_(mine.V[i])
            theirs.U.copy_(mine.U[i])
            ensemble.ci_fn(name).member(i, single.ci_fn(name))
    return single


def check_member_seeds(seeds: Sequence[int] | None) -> None:
    """None, or a non-empty list of distinct int seeds; a clear ValueError otherwise."""
    if seeds is None:
        return
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"member_seeds must be a non-empty list of ints (or null), got {seeds!r}")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise ValueError(f"member_seeds must be ints, got {bad!r}")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise ValueError(f"member_seeds repeats {repeated}: each member needs its own seed")
