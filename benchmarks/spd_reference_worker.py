"""The reference implementation's SPD training step (goodfire-ai/spd), run as a worker of spd_reference_speed.py.

Runs under a Python that has the reference's dependencies (torch, pydantic, jaxtyping, einops, wandb,
transformers), with `--reference-path` a checkout of goodfire-ai/spd. It builds the reference's
`ComponentModel` on the very target, batch, V / U and CI-function weights the driver saved (our GPT,
whose modules are plain `nn.Linear`s), and runs the reference's own step: `calc_weight_deltas`, the
clean forward with `cache_type="input"`, `calc_causal_importances`, `compute_total_loss` with the given
loss terms, backward, AdamW (as `spd/run_spd.py`'s `optimize` does it).

Protocol (stdin / stdout, one JSON object per line): after building, the worker prints
{"ready": ..., "terms": the first step's loss terms, "target_out_abs_sum": ...}; then each line "step"
runs one step and answers {"ms": its wall time}; "ops" counts the operator calls of one step's forward and
backward (benchmarks/op_count.py), "launches" its kernel launches (op_count.count_launches); "flops" runs
one step under torch's FlopCounterMode and answers {"gflop": its matmul / attention GFLOP}; "quit" ends it.

The reference needs Python 3.13. On an older Python (3.11 here) the worker imports it through a loader
that rewrites PEP 695 type-parameter lists (`def f[T](...)`, `class C[T]:`) into module-level TypeVars
and `Generic[...]` bases; they only annotate. `typing.override` comes from typing_extensions, and the
wandb report helpers the reference imports for its dashboards (`wandb_workspaces`) are replaced by empty
modules: nothing the training step runs touches them. On any Python, wandb and python-dotenv, imported at
module level for logging, are served as empty modules where they are not installed (an offline GPU image).
The spec's `device` (cpu / cuda) places the step, and its `autocast_bf16` runs the timed steps' forwards
under bfloat16 autocast as spd/run_spd.py does (the first step, whose terms the driver checks, is float32).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_TYPE_PARAMS = re.compile(r"^([ \t]*)(class|def)[ \t]+(\w+)\[([^\]]*)\]([ \t]*)(\(|:)", re.M)
_FIRST_DEFINITION = re.compile(r"^(?:def |class |@|async def )", re.M)


def strip_type_params(source: str) -> str:
    """PEP 695 type-parameter lists rewritten for Python < 3.12: `def f[T, **P](` -> `def f(`,
    `class C[T]:` -> `class C(_typing.Generic[T]):`, `class C[T](Base[T]):` -> `class C(Base[T]):`,
    with `T = _typing.TypeVar("T")` (ParamSpec for **P, TypeVarTuple for *Ts, `bound=` for `T: Bound`)
    defined before the module's first definition. Source without type parameters is returned as is."""
    declared: dict[str, str] = {}

    def rewrite(match: re.Match[str]) -> str:
        indent, keyword, name, params, _, after = match.groups()
        names = []
        for param in (p.strip() for p in params.split(",")):
            if not param:
                continue
            if param.startswith("**"):
                tv, made = param[2:], f'_typing.ParamSpec("{param[2:]}")'
            elif param.startswith("*"):
                tv, made = param[1:], f'_typing.TypeVarTuple("{param[1:]}")'
            elif ":" in param:
                tv, bound = (s.strip() for s in param.split(":", 1))
                made = f'_typing.TypeVar("{tv}", bound={bound})'
            else:
                tv, made = param, f'_typing.TypeVar("{param}")'
            declared[tv] = made
            names.append(tv)
        if keyword == "class" and after == ":":
            return f"{indent}class {name}(_typing.Generic[{', '.join(names)}]):"
        return f"{indent}{keyword} {name}{after}"

    rewritten = _TYPE_PARAMS.sub(rewrite, source)
    if not declared:
        return source
    first = _FIRST_DEFINITION.search(rewritten)
    at = first.start() if first else len(rewritten)
    block = "import typing as _typing\n" + "".join(f"{k} = {v}\n" for k, v in declared.items())
    return rewritten[:at] + block + rewritten[at:]


class _Loader(importlib.machinery.SourceFileLoader):
    def source_to_code(self, data: Any, path: Any, *, _optimize: int = -1) -> Any:  # noqa: D102
        source = data.decode() if isinstance(data, bytes) else data
        return compile(strip_type_params(source), path, "exec", dont_inherit=True, optimize=_optimize)


class _Finder(importlib.abc.MetaPathFinder):
    """Loads the `spd` package from the reference checkout through _Loader."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:  # noqa: D102
        if fullname != "spd" and not fullname.startswith("spd."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path or [self.root])
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            spec.loader = _Loader(fullname, spec.origin)
        return spec


class _EmptyModule(types.ModuleType):
    """Stands in for an import the step never uses: any attribute is another empty module."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _EmptyModule(f"{self.__name__}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    # in annotations evaluated at definition: `float | wandb.plot.CustomChart`, `Stub[...]`
    def __or__(self, other: Any) -> Any:
        return self

    __ror__ = __or__

    def __getitem__(self, item: Any) -> Any:
        return self


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an _EmptyModule for each of `names` and their submodules: packages that are not installed
    (an offline GPU machine) whose imports the reference's modules make but its training step never uses."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:  # noqa: D102
        if fullname.split(".")[0] not in self.names:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:  # noqa: D102
        return _EmptyModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:  # noqa: D102
        pass


# imported at module level by the reference modules the step loads, used only for logging and loading env
STUBBABLE = ("wandb", "wandb_workspaces", "dotenv")


def import_reference(path: str) -> None:
    """Make `import spd` load the checkout at `path` (on Python < 3.12 through the rewriting loader);
    STUBBABLE packages that are not installed are served as empty modules."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    missing = [name for name in STUBBABLE if importlib.util.find_spec(name) is None]
    if missing:
        sys.meta_path.append(_StubFinder(missing))
    if sys.version_info < (3, 12):
        import typing

        import typing_extensions

        if not hasattr(typing, "override"):
            typing.override = typing_extensions.override
        for name in ("wandb_workspaces", "wandb_workspaces.reports", "wandb_workspaces.reports.v2",
                     "wandb_workspaces.workspaces"):  # fmt: skip
            sys.modules.setdefault(name, _EmptyModule(name))
        sys.meta_path.insert(0, _Finder(path))
    else:
        sys.path.insert(0, path)


def build(state_path: str, spec: dict[str, Any]) -> Any:
    """The reference's step on the driver's saved target, batch and weights: step() -> (its loss terms,
    the sum of |target logits| of its clean forward)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from spd.configs import (
        ImportanceMinimalityLossConfig,
        ModulePatternInfoConfig,
        StochasticReconLayerwiseLossConfig,
        StochasticReconLossConfig,
    )
    from spd.losses import compute_total_loss
    from spd.models.component_model import ComponentModel
    from spd.utils.module_utils import expand_module_patterns

    from lightning_modules.gpt.config import GPTConfig
    from lightning_modules.gpt.model import GPT

    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    state = torch.load(state_path, weights_only=True)
    target = GPT(GPTConfig(**spec["gpt"]))
    target.load_state_dict(state["target"])
    target.requires_grad_(False)
    target.to(device)
    x = state["batch"].to(device)
    info = expand_module_patterns(
        target, [ModulePatternInfoConfig(module_pattern=k, C=v) for k, v in spec["patterns"].items()]
    )
    model = ComponentModel(
        target_model=target, module_path_info=info, ci_fn_type=spec["ci"], ci_fn_hidden_dims=spec["hidden"],
        sigmoid_type="leaky_hard", pretrained_model_output_attr=None,
    ).to(device)  # fmt: skip
    with torch.no_grad():  # our V, U and CI-function weights (its Linear keeps W as (in, out))
        for name in model.target_module_paths:
            model.components[name].V.copy_(state["V"][name])
            model.components[name].U.copy_(state["U"][name])
            linears = [m for m in model.ci_fns[name].layers if hasattr(m, "W")]
            for layer, (w, b) in zip(linears, state["ci"][name], strict=True):
                layer.W.copy_(w.t())
                layer.b.copy_(b)
    params = []
    for name in model.target_module_paths:
        params += [*model.components[name].parameters(), *model.ci_fns[name].parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    coeffs = spec["coeffs"]
    losses = [
        ImportanceMinimalityLossConfig(coeff=coeffs["importance_minimality"], pnorm=spec["p"], beta=0.0),
        StochasticReconLossConfig(coeff=coeffs["stochastic_recon"]),
        StochasticReconLayerwiseLossConfig(coeff=coeffs["stochastic_recon_layerwise"]),
    ]

    def forward_backward(autocast_bf16: bool = False) -> tuple[dict[str, float], Any]:
        optimizer.zero_grad()
        weight_deltas = model.calc_weight_deltas()
        # the forward under bfloat16 autocast when asked, the backward outside it, as spd/run_spd.py
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast_bf16):
            out = model(x, cache_type="input")
            ci = model.calc_causal_importances(
                pre_weight_acts=out.cache, detach_inputs=False, sampling="continuous"
            )
            total, terms = compute_total_loss(
                loss_metric_configs=losses, model=model, batch=x, ci=ci, target_out=out.output,
                weight_deltas=weight_deltas, pre_weight_acts=out.cache, current_frac_of_training=0.0,
                sampling="continuous", use_delta_component=True, n_mask_samples=1,
                output_loss_type=spec["loss"],
            )  # fmt: skip
        total.backward()
        return terms, out.output

    def step(autocast_bf16: bool = False) -> tuple[dict[str, float], float]:
        terms, output = forward_backward(autocast_bf16)
        optimizer.step()
        return terms, float(output.float().abs().sum())  # float() waits for the GPU

    step.forward_backward = forward_backward  # the loss's forward and backward alone (operator counts)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-path", required=True)
    parser.add_argument("--state", required=True, help="the driver's torch.save of target, batch and weights")
    parser.add_argument(
        "--spec",
        required=True,
        help="JSON: gpt, patterns, ci, hidden, coeffs, p, loss, threads, autocast_bf16, device",
    )
    args = parser.parse_args()
    import_reference(args.reference_path)
    spec = json.loads(args.spec)
    step = build(args.state, spec)
    terms, out_sum = step()  # float32: the driver checks these against its own
    autocast_bf16 = bool(spec.get("autocast_bf16", False))
    ready = {"ready": True, "terms": terms, "target_out_abs_sum": out_sum, "python": sys.version.split()[0]}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "flops":
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step(autocast_bf16)
            print(json.dumps({"gflop": counter.get_total_flops() / 1e9}), flush=True)
            continue
        if command == "ops":
            from benchmarks.op_count import count_ops

            print(json.dumps(count_ops(lambda: step.forward_backward(autocast_bf16))), flush=True)
            continue
        if command == "launches":
            from benchmarks.op_count import count_launches

            counted = count_launches(lambda: step.forward_backward(autocast_bf16), spec.get("device", "cpu"))
            print(json.dumps(counted), flush=True)
            continue
        start = time.perf_counter()
        step(autocast_bf16)
        print(json.dumps({"ms": (time.perf_counter() - start) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
