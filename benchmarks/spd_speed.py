"""SPD training-step speed and peak memory: our implementation vs a naive one of the same method.

Ours: `ComponentModel` with forward hooks registered once, cached frozen target weights, the cache-blocked
CI MLP (`ScalarMLPFunction`, CPU), the fused KL from logits with the target's softmax prepared once per
batch, optionally `torch.compile`d CI functions and components. Naive (written here): hooks registered and
removed on every forward, target weights re-read and copied on every use, einsum everywhere under plain
autograd, KL through log_softmax with the target's recomputed every term, no compile, float32. Both run the same objective (same terms, same order of random
draws), so with the same seed and batch their losses must agree; that is checked before timing.

    python benchmarks/spd_speed.py                       # TMS 5-2 and the tiny LM on CPU (a few minutes)
    python benchmarks/spd_speed.py --device cuda --compile

Each (config, implementation) is timed in its own subprocess (peak memory: growth of the peak RSS over
the RSS before the first step on CPU (VmHWM reset through /proc/self/clear_refs),
torch.cuda.max_memory_allocated on CUDA). Prints a table, writes benchmarks/results/spd_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proc_memory import proc_status_bytes, reset_peak_rss  # noqa: E402

from lightning_modules.gpt.config import GPTConfig  # noqa: E402
from lightning_modules.gpt.model import GPT  # noqa: E402
from lightning_modules.spd import losses as L  # noqa: E402
from lightning_modules.spd.ci_functions import MLPCiFn, SharedMLPCiFn, VectorMLPCiFn  # noqa: E402
from lightning_modules.spd.component_model import ComponentModel  # noqa: E402
from lightning_modules.spd.objective import SPDObjective  # noqa: E402
from lightning_modules.spd.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid  # noqa: E402
from lightning_modules.spd.toy_models import TMSModel, sparse_feature_batch, train_toy_model  # noqa: E402

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
    ):
        """Register a hook per module, run the target, remove the hooks."""
        acts: dict[str, Tensor] = {}
        masks, deltas = masks or {}, deltas or {}

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
    cm = ComponentModel(target.to(device), cfg["patterns"], cfg["ci"], cfg["hidden"], "leaky_hard")
    return cm, x.to(device), loss_type


def check_equal_losses(name: str, device: str) -> dict[str, float]:
    """Same seed, same batch: every term of ours and the naive implementation must agree."""
    cm, x, loss_type = build(name, device)
    naive = NaiveSPD(cm)
    objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type)
    torch.manual_seed(123)
    ours = objective(cm, x, 0.0).terms
    torch.manual_seed(123)
    theirs = naive.losses(x, loss_type, objective.p(0.0))
    diffs = {}
    for k in COEFFS:
        a, b = ours[k].item(), theirs[k].item()
        diffs[k] = abs(a - b) / max(abs(b), 1e-12)
        if diffs[k] > 1e-4:
            raise AssertionError(f"{name}: loss {k} differs: ours {a} vs naive {b}")
    return diffs


def time_one(name: str, impl: str, device: str, steps: int, warmup: int) -> dict[str, float]:
    """Median step time (forward + backward + AdamW) and peak memory of one implementation."""
    cm, x, loss_type = build(name, device)
    if impl == "naive":
        model: nn.Module = NaiveSPD(cm)
        params = list(model.V.values()) + list(model.U.values()) + list(model.ci_fns.parameters())
        p = 1.0

        def loss_fn() -> Tensor:
            terms = model.losses(x, loss_type, p)
            return sum(COEFFS[k] * v for k, v in terms.items())
    else:
        objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type)
        if impl == "ours_compile":
            for m in [*cm.ci_fns.values(), *cm.components.values()]:
                m.compile()
        params = [*cm.components.parameters(), *cm.ci_fns.parameters()]

        def loss_fn() -> Tensor:
            return objective(cm, x, 0.5).total

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":  # peak growth over the memory held before the first step
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status_bytes("VmHWM") - base
    return {"step_ms": statistics.median(times) * 1e3, "peak_mib": max(0, peak) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (1: fastest on a shared CPU)"
    )
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(time_one(*args.child, args.device, args.steps, args.warmup)))
        return
    impls = ["naive", "ours"] + (["ours_compile"] if args.compile else [])
    results: dict[str, Any] = {
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "configs": {},
    }
    for name in args.configs:
        row: dict[str, Any] = {"loss_rel_diff": check_equal_losses(name, args.device)}
        runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        for _ in range(args.rounds):  # interleaved, so load changes hit every implementation alike
            for impl in impls:
                cmd = [sys.executable, __file__, "--child", name, impl, "--device", args.device]
                cmd += [
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{name}/{impl} failed:\n{out.stderr[-3000:]}")
                runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for impl, rs in runs.items():
            row[impl] = {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"rounds": rs}
        row["speedup"] = row["naive"]["step_ms"] / row["ours"]["step_ms"]
        results["configs"][name] = row
    print(
        f"\nSPD training step on {args.device} ({args.threads} thread(s)): median of {args.steps} steps, "
        f"median over {args.rounds} interleaved rounds"
    )
    print("| config | implementation | step ms | peak MiB | speed-up vs naive |")
    print("|---|---|---:|---:|---:|")
    for name, row in results["configs"].items():
        for impl in impls:
            r = row[impl]
            speed = row["naive"]["step_ms"] / r["step_ms"]
            print(f"| {name} | {impl} | {r['step_ms']:.1f} | {r['peak_mib']:.1f} | {speed:.2f}x |")
        print(f"| {name} | losses equal (max rel. diff) | {max(row['loss_rel_diff'].values()):.1e} | | |")
    out = args.out or ROOT / "benchmarks" / "results" / f"spd_speed_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
