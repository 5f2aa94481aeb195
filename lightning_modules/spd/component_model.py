"""ComponentModel: a frozen target model whose chosen weight matrices can be swapped for masked components.

Forward hooks are registered once, at construction, on every decomposed module. They do nothing
unless a forward call has set this model's per-call state (masks, weight deltas, routing, cache),
so a plain target forward costs nothing extra and no hooks are added or removed per step.

A clean forward that caches the modules' inputs also records the target's module outputs (`CleanPrefix`);
a masked forward called with `reuse_clean_prefix` on the same inputs returns the recorded outputs for
the module calls upstream of its first masked module instead of computing them.

With `output_head` set (a language model's final vocabulary projection, e.g. `lm_head`), a forward with
`head_input=True` returns that projection's input, the final hidden states, instead of the logits and
skips the projection: the KL losses then apply it block by block (losses.head_kl_loss) without ever
holding the (tokens, vocab) logits.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .ci_functions import CiFn, make_ci_fn
from .components import Components, make_components, module_in_out, module_kind, target_weight
from .members import Generator, MemberGenerators, StackedCiFn, integers, uniform
from .sigmoids import get_sigmoid

Sampling = Literal["continuous", "binomial"]
# (d_out, d_in) delta or None (taken from the target's output), (...) mask or None (= 1)
WeightDeltaAndMask = tuple[Tensor | None, Tensor | None]
Span = tuple[int, int]  # rows start:stop of a batch


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
    replaced: frozenset[str] = frozenset()  # masked modules whose forward computes the components only
    clean_out: dict[str, Tensor] = field(default_factory=dict)  # a masked module's clean output (clean input)
    head_inputs: list[Tensor] = field(default_factory=list)  # the output head's inputs (head_input=True)
    row_slices: dict[str, tuple[Span, ...]] = field(default_factory=dict)  # module -> its masked row spans


def _row_spans(slices: dict[str, Span | Sequence[Span]]) -> dict[str, tuple[Span, ...]]:
    """Each module's row spans as a tuple of (start, stop) (a single (start, stop) given as is)."""
    spans = {}
    for name, rows in slices.items():
        listed = (rows,) if len(rows) == 2 and all(isinstance(r, int) for r in rows) else rows
        spans[name] = tuple((int(start), int(stop)) for start, stop in listed)
    return spans


def _check_row_slices(spans: dict[str, tuple[Span, ...]], routing: dict[str, Tensor]) -> None:
    """Each module's spans are (start, stop) with 0 <= start < stop and do not overlap one another (those of
    different modules may: such rows are masked in all of them); not mixed with routing."""
    both = set(spans) & set(routing)
    if both:
        raise ValueError(f"modules {sorted(both)} have both a routing mask and a row slice")
    for name, mine in spans.items():
        for start, stop in mine:
            if not 0 <= start < stop:
                raise ValueError(f"row_slices[{name!r}] has {(start, stop)}: need 0 <= start < stop")
        ordered = sorted(mine)
        for (_, stop), (start, _) in zip(ordered, ordered[1:]):
            if start < stop:
                raise ValueError(f"row_slices[{name!r}] has overlapping spans {ordered}")


def _take_rows(t: Tensor, spans: tuple[Span, ...]) -> Tensor:
    """t's rows (first dim) of the spans, in order (a view for one span)."""
    if len(spans) == 1:
        return t[spans[0][0] : spans[0][1]]
    return torch.cat([t[start:stop] for start, stop in spans])


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a module output (a tensor, or tuples / lists / dicts of them, e.g. HF outputs)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _versions(value: Any) -> tuple[tuple[int, int], ...]:
    """(data_ptr, version) of every tensor in `value`: changes when one is modified in place or replaced."""
    return tuple((t.data_ptr(), t._version) for t in _tensors(value))


@dataclass
class _Call:
    """One module call seen while tracing a clean forward (start / end on one clock of call events)."""

    module: nn.Module
    start: int
    parent: int | None  # index of the enclosing call
    end: int = -1
    output: Any = None
    versions: tuple[tuple[int, int], ...] = ()


class CleanPrefix:
    """The target's module outputs from one clean forward, for masked forwards on the same inputs.

    A module call that ended before the first masked module's call began saw the same inputs in the clean
    and in the masked forward (the target is frozen, in eval mode and deterministic), so the masked forward
    may return its recorded output instead of computing it. Per decomposed module, `skips` holds the
    outermost such calls; modules called more than once per forward, and outputs modified in place after
    their call, are never skipped (the forward then computes them as usual). `outputs` holds each
    decomposed module's own clean output: the first masked module's input is clean, so its weight delta
    term needs no matmul (ComponentModel._masked_output).
    """

    def __init__(
        self, key: tuple[tuple[Any, ...], Any], calls: list[_Call], decomposed: dict[str, nn.Module]
    ) -> None:
        self.key = key  # (the inputs, held so their identity cannot be reused; their versions etc.)
        calls_of: dict[int, list[int]] = {}  # id(module) -> indices of its calls
        for i, c in enumerate(calls):
            calls_of.setdefault(id(c.module), []).append(i)
        reusable = [
            len(calls_of[id(c.module)]) == 1 and c.end >= 0 and _versions(c.output) == c.versions
            for c in calls
        ]
        self.starts: dict[str, int] = {}
        self.skips: dict[str, list[tuple[nn.Module, Any, tuple[tuple[int, int], ...]]]] = {}
        self.outputs: dict[str, tuple[Tensor, tuple[tuple[int, int], ...]]] = {}
        for name, module in decomposed.items():
            mine = calls_of.get(id(module), [])
            if len(mine) != 1:
                continue
            call = calls[mine[0]]
            s = self.starts[name] = call.start
            if reusable[mine[0]] and isinstance(call.output, Tensor):
                self.outputs[name] = (call.output, call.versions)

            def skippable(i: int, s: int = s) -> bool:
                return reusable[i] and calls[i].end < s

            self.skips[name] = [
                (c.module, c.output, c.versions)
                for i, c in enumerate(calls)
                if skippable(i) and (c.parent is None or not skippable(c.parent))
            ]

    def plan(self, masked: Sequence[str]) -> tuple[str, list[tuple[nn.Module, Any]]] | None:
        """(the first masked module, the (module, output) pairs to return instead of computing) for a
        forward masking `masked`; None when the record cannot serve it (a masked module not seen exactly
        once, or a recorded output modified since)."""
        if not masked or any(name not in self.starts for name in masked):
            return None
        first = min(masked, key=self.starts.__getitem__)
        skips = self.skips[first]
        if any(_versions(output) != versions for _, output, versions in skips):
            return None
        return first, [(module, output) for module, output, _ in skips]

    def clean_output(self, name: str) -> Tensor | None:
        """Module `name`'s output in the clean forward, or None (not recorded, or modified since)."""
        output, versions = self.outputs.get(name, (None, ()))
        return output if output is not None and _versions(output) == versions else None


def _returning(output: Any) -> Callable[..., Any]:
    """A forward that returns `output` without computing."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return output

    return forward


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
        record_clean_prefix: bool = True,
        output_head: str | None = None,
        members: int | None = None,
    ) -> None:
        super().__init__()
        if members is not None and members < 1:
            raise ValueError(f"members must be >= 1 (or None), got {members}")
        # k stacked decompositions trained at once (members.py); None: one, without a member dim
        self.members = members
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
        # every module of the target, listed once (the target's structure is fixed from here on): _prefix_key
        # reads their tensors on each masked forward, where walking the module tree (parameters(), buffers())
        # took ~13% of a Python-bound tiny-LM step (2 tokens, cProfile); at 512 tokens it is not measurable
        self._target_tree: list[nn.Module] = list(target_model.modules())
        for name, C in self.module_to_c.items():
            module = target_model.get_submodule(name)
            self._modules_by_name[name] = module
            device = target_weight(module).device
            self.components[_key(name)] = make_components(module, C, members).to(device)
            if module_kind(module) == "embedding" and ci_fn_type != "mlp":
                raise ValueError(f"module {name!r} is an Embedding: only ci_fn_type='mlp' is supported")
            d_in = module_in_out(module)[0]
            fns = [make_ci_fn(ci_fn_type, C, d_in, ci_fn_hidden_dims) for _ in range(members or 1)]
            self.ci_fns[_key(name)] = (fns[0] if members is None else StackedCiFn(fns)).to(device)

        self.output_head = output_head
        if output_head is not None and members is not None:
            raise ValueError(
                "members: a language model's output head (KL losses) is not for member ensembles"
            )
        if output_head is not None:
            head = dict(target_model.named_modules()).get(output_head)
            if not isinstance(head, nn.Linear) or output_head in self.module_to_c:
                raise ValueError(
                    f"output_head {output_head!r} must name a Linear of the target that is not decomposed"
                )
        self._state: _CallState | None = None
        # clean forwards with cache_acts record module outputs for reuse_clean_prefix (memory: one set of
        # the target's activations, held until the next such forward or clear_clean_prefix)
        self.record_clean_prefix = record_clean_prefix
        # the KL terms' per-block passes fused by torch.compile (losses.compiled_kl_block); set by
        # SPDLightningModule's `compile`
        self.compiled_kl = False
        # calc_causal_importances as one torch.compile'd function (compile_causal_importances)
        self._compiled_ci: Callable[..., tuple[dict[str, Tensor], dict[str, Tensor]]] | None = None
        self._clean_prefix: CleanPrefix | None = None
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

    def clear_clean_prefix(self) -> None:
        """Drop the recorded clean activations (they are otherwise held until the next clean forward)."""
        self._clean_prefix = None

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
        row_slices: dict[str, Span | Sequence[Span]] | None = None,
        cache_acts: bool = False,
        reuse_clean_prefix: bool = False,
        head_input: bool = False,
        **kwargs: Any,
    ) -> Tensor | OutputWithCache:
        """Target forward; modules named in `masks` run through their components.

        masks[name] (..., C) (or broadcastable) masks module `name`'s component acts; a module with a
        mask may also get (delta (d_out, d_in), delta_mask (...) or None) in weight_deltas_and_masks (a
        delta of None: the delta term from the target module's own output on the masked input, see
        _masked_output, no Delta needed);
        routing_masks[name] (...) bool picks, per position, components (True) or the target (False).
        row_slices[name] = (start, stop), or a list of such spans, runs module `name` through its components
        on those rows of its input's first (batch) dim only, the target on the others; its mask and delta
        mask are then those rows' (their first dim the spans' rows in order). Slices batch forwards that
        would each mask other modules into one forward (losses.stochastic_recon_loss's batched layerwise
        term: disjoint slices, one module each; a span shared by all modules joins the all-modules term);
        the target must treat the rows of its batch independently (transformers and the toy models do).
        With cache_acts, returns OutputWithCache whose cache holds every decomposed module's input.
        With reuse_clean_prefix (masked forwards without cache_acts), the module calls upstream of the
        first masked module return the outputs recorded by the last clean cache_acts forward when it ran
        on these very inputs (same objects, unmodified); otherwise they are computed.
        With head_input (masked forwards without cache_acts; needs `output_head`), returns the output
        head's input, the final hidden states, and skips the head: the output is head(returned value).
        """
        if head_input and (self.output_head is None or cache_acts or masks is None):
            raise ValueError("head_input needs output_head set, masks and no cache_acts")
        clean = masks is None and not weight_deltas_and_masks and not routing_masks and not row_slices
        if clean and cache_acts and self.record_clean_prefix and self._state is None:
            return self._traced_clean_forward(args, kwargs)
        if masks is None and not cache_acts:
            if weight_deltas_and_masks or routing_masks or row_slices:
                raise ValueError("weight_deltas_and_masks / routing_masks / row_slices need masks")
            return self._extract_output(self.target_model(*args, **kwargs))
        masks = masks or {}
        deltas = weight_deltas_and_masks or {}
        routing = routing_masks or {}
        slices = _row_spans(row_slices or {})
        for what, d in (
            ("masks", masks), ("weight_deltas_and_masks", deltas), ("routing_masks", routing),
            ("row_slices", slices),
        ):  # fmt: skip
            unknown = set(d) - set(self.module_to_c)
            if unknown:
                raise ValueError(f"{what} has non-decomposed modules {sorted(unknown)}")
        unmasked = (set(deltas) | set(routing) | set(slices)) - set(masks)
        if unmasked:
            raise ValueError(
                f"modules {sorted(unmasked)} have a weight delta, routing mask or row slice but no mask"
            )
        _check_row_slices(slices, routing)
        if slices and self.members is not None:
            raise ValueError("row_slices (the batched layerwise term) are not for member ensembles")
        if self._state is not None:
            raise RuntimeError("ComponentModel.forward is not re-entrant")
        cache: dict[str, Tensor] | None = {} if cache_acts else None
        plan = self._prefix_plan(args, kwargs, list(masks)) if reuse_clean_prefix and not cache_acts else None
        skips, clean_out = (), {}
        if plan is not None:
            first, skips = plan
            first_out = self._clean_prefix.clean_output(first)
            clean_out = {} if first_out is None else {first: first_out}
        # a masked module without routing needs no target output: its forward computes only the components
        # (not under autocast, whose output dtype the hook takes from the target's output)
        autocast = self.autocast_active
        # (a delta taken from the target's output needs that output, unless the clean prefix recorded it)
        from_output = {n for n, (d, _) in deltas.items() if d is None and n not in clean_out}
        replaced = (
            frozenset() if autocast else frozenset(set(masks) - set(routing) - set(slices) - from_output)
        )
        forwards: dict[nn.Module, Callable[..., Any]] = {m: _returning(out) for m, out in skips}
        forwards |= {self._modules_by_name[n]: partial(self._component_forward, name=n) for n in replaced}
        if head_input:
            forwards[self._head] = self._head_capture
        shadowed = [(module, module.__dict__.get("forward")) for module in forwards]
        self._state = _CallState(masks, deltas, routing, cache, replaced, clean_out, row_slices=slices)
        try:
            for module, forward in forwards.items():
                module.forward = forward  # an instance attribute shadows the class's forward
            out = self._extract_output(self.target_model(*args, **kwargs))
            if head_input:
                if len(self._state.head_inputs) != 1:
                    raise RuntimeError(f"output head {self.output_head!r} was not called exactly once")
                out = self._state.head_inputs[0]
        finally:
            self._state = None
            for module, previous in shadowed:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
        return OutputWithCache(out, cache) if cache is not None else out

    @property
    def autocast_active(self) -> bool:
        """Whether a forward called now runs under autocast (the CPU's or the components' device's)."""
        return any(torch.is_autocast_enabled(d) for d in {"cpu", self._device_type})

    @property
    def _device_type(self) -> str:
        """The components' device type ('cpu', 'cuda', ...)."""
        return next(iter(self.components.values())).V.device.type

    def _prefix_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], Any]:
        """(the inputs themselves, what must not have changed since): the keyword names, the inputs'
        tensor versions and the target's parameters and buffers (storage and version)."""
        inputs = (*args, *kwargs.values())
        target = tuple(
            (t.data_ptr(), t._version)
            for m in self._target_tree
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        )
        return inputs, (tuple(kwargs), tuple(_versions(a) for a in inputs), target)

    def _prefix_plan(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], masked: list[str]
    ) -> tuple[str, list[tuple[nn.Module, Any]]] | None:
        """CleanPrefix.plan for a masked forward on these inputs, or None when the record is not of them."""
        prefix = self._clean_prefix
        if prefix is None:
            return None
        (inputs, state), (recorded, recorded_state) = self._prefix_key(args, kwargs), prefix.key
        same = len(inputs) == len(recorded) and all(a is b for a, b in zip(inputs, recorded))
        return prefix.plan(masked) if same and state == recorded_state else None

    def _traced_clean_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> OutputWithCache:
        """A clean forward with cache_acts that also records every module call of the target (CleanPrefix)."""
        self._clean_prefix = None
        calls: list[_Call] = []
        stack: list[int] = []
        clock = [0]

        def pre(module: nn.Module, _args: tuple[Any, ...]) -> None:
            calls.append(_Call(module, clock[0], stack[-1] if stack else None))
            stack.append(len(calls) - 1)
            clock[0] += 1

        def post(module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            call = calls[stack.pop()]
            call.end, call.output, call.versions = clock[0], output, _versions(output)
            clock[0] += 1

        handles = []
        for module in self.target_model.modules():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, prepend=True))  # the forward's own output
        cache: dict[str, Tensor] = {}
        self._state = _CallState({}, {}, {}, cache)
        try:
            out = self._extract_output(self.target_model(*args, **kwargs))
        finally:
            self._state = None
            for handle in handles:
                handle.remove()
        self._clean_prefix = CleanPrefix(self._prefix_key(args, kwargs), calls, self._modules_by_name)
        return OutputWithCache(out, cache)

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
        if mask is None or name in state.replaced:
            return None
        spans = state.row_slices.get(name)
        if spans is not None:  # components on these rows; the target's own output there gives the delta
            out = self._masked_output(
                module, name, _take_rows(x, spans), output.dtype, _take_rows(output, spans)
            )
            done = 0
            for start, stop in spans:
                span_out = out[done : done + stop - start]
                output = torch.slice_scatter(output, span_out, dim=0, start=start, end=stop)
                done += stop - start
            return output
        delta = state.deltas.get(name)
        from_output = delta is not None and delta[0] is None  # the delta term from this very output
        out = self._masked_output(module, name, x, output.dtype, clean=output if from_output else None)
        route = state.routing.get(name)
        if route is not None:
            out = torch.where(route.unsqueeze(-1), out, output)
        return out

    def _masked_output(
        self, module: nn.Module, name: str, x: Tensor, dtype: torch.dtype, clean: Tensor | None = None
    ) -> Tensor:
        """Module `name`'s output through its masked components (+ masked delta, + the target's bias).

        With the target's output y = x W^T + b on this very input x at hand (`clean`, or the clean forward's
        record when x is the clean input), the delta term needs no matmul: x Delta^T = y - b - g U with
        g = x V, so out = (g * (mask - r)) U + r y + (1 - r) b, the same function of V, U, the mask and x."""
        state = self._state
        delta, delta_mask = state.deltas.get(name, (None, None))
        has_delta = name in state.deltas
        mask = state.masks[name]
        comp = self.component(name)
        bias = getattr(module, "bias", None)
        bias = bias if isinstance(bias, Tensor) and module_kind(module) != "embedding" else None
        clean = state.clean_out.get(name) if clean is None else clean
        if has_delta and delta is None and clean is None:
            raise RuntimeError(f"{name}: a delta taken from the target's output, but no output at hand")
        if not has_delta or clean is None:
            out = comp(x, mask=mask, weight_delta=delta, delta_mask=delta_mask)
            return (out if bias is None else out + bias).to(dtype)
        g = comp.component_acts(x)  # (..., C)
        clean = clean.to(g.dtype)
        if delta_mask is None:  # r = 1
            return ((g * (mask - 1)) @ comp.U + clean).to(dtype)
        r = delta_mask.unsqueeze(-1)  # (..., 1)
        out = (g * (mask - r)) @ comp.U + r * clean
        return (out if bias is None else out + (1 - r) * bias).to(dtype)

    def _component_forward(self, *args: Any, name: str, **kwargs: Any) -> Tensor:
        """Forward of a masked module during a masked call: the components' output, the target's weight
        unused; the dtype is the one the target's forward would give (its weight's for an embedding)."""
        module = self._modules_by_name[name]
        x = args[0] if args else next(iter(kwargs.values()))  # the module's single input
        weight = module.weight
        dtype = weight.dtype if module_kind(module) == "embedding" else torch.result_type(x, weight)
        return self._masked_output(module, name, x, dtype)

    @property
    def _head(self) -> nn.Linear:
        """The output head module (looked up, not held: an nn.Module attribute would register it twice)."""
        return self.target_model.get_submodule(self.output_head)

    def _head_capture(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Forward of the output head under head_input: record its input and return zeros of the logits'
        shape without memory (an expanded scalar), for whatever the target does with them before returning."""
        self._state.head_inputs.append(x)
        return x.new_zeros(()).expand(*x.shape[:-1], self._head.out_features)

    def fusable_head(self) -> tuple[Tensor, Tensor | None] | None:
        """The output head's frozen weight (vocab, d) and bias (vocab) or None, when a loss may apply the
        head itself (head_input forwards); None without an output head, or when its weight is not a whole
        plain tensor here (sharded or gathered only inside forwards: FSDP, DeepSpeed ZeRO-3, DTensor)."""
        if self.output_head is None:
            return None
        head = self._head
        weight, bias = head.weight, head.bias
        for t in (weight, bias):
            if t is not None and (type(t.data) is not Tensor or t.requires_grad):
                return None
        if weight.shape != (head.out_features, head.in_features):
            return None
        return weight, bias

    # ----------------------------------------------------------------- causal importances
    @staticmethod
    def _lower_and_upper_sigmoids(sigmoid_type: str) -> tuple[Any, Any]:
        """'leaky_hard' -> (lower_leaky_hard, upper_leaky_hard); any other name is used for both."""
        if sigmoid_type == "leaky_hard":
            return get_sigmoid("lower_leaky_hard"), get_sigmoid("upper_leaky_hard")
        fn = get_sigmoid(sigmoid_type)
        return fn, fn

    def compile_causal_importances(self) -> None:
        """Run calc_causal_importances as one torch.compile'd function: every module's CI function,
        sigmoids included, in one compiled graph (forward and backward) instead of ~60 small operator
        calls per module. One graph rather than one per CI function: each compiled call costs its guards,
        which per module outweigh what a small CI function's fusion saves."""
        self._compiled_ci = torch.compile(self._causal_importances)

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
        fn = self._compiled_ci or self._causal_importances
        return fn(pre_weight_acts, sigmoid_type or self.sigmoid_type, detach_inputs, sampling)

    def _causal_importances(
        self, pre_weight_acts: dict[str, Tensor], sigmoid_type: str, detach_inputs: bool, sampling: Sampling
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """calc_causal_importances' computation (compiled or not)."""
        lower_fn, upper_fn = self._lower_and_upper_sigmoids(sigmoid_type)
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
    ci: dict[str, Tensor], sampling: Sampling = "continuous", generator: Generator = None
) -> dict[str, Tensor]:
    """m = ci + (1 - ci) r, r ~ U(0, 1) ('continuous') or {0, 1} ('binomial'), per element."""
    masks = {}
    for name, c in ci.items():
        if sampling == "continuous":
            r = uniform(c.shape, generator, c.device, c.dtype)
        elif sampling == "binomial":
            r = integers(0, 2, c.shape, generator, c.device).to(c.dtype)
        else:
            raise ValueError(f"unknown sampling {sampling!r}; valid: ['continuous', 'binomial']")
        masks[name] = c + (1 - c) * r
    return masks


def weight_delta_masks(
    ci: dict[str, Tensor], weight_deltas: dict[str, Tensor] | None, generator: Generator = None
) -> dict[str, WeightDeltaAndMask]:
    """(delta, r) per module with r ~ U(0, 1) of shape ci[name].shape[:-1] (per example/position);
    weight_deltas None: (None, r), the delta term then taken from the target's output (ComponentModel)."""
    out = {}
    for name, c in ci.items():
        r = uniform(c.shape[:-1], generator, c.device, c.dtype)
        out[name] = (None if weight_deltas is None else weight_deltas[name], r)
    return out


def uniform_k_subset_routing_masks(
    module_names: Sequence[str],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    generator: Generator = None,
) -> dict[str, Tensor]:
    """Per position: k ~ U{1..n_modules}, then a uniformly random k-subset of modules is routed (True).
    (Members: shape (k, ...), each member's k and ranks drawn from its generator as its run draws them.)"""
    n = len(module_names)
    shape = tuple(shape)
    k = integers(1, n + 1, shape, generator, device)  # (...)
    if isinstance(
        generator, MemberGenerators
    ):  # member i's (n, ...) from its own generator, then (n, k, ...)
        noise = uniform((shape[0], n, *shape[1:]), generator, device).transpose(0, 1)
    else:
        noise = uniform((n, *shape), generator, device)
    ranks = noise.argsort(0).argsort(0)  # (n, ...)
    return {name: ranks[i] < k for i, name in enumerate(module_names)}


def tie_component_weights_(model: ComponentModel, src: str, dst: str) -> None:
    """Make dst's V, U share storage with src's U^T, V^T (TMS's tied linear2 = linear1^T).

    Uses `.data` like the reference: both parameters get gradients and optimizer updates, which
    land in the same memory. Device moves break the tie: call it again after moving.
    """
    s, d = model.component(src), model.component(dst)
    d.V.data = s.U.data.mT  # (the last two dims: members' too)
    d.U.data = s.V.data.mT
