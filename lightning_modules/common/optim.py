"""The optimizer and LR schedule every LightningModule here uses: one function, one set of argument names.

Each module takes `optimizer` (a LightningCLI `OptimizerCallable`), `warmup_steps`, `lr_decay_steps` and
`min_lr_ratio`, checks them with `check_schedule_args` in `__init__`, and returns
`configure_optimizer(...)` from `configure_optimizers`. Defaults are built by `adamw(...)`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def adamw(
    lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), module: str | None = None
) -> OptimizerFactory:
    """An AdamW factory with these defaults, the form LightningCLI's `OptimizerCallable` takes.

    Assign it to a module-level name and pass that module's `__name__`: jsonargparse then prints the
    default (`--print_config`, `--help`) as that import path, and reads the path back as this factory."""
    factory = partial(torch.optim.AdamW, lr=lr, betas=betas, weight_decay=weight_decay)
    # jsonargparse resolves an import path to a callable only when it can see the callable's return type
    factory.__signature__ = inspect.signature(factory).replace(return_annotation=torch.optim.Optimizer)
    if module is not None:
        factory.__module__ = module  # jsonargparse looks the object up among that module's variables
    return factory


def decay_param_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Two groups: tensors of 2+ dims get the optimizer's weight decay, the rest (biases, norms) none."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def prefix_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: dict[str, float]
) -> list[dict[str, Any]]:
    """One group per prefix of `weight_decay` (the parameters whose names start with it, at its weight
    decay; the first matching prefix wins), then the rest at the optimizer's own; empty groups left out."""
    by_prefix: dict[str, list[nn.Parameter]] = {prefix: [] for prefix in weight_decay}
    rest: list[nn.Parameter] = []
    for name, param in named_params:
        prefix = next((p for p in weight_decay if name.startswith(p)), None)
        (rest if prefix is None else by_prefix[prefix]).append(param)
    groups = [
        {"params": params, "weight_decay": weight_decay[prefix]}
        for prefix, params in by_prefix.items()
        if params
    ]
    return groups + ([{"params": rest}] if rest or not groups else [])


def optimizer_class(factory: Any) -> type | None:
    """The optimizer class a factory builds: the factory itself, a partial's function, or (jsonargparse's
    OptimizerCallable: a partial of its instantiator) the class among the partial's arguments."""
    if inspect.isclass(factory):
        return factory
    if isinstance(factory, partial):
        for candidate in (factory.func, *factory.args):
            if inspect.isclass(candidate) and issubclass(candidate, torch.optim.Optimizer):
                return candidate
    return None


def build_optimizer(
    factory: OptimizerFactory, groups: list[dict[str, Any]], on_cuda: bool
) -> torch.optim.Optimizer:
    """Call the (CLI-provided) optimizer factory; ask for the fused kernel on CUDA when it exists.

    LightningCLI's `OptimizerCallable` is a partial (of jsonargparse's instantiator and the optimizer class)
    that carries every init argument, `fused=None` included: a `fused` keyword is added unless the user set
    it to True or False."""
    cls = optimizer_class(factory)
    accepts_fused = cls is not None and "fused" in inspect.signature(cls).parameters
    already_set = isinstance(factory, partial) and factory.keywords.get("fused") is not None
    if on_cuda and accepts_fused and not already_set:
        return factory(groups, fused=True)
    return factory(groups)


def check_schedule_args(warmup_steps: int, lr_decay_steps: int | None, min_lr_ratio: float) -> None:
    """ValueError naming the bad schedule argument (called from each module's __init__)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_decay_steps is not None and lr_decay_steps < 1:
        raise ValueError(f"lr_decay_steps must be >= 1 or None (the whole run), got {lr_decay_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"min_lr_ratio must be in [0, 1] (1.0 = constant LR after warmup), got {min_lr_ratio}"
        )


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over warmup_steps, then cosine decay to min_lr_ratio at total_steps."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def total_training_steps(trainer: pl.Trainer, lr_decay_steps: int | None = None) -> int:
    """The schedule's length: lr_decay_steps, else the run's optimizer steps (world size, accumulation and
    max_steps / max_epochs included, as Lightning estimates them)."""
    return lr_decay_steps or max(1, int(trainer.estimated_stepping_batches))


def configure_optimizer(
    module: pl.LightningModule,
    factory: OptimizerFactory,
    named_params: Iterable[tuple[str, nn.Parameter]],
    warmup_steps: int,
    min_lr_ratio: float,
    lr_decay_steps: int | None = None,
    decay_groups: bool = True,
    group_weight_decay: dict[str, float] | None = None,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: the factory's optimizer over the trainable parameters (decay
    only on 2+-dim tensors when `decay_groups`, else one group), fused on CUDA, stepped every optimizer step
    by linear warmup then cosine to `min_lr_ratio` of the peak at `total_training_steps`.

    `group_weight_decay` ({name prefix: weight decay}, with `decay_groups` False): the parameters whose
    names start with a prefix form a group with that weight decay; the rest keep the optimizer's."""
    named = [(name, p) for name, p in named_params if p.requires_grad]
    if group_weight_decay and decay_groups:
        raise ValueError("group_weight_decay needs decay_groups=False")
    if takes_named_params(factory):  # MuonWithAdamW: it splits by name and shape itself
        check_optimizer_strategy(factory, getattr(module.trainer, "strategy", None))
        splits = fused_qkv_splits(module, (name for name, _ in named))
        optimizer = build_optimizer(partial(factory, row_splits=splits), named, module.device.type == "cuda")
    else:
        if decay_groups:
            groups = decay_param_groups(named)
        else:
            groups = prefix_param_groups(named, group_weight_decay or {})
        optimizer = build_optimizer(factory, groups, on_cuda=module.device.type == "cuda")
    total = total_training_steps(module.trainer, lr_decay_steps)
    warmup = min(warmup_steps, total - 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup, total, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ---------------------------------------------------------------------------------------------------------
# Muon on the hidden matrices, AdamW on everything else


class _SplitMuon(torch.optim.Muon):
    """`torch.optim.Muon` that orthogonalises a fused matrix block by block along its rows.

    A group's `row_splits` maps a parameter's index in the group to its row-block sizes; each block (and
    its gradient and momentum rows) goes through Muon as its own matrix, with its own shape-based LR
    scale, while the parameter, its gradient (clipping) and its state stay one tensor."""

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[torch.Tensor],
        grads: list[torch.Tensor],
        muon_momentum_bufs: list[torch.Tensor],
    ) -> bool:
        start = len(params_with_grad)
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        splits = group.get("row_splits") or {}
        if not splits:
            return has_complex
        with_grad = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        new_params, new_grads, new_bufs = [], [], []
        for k, i in enumerate(with_grad):
            param, grad, buf = (xs[start + k] for xs in (params_with_grad, grads, muon_momentum_bufs))
            sizes = splits.get(i)
            if sizes is None:
                new_params.append(param), new_grads.append(grad), new_bufs.append(buf)
                continue
            new_params += param.split(sizes)  # row-block views: Muon's in-place updates land in `param`
            new_grads += grad.split(sizes)
            new_bufs += buf.split(sizes)
        del params_with_grad[start:], grads[start:], muon_momentum_bufs[start:]
        params_with_grad += new_params
        grads += new_grads
        muon_momentum_bufs += new_bufs
        return has_complex


class _OwnerState(MutableMapping):
    """The two inner optimizers' `state` seen as one mapping (Lightning moves state between devices)."""

    def __init__(self, *states: dict[Any, Any]) -> None:
        self._states = states

    def _owner(self, key: Any) -> dict[Any, Any]:
        return next((s for s in self._states if key in s), self._states[-1])

    def __getitem__(self, key: Any) -> Any:
        return self._owner(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._owner(key)[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._owner(key)[key]

    def __iter__(self) -> Iterator[Any]:
        return (key for state in self._states for key in list(state))

    def __len__(self) -> int:
        return sum(len(s) for s in self._states)


DEFAULT_ADAMW_NAMES = ("wte", "wpe", "lm_head", "embed")


def is_hidden_matrix(
    name: str, param: torch.Tensor, adamw_names: Iterable[str] = DEFAULT_ADAMW_NAMES
) -> bool:
    """True for a 2-D weight that Muon should take: not an embedding or LM head (by name), not 1-D."""
    parts = name.split(".")
    return param.dim() == 2 and not any(word in part for part in parts for word in adamw_names)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (`torch.optim.Muon`) on the hidden 2-D matrices, AdamW on embeddings, LM head, norms, biases.

    Takes `(name, parameter)` pairs (`configure_optimizer` passes them): a 2-D tensor whose dotted name has
    no part containing one of `adamw_names` goes to Muon, the rest to AdamW (decay on 2+-dim tensors only).
    One optimizer object: `param_groups` are the inner optimizers' own group dicts (Muon's first), so the
    shared LR schedule scales both peaks (`lr`, `adamw_lr`) alike and gradient clipping and accumulation
    see every parameter; `state_dict` holds both states. `row_splits` (name -> row-block sizes) has Muon
    orthogonalise a fused matrix block by block: `configure_optimizer` sets it to the GPT's fused QKV split
    into its q, k and v blocks, as modded-nanogpt and nanochat orthogonalise separate q, k, v matrices."""

    def __init__(
        self,
        params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 0.02,
        adamw_lr: float = 2e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_weight_decay: float = 0.1,
        adamw_names: tuple[str, ...] = DEFAULT_ADAMW_NAMES,
        row_splits: dict[str, list[int]] | None = None,
        fused: bool | None = None,
    ) -> None:
        named = list(params)
        if not all(isinstance(item, tuple) and len(item) == 2 for item in named):
            raise ValueError(
                "MuonWithAdamW takes (name, parameter) pairs, e.g. model.named_parameters(): it picks the "
                "hidden matrices by name and shape"
            )
        named = [(name, p) for name, p in named if p.requires_grad]
        hidden = [(n, p) for n, p in named if is_hidden_matrix(n, p, adamw_names)]
        if not hidden:
            raise ValueError(
                f"MuonWithAdamW found no hidden 2-D matrix among {[n for n, _ in named][:8]} "
                f"(names containing {list(adamw_names)} go to AdamW): use AdamW"
            )
        hidden_ids = {id(p) for _, p in hidden}
        rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
        splits = {i: list(row_splits[n]) for i, (n, _) in enumerate(hidden) if row_splits and n in row_splits}
        for i, sizes in splits.items():
            name, p = hidden[i]
            if sum(sizes) != p.shape[0] or min(sizes) < 1:
                raise ValueError(f"row_splits[{name!r}]={sizes} must be positive and sum to {p.shape[0]}")
        self.hidden_names = [n for n, _ in hidden]
        self.adamw_names = [n for n, _ in rest]
        self.muon = _SplitMuon(
            [{"params": [p for _, p in hidden], "row_splits": splits}],
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )  # fmt: skip
        groups = decay_param_groups(rest) if rest else []
        for group in groups:
            group.setdefault("weight_decay", adamw_weight_decay)
        groups = [g for g in groups if g["params"]]
        self.adamw = (
            torch.optim.AdamW(groups, lr=adamw_lr, betas=adamw_betas, fused=fused) if groups else None
        )
        inner = [self.muon, *([self.adamw] if self.adamw else [])]
        super().__init__([p for _, p in named], {"lr": lr})
        # Shared dicts: an LR set here (by the scheduler) is the LR the inner optimizer steps with.
        self.param_groups = [group for opt in inner for group in opt.param_groups]
        self.state = _OwnerState(*(opt.state for opt in inner))  # type: ignore[assignment]
        self._inner = inner

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure once (forward + backward), then step Muon and AdamW."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Both inner states, each in `torch.optim` form (their param groups carry the scheduled LRs)."""
        return {"muon": self.muon.state_dict(), **({"adamw": self.adamw.state_dict()} if self.adamw else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both inner states; a state without the Muon / AdamW halves is an error naming them."""
        want = {"muon", *({"adamw"} if self.adamw else set())}
        if set(state_dict) != want:
            raise ValueError(f"MuonWithAdamW state has keys {sorted(state_dict)}, expected {sorted(want)}")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw:
            self.adamw.load_state_dict(state_dict["adamw"])
        # torch.optim.Optimizer.load_state_dict replaces its groups and state: share the new ones
        self.param_groups = [group for opt in self._inner for group in opt.param_groups]
        self.state = _OwnerState(*(opt.state for opt in self._inner))  # type: ignore[assignment]


UNSUPPORTED_STRATEGIES = {
    "deepspeed": "DeepSpeed builds and shards its own optimizer; use DDP (configs/trainer/ddp.yaml) with Muon",
    "fsdp": "FSDP shards each matrix, and Muon orthogonalises whole matrices; use DDP (configs/trainer/ddp.yaml)",
}


def check_optimizer_strategy(optimizer: Any, strategy: Any) -> None:
    """ValueError before training when the optimizer is MuonWithAdamW and the strategy shards parameters."""
    opt_name = _class_path(optimizer)
    if not opt_name or opt_name.split(".")[-1] != MuonWithAdamW.__name__:
        return
    name = _class_path(strategy) or (type(strategy).__name__ if strategy is not None else "")
    for word, advice in UNSUPPORTED_STRATEGIES.items():
        if word in name.lower():
            raise ValueError(f"MuonWithAdamW does not support trainer.strategy={name!r}: {advice}")


def _class_path(obj: Any) -> str:
    """The class path of a config value (string, Namespace / dict with class_path, partial, class, object)."""
    if obj is None:
        return ""
    if isinstance(obj, str):
        return obj
    path = getattr(obj, "class_path", None) or (obj.get("class_path") if isinstance(obj, dict) else None)
    if path:
        return str(path)
    target = _factory_class(obj)
    if inspect.isclass(target):
        return f"{target.__module__}.{target.__qualname__}"
    return f"{type(target).__module__}.{type(target).__qualname__}"


def takes_named_params(factory: OptimizerFactory) -> bool:
    """True for a factory of MuonWithAdamW (or a subclass): it is given (name, parameter) pairs."""
    target = _factory_class(factory)
    return inspect.isclass(target) and issubclass(target, MuonWithAdamW)


def _factory_class(factory: Any) -> Any:
    """The class a factory builds: the partial's function, or (jsonargparse's `OptimizerCallable`, a partial
    of its instantiator) the class among the partial's positional arguments."""
    if not isinstance(factory, partial):
        return factory
    return next((a for a in factory.args if inspect.isclass(a)), factory.func)


def fused_qkv_splits(module: nn.Module, names: Iterable[str]) -> dict[str, list[int]]:
    """Row blocks (q, k, v) of each fused `attn.c_attn.weight` of a GPT-config module, by parameter name."""
    config = getattr(module, "config", None)
    if not all(hasattr(config, a) for a in ("n_head", "n_kv_head", "head_size")):
        return {}
    q, kv = config.n_head * config.head_size, config.n_kv_head * config.head_size
    return {name: [q, kv, kv] for name in names if name.endswith("attn.c_attn.weight")}
