"""Side-by-side GPT training speed: our LightningModule vs a plain loop, ours vs transformers' GPT-2,
and every architecture/speed switch vs the GPT-2 baseline. Medians over interleaved rounds.

    python benchmarks/gpt_speed.py --size tiny --device cpu            # a few minutes on 2 CPU cores
    python benchmarks/gpt_speed.py --size d12 --device cuda --precision bf16-mixed

Per variant: tokens/s, model TFLOP/s and MFU (training FLOPs per step counted by torch's FlopCounterMode
on a meta-device copy, over callbacks.throughput.PEAK_FLOPS: CUDA only), peak memory (CUDA: the caching
allocator's peak; CPU: the peak resident memory of a fresh process above what the built model occupies,
i.e. activations + gradients + optimizer state) and the validation loss after the same tokens.
Prints markdown tables and writes benchmarks/results/gpt_speed_<size>_<device>.json (or --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/gpt_speed.py

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.proc_memory import proc_status_bytes, reset_peak_rss  # noqa: E402
from benchmarks.results import run_metadata, write_results  # noqa: E402
from benchmarks.timing import sync  # noqa: E402
from callbacks.throughput import peak_flops_for  # noqa: E402
from lightning_modules.common.optim import decay_param_groups, warmup_cosine_lambda  # noqa: E402
from lightning_modules.gpt import GPT, GPTConfig, GPTLightningModule  # noqa: E402
from lightning_modules.gpt.module import training_flops  # noqa: E402

SIZES = {
    "tiny": dict(block_size=128, n_layer=4, n_head=4, n_embd=128, vocab_size=4096, batch=16),
    "small": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, vocab_size=8192, batch=8),
    "d12": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, batch=16),
}
# Each switch alone, then the combined presets; values that depend on n_head are filled in later.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "math_attention": {"attn_backend": "math"},  # the non-flash reference: 'flash' is sdpa vs this
    "gqa": {"n_kv_head": "n_head/3"},
    "mqa": {"n_kv_head": 1},
    "mlp3x": {"mlp_ratio": 3.0},
    "rope": {"rope": True},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": True},
    "sliding_window": {"sliding_window": "block/4"},
    "grad_checkpointing": {"gradient_checkpointing": True},
    "compile": {"__compile__": True},
    "fast": {"n_kv_head": "n_head/3", "mlp_ratio": 3.0},
    "modern": {
        "n_kv_head": "n_head/3",
        "mlp_ratio": 3.0,
        "rope": True,
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "qk_norm": True,
    },
}
CLAIMS = {
    "gqa": "+20-30% tokens/s",
    "math_attention": "flash +20-30% (baseline vs this row)",
    "mlp3x": "+10-15% tokens/s",
    "fast": "1.6-1.8x at val loss within 1-2%",
    "grad_checkpointing": "-40-50% memory at ~20% slower",
    "compile": "+20-30% tokens/s",
}


def resolve(size: dict[str, Any], switches: dict[str, Any]) -> tuple[GPTConfig, bool]:
    fields = {k: v for k, v in size.items() if k != "batch"}
    compile_model = False
    for key, value in switches.items():
        if key == "__compile__":
            compile_model = True
            continue
        if value == "n_head/3":
            value = max(1, size["n_head"] // 3) if size["n_head"] % 3 == 0 else max(1, size["n_head"] // 2)
        if value == "block/4":
            value = size["block_size"] // 4
        fields[key] = value
    return GPTConfig(**fields), compile_model


def resolved_switches(size: dict[str, Any], name: str) -> dict[str, Any]:
    """The config fields a variant sets, with size-dependent values resolved (plus compile)."""
    config, compile_model = resolve(size, VARIANTS[name])
    out = {k: getattr(config, k) for k in VARIANTS[name] if k != "__compile__"}
    return out | ({"compile": True} if compile_model else {})


def synthetic_batches(
    vocab: int, batch: int, seq: int, n: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random-token batches: throughput does not depend on the text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return out


def autocast(device: torch.device, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def plain_loop(
    model: torch.nn.Module,
    batches: list,
    device: torch.device,
    precision: str,
    lr: float,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
) -> tuple[list[float], list[float]]:
    """A hand-written PyTorch training loop with the same optimiser, schedule and clipping as ours."""
    model.to(device).train()
    opt = torch.optim.AdamW(
        decay_param_groups(model.named_parameters()),
        lr=lr,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine_lambda(min(10, len(batches) - 1), len(batches), 0.1)
    )  # the module caps warmup at total - 1 too
    losses, times = [], []
    sync(device)
    last = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() syncs, as Lightning's progress bar does each step
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return losses, times


class StepTimer(pl.Callback):
    """Wall time between consecutive training-batch ends (includes data loading and framework work)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def lightning_run(
    config: GPTConfig, state: dict, batches: list, device: torch.device, precision: str, lr: float
):
    module = GPTLightningModule(
        config,
        optimizer=partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
        warmup_steps=10,
        lr_decay_steps=len(batches),
        sample_tokens=0,
    )
    module.model.load_state_dict(state)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[timer],
        limit_val_batches=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.losses, timer.times


def ours_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def hf_loss(output: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1).float(), y.flatten())


def median_tps(times: list[float], tokens_per_step: int, skip: int) -> float:
    return tokens_per_step / statistics.median(times[skip:])


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def cpu_memory_probe(name: str, size: dict[str, Any], args) -> dict[str, float]:
    """In this (fresh) process: build the variant, reset the peak-RSS mark, train a few steps and
    return the peak resident memory above the built model (MiB). Linux only (/proc)."""
    config, compile_model = resolve(size, VARIANTS[name])
    batches = synthetic_batches(config.vocab_size, size["batch"], config.block_size, args.memory_steps)
    torch.manual_seed(0)
    model = GPT(config)
    if compile_model:
        model.compile()
    before = reset_peak_rss()  # the peak mark now starts at the built model's RSS
    plain_loop(model, batches, torch.device("cpu"), args.precision, args.lr, ours_loss)
    return {"model_rss_mb": before / 2**20, "training_peak_mb": (proc_status_bytes("VmHWM") - before) / 2**20}


def cpu_training_memory(name: str, args) -> float | None:
    """Run cpu_memory_probe for one variant in a fresh interpreter (peaks don't leak between variants)."""
    cmd = [sys.executable, __file__, "--size", args.size, "--device", "cpu", "--memory_probe", name]
    cmd += ["--memory_steps", str(args.memory_steps), "--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, env=None)
    if done.returncode != 0:
        print(f"memory probe {name} failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["training_peak_mb"]


def compare_lightning_vs_plain(args, size, device) -> dict[str, Any]:
    config, _ = resolve(size, {})
    batches = synthetic_batches(config.vocab_size, size["batch"], config.block_size, args.steps)
    torch.manual_seed(0)
    state = GPT(config).state_dict()
    tokens = size["batch"] * config.block_size
    ratios, first_losses = [], {}
    for round_idx in range(args.rounds):
        model = GPT(config)
        model.load_state_dict(state)
        plain_losses, plain_times = plain_loop(model, batches, device, args.precision, args.lr, ours_loss)
        pl_losses, pl_times = lightning_run(config, state, batches, device, args.precision, args.lr)
        ratios.append(
            median_tps(pl_times, tokens, args.warmup) / median_tps(plain_times, tokens, args.warmup)
        )
        if round_idx == 0:
            first_losses = {"plain": plain_losses[:5], "lightning": pl_losses[:5]}
    max_diff = max(abs(a - b) for a, b in zip(first_losses["plain"], first_losses["lightning"]))
    return {
        "tokens_per_s_ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "first_losses": first_losses,
        "max_abs_loss_diff_first5": max_diff,
    }


def compare_ours_vs_hf(args, size, device) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config, _ = resolve(size, {})
    batches = synthetic_batches(config.vocab_size, size["batch"], config.block_size, args.steps)
    tokens = size["batch"] * config.block_size
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf_config._attn_implementation = "sdpa"
    ratios = []
    for _ in range(args.rounds):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(hf_config)
        ours = GPT.from_hf(hf)  # identical weights; our embedding is padded to a multiple of 64
        _, ours_times = plain_loop(ours, batches, device, args.precision, args.lr, ours_loss)
        _, hf_times = plain_loop(hf, batches, device, args.precision, args.lr, hf_loss)
        ratios.append(median_tps(ours_times, tokens, args.warmup) / median_tps(hf_times, tokens, args.warmup))
    return {"tokens_per_s_ratio_median": statistics.median(ratios), "ratios": ratios}


def compare_switches(args, size, device, val_batches) -> dict[str, Any]:
    names = [n for n in VARIANTS if n in args.variants] if args.variants else list(VARIANTS)
    tokens = size["batch"] * size["block_size"]
    speed: dict[str, list[float]] = {n: [] for n in names}
    memory: dict[str, float | None] = {}
    quality: dict[str, float] = {}
    train_batches = synthetic_batches(size["vocab_size"], size["batch"], size["block_size"], args.steps)
    for round_idx in range(args.rounds):
        for name in names:  # interleaved: every variant once per round
            config, compile_model = resolve(size, VARIANTS[name])
            torch.manual_seed(0)
            model = GPT(config)
            if compile_model:
                model.compile()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, times = plain_loop(model, train_batches, device, args.precision, args.lr, ours_loss)
            speed[name].append(median_tps(times, tokens, args.warmup))
            memory[name] = peak_memory_mb(device)
            if round_idx == 0 and val_batches is not None:
                quality[name] = train_and_validate(config, compile_model, val_batches, device, args)
    if device.type == "cpu" and not args.skip_memory:
        memory = {name: cpu_training_memory(name, args) for name in names}
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    peak = peak_flops_for(device, dtype)
    base = statistics.median(speed["baseline"])
    rows = {}
    for name in names:
        tps = statistics.median(speed[name])
        flops = training_flops(resolve(size, VARIANTS[name])[0], (size["batch"], size["block_size"]))
        achieved = flops * tps / tokens
        rows[name] = {
            "switches": resolved_switches(size, name),
            "tokens_per_s": tps,
            "speedup_vs_baseline": tps / base,
            "flops_per_step": flops,
            "model_tflops_per_s": achieved / 1e12,
            "mfu": achieved / peak if peak else None,
            "peak_memory_mb": memory[name],
            "memory_vs_baseline": (memory[name] / memory["baseline"]) if memory.get("baseline") else None,
            "val_loss": quality.get(name),
            "claim": CLAIMS.get(name, ""),
            "all_rounds_tokens_per_s": speed[name],
        }
    return rows


def train_and_validate(config, compile_model, data, device, args) -> float:
    """Train on real text for args.quality_steps steps, then return the token-weighted val loss."""
    train_batches, val = data  # the same batches for every variant
    torch.manual_seed(0)
    model = GPT(config)
    if compile_model:
        model.compile()
    plain_loop(model, train_batches[: args.quality_steps], device, args.precision, args.lr, ours_loss)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in val:
            x, y = x.to(device), y.to(device)
            with autocast(device, args.precision):
                total += F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def real_text(size: dict[str, Any], args) -> tuple[list, list]:
    """Training and validation batches from the embedded corpus (the same for every variant)."""
    from datamodules import TextDataModule

    dm = TextDataModule(
        tokenizer="bpe",
        bpe_vocab_size=size["vocab_size"] if size["vocab_size"] <= 8192 else 8192,
        block_size=size["block_size"],
        batch_size=size["batch"],
        max_chars=args.corpus_chars,
        cache_dir=args.cache_dir,
    )
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    train = [b for _, b in zip(range(args.quality_steps), _cycle(dm.train_dataloader()))]
    val = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]
    return train, val


def _cycle(loader):
    while True:
        yield from loader


def print_tables(result: dict[str, Any]) -> None:
    lp = result["lightning_vs_plain"]
    print("\n| comparison | tokens/s ratio (median) | goal | notes |\n|---|---|---|---|")
    print(
        f"| GPTLightningModule + Trainer vs plain loop | {lp['tokens_per_s_ratio_median']:.3f} | >= 0.97 | "
        f"first-5 loss max |diff| = {lp['max_abs_loss_diff_first5']:.2e} |"
    )
    hf = result["ours_vs_hf"]
    print(
        f"| our GPT vs transformers GPT2LMHeadModel | {hf['tokens_per_s_ratio_median']:.3f} | >= 1 | same optimiser |"
    )
    mem_kind = "train MiB" if result["setup"]["device_type"] == "cpu" else "peak MiB"
    print(
        f"\n| variant | tokens/s | vs baseline | TFLOP/s | MFU | {mem_kind} | mem vs base | val loss | claim |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in result["switches"].items():
        mem = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] else "n/a"
        mem_ratio = f"{row['memory_vs_baseline']:.2f}" if row["memory_vs_baseline"] else "n/a"
        val = f"{row['val_loss']:.3f}" if row["val_loss"] is not None else "n/a"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "n/a"
        print(
            f"| {name} | {row['tokens_per_s']:.0f} | {row['speedup_vs_baseline']:.2f}x | "
            f"{row['model_tflops_per_s']:.3f} | {mfu} | {mem} | {mem_ratio} | {val} | {row['claim']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the median")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--quality_steps", type=int, default=200, help="steps trained before the val loss")
    parser.add_argument("--val_batches", type=int, default=20)
    parser.add_argument("--corpus_chars", type=int, default=2_000_000)
    parser.add_argument("--cache_dir", default="data_cache")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--skip_memory", action="store_true", help="CPU: skip the per-variant memory probes")
    parser.add_argument("--memory_steps", type=int, default=3, help="steps per CPU memory probe")
    parser.add_argument("--memory_probe", default=None, help=argparse.SUPPRESS)  # internal: one probe
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    if args.memory_probe:
        print(json.dumps(cpu_memory_probe(args.memory_probe, SIZES[args.size], args)))
        return
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    size = SIZES[args.size]
    meta = run_metadata()
    pl.seed_everything(0, verbose=False)
    result: dict[str, Any] = {
        "setup": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else meta["cpu"],
            "device_type": device.type,
            "threads": torch.get_num_threads(),
            "precision": args.precision,
        },
        "size": {**size},
        "args": vars(args),
        "config": dataclasses.asdict(resolve(size, {})[0]),
    }
    result["lightning_vs_plain"] = compare_lightning_vs_plain(args, size, device)
    result["ours_vs_hf"] = compare_ours_vs_hf(args, size, device)
    data = None if args.skip_quality else real_text(size, args)
    result["switches"] = compare_switches(args, size, device, data)
    print_tables(result)
    write_results(f"gpt_speed_{args.size}_{device.type}", meta, result, out=args.json)


if __name__ == "__main__":
    main()
