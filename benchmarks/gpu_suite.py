"""Every GPU claim of the collection checked by one command, on one CUDA device, in under 8 minutes.

    python benchmarks/gpu_suite.py                      # H100/H200: writes benchmarks/results/gpu_suite.json
    python benchmarks/gpu_suite.py --only d12_mfu fsdp  # a subset (the rest recorded as not selected)
    python benchmarks/gpu_suite.py --dry-run            # CPU, tiny shapes, CUDA checks skipped; a temp JSON

Each check runs in its own subprocess (its own process group) with its own time limit; a check that fails or
runs out of time is recorded (status, seconds, the tail of its output) and the rest continue. The whole suite
stops starting checks when its budget (--budget) is spent. Checks, in order (goals from issue #17):

  d12_mfu           configs/gpt2/d12.yaml's model, bf16-mixed + torch.compile under a Lightning Trainer with
                    the config's batch and gradient accumulation: tokens/s and MFU (model FLOPs from
                    lightning_modules.gpt.module.training_flops, dense peak from callbacks.throughput's
                    PEAK_FLOPS: goal >= 45%)
  d12_fast_vs_d12   d12_fast.yaml against d12.yaml, both as configured (eager), interleaved: goal >= 1.3x tokens/s
  npt_layer         converted NPT layer vs the dense Llama-3.1-8B layer (benchmarks/npt_layer.py, k 128 x r 64 =
                    8192), forward+backward: goal within 1.5x
  deepspeed_stage2  train.py fit on configs/trainer/deepspeed_stage2.yaml, resumed from its last.ckpt, then
                    convert_zero_checkpoint_to_fp32_state_dict and load the result back
  deepspeed_stage3  the same on deepspeed_stage3.yaml
  fsdp              train.py fit / checkpoint / resume on configs/trainer/fsdp.yaml (sharded checkpoints)
  spd_speed         SPD's training step on CUDA, ours vs the naive reference (benchmarks/spd_speed.py)
  checkpoint_stall  the checkpoint stall of each checkpoint IO on CUDA (benchmarks/checkpoint_stall.py)
  flash_attn        attn_backend: flash_attn against sdpa: same loss, tokens/s (skipped without flash-attn)
  bnb_npt           NPT on an 8-bit (bitsandbytes) Llama through train.py (skipped without bitsandbytes)
  pytest_gpu        python -m pytest -m gpu tests/test_gpu.py

The train.py checks read a stream of random tokens (a .bin file written by the suite, tokenizer 'bytes'), so
nothing is downloaded. When jsonargparse or deepspeed is missing, the suite first installs it offline from
the folder benchmarks/prepare_gpu_wheels.py fills (--wheels; pip install --no-index --find-links DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # python benchmarks/gpu_suite.py

import torch  # noqa: E402

from benchmarks.results import RESULTS_DIR, run_metadata, write_results  # noqa: E402
from benchmarks.timing import sync  # noqa: E402

CONFIGS = ROOT / "configs"
SUITE_BUDGET_S = 460.0  # install + every check, under 8 minutes on one H100/H200 (a kill takes <= 10 s)
DRY_BUDGET_S = 300.0
DEFAULT_WHEELS = "data_cache/gpu_wheels"  # benchmarks/prepare_gpu_wheels.py's default folder
INSTALLABLE = {"jsonargparse": "jsonargparse[signatures]", "deepspeed": "deepspeed"}  # module: requirement
NOT_OFFLINE = {
    "flash_attn": "flash-attn (a CUDA build matching the image's torch; too large to carry)",
    "bitsandbytes": "bitsandbytes (its CUDA wheels are too large to carry)",
}
VERSIONED = ("lightning", "transformers", "jsonargparse", "deepspeed", "flash-attn", "bitsandbytes", "triton")
MIN_START_S = 15.0  # a check is not started with less of the budget left


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: what it measures, its goal, its time limits and what it needs to run."""

    name: str
    what: str
    goal: str | None
    limit_s: float  # on the GPU
    dry_limit_s: float = 90.0  # in a dry run
    needs_cuda: bool = True
    needs: tuple[str, ...] = ()  # importable modules


CHECKS: list[Check] = [
    Check(
        "d12_mfu",
        "d12 bf16-mixed + torch.compile: tokens/s and MFU against the dense bf16 peak",
        ">= 45% MFU",
        150,
        needs_cuda=False,
    ),
    Check("d12_fast_vs_d12", "d12_fast vs d12 tokens/s, eager, interleaved", ">= 1.3x", 90, needs_cuda=False),
    Check(
        "npt_layer",
        "NPT converted Llama-8B layer fwd+bwd vs the dense layer (k·r = 8192)",
        "<= 1.5x",
        90,
        needs_cuda=False,
    ),
    Check(
        "deepspeed_stage2",
        "train.py fit + resume on ZeRO 2, fp32 conversion loads",
        "fits and resumes",
        120,
        needs=("jsonargparse", "deepspeed"),
    ),
    Check(
        "deepspeed_stage3",
        "train.py fit + resume on ZeRO 3, fp32 conversion loads",
        "fits and resumes",
        120,
        needs=("jsonargparse", "deepspeed"),
    ),
    Check(
        "fsdp", "train.py fit / checkpoint / resume on FSDP", "fits and resumes", 120, needs=("jsonargparse",)
    ),
    Check("spd_speed", "SPD training step, ours vs naive", None, 90, needs_cuda=False),
    Check("checkpoint_stall", "checkpoint stall per checkpoint IO", None, 90, needs_cuda=False),
    Check(
        "flash_attn", "attn_backend flash_attn vs sdpa: loss and tokens/s", None, 60, needs=("flash_attn",)
    ),
    Check(
        "bnb_npt",
        "NPT on an 8-bit bitsandbytes Llama through train.py",
        None,
        90,
        needs=("bitsandbytes", "jsonargparse"),
    ),
    Check(
        "pytest_gpu",
        "python -m pytest -m gpu tests/test_gpu.py",
        "all pass",
        240,
        needs_cuda=False,
        needs=("jsonargparse",),
    ),
]
BY_NAME = {c.name: c for c in CHECKS}


# ================================================================================== the checks (in a child)
@dataclasses.dataclass
class Context:
    """What a check runs with: the device, the dry-run switch, a work folder and the random-token file."""

    dry_run: bool
    workdir: Path
    tokens: Path  # random uint16 tokens < 256, read with tokenizer 'bytes'

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    @property
    def precision(self) -> str:
        return "32-true" if self.dry_run else "bf16-mixed"


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config as a dict."""
    import yaml

    return yaml.safe_load(path.read_text())


def gpt_setup(ctx: Context, name: str) -> tuple[Any, int, int]:
    """(GPTConfig, micro-batch size, gradient accumulation) of configs/gpt2/<name>.yaml; tiny in a dry run."""
    from lightning_modules.gpt import GPTConfig

    cfg = read_yaml(CONFIGS / "gpt2" / f"{name}.yaml")
    fields = dict(cfg["model"]["init_args"]["config"])
    batch = cfg["data"]["init_args"]["batch_size"]
    accumulate = cfg["trainer"].get("accumulate_grad_batches", 1)
    if ctx.dry_run:  # same switches, tiny sizes (n_head 12 keeps d12_fast's 4 KV heads a divisor)
        fields.update(block_size=64, n_layer=2, n_head=12, n_embd=96, vocab_size=512)
        batch, accumulate = 2, 2
    return GPTConfig(**fields), batch, accumulate


def train_tokens_per_s(
    ctx: Context, config: Any, batch: int, accumulate: int, steps: int, compile_model: bool
) -> dict[str, Any]:
    """Train `steps` optimizer steps of GPTLightningModule under a Trainer on random tokens; tokens/s over the
    micro-batches after the first optimizer step (compilation and warm-up), synchronised at both ends."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from benchmarks.gpt_speed import synthetic_batches
    from lightning_modules.gpt import GPTLightningModule

    total = steps * accumulate

    class Window(pl.Callback):
        def __init__(self) -> None:
            self.seen, self.start, self.end = 0, 0.0, 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx) -> None:
            self.seen += 1
            if self.seen in (accumulate, total):
                sync(pl_module.device)
                now = time.perf_counter()
                self.start, self.end = (now, self.end) if self.seen == accumulate else (self.start, now)

    torch.manual_seed(0)
    module = GPTLightningModule(config, compile=compile_model, warmup_steps=1, sample_tokens=0)
    window = Window()
    trainer = pl.Trainer(
        accelerator=ctx.device.type,
        devices=1,
        precision=ctx.precision,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[window],
    )
    batches = synthetic_batches(config.vocab_size, batch, config.block_size, total)
    started = time.perf_counter()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    measured = total - accumulate
    seconds = window.end - window.start
    cuda = ctx.device.type == "cuda"
    return {
        "tokens_per_s": measured * batch * config.block_size / seconds,
        "measured_micro_batches": measured,
        "measured_s": seconds,
        "fit_s": time.perf_counter() - started,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def run_d12_mfu(ctx: Context) -> dict[str, Any]:
    """d12 with bf16-mixed + compile: tokens/s, model FLOPs, MFU against the dense bf16 peak of the device."""
    from callbacks.throughput import peak_flops_for
    from lightning_modules.gpt.module import training_flops

    config, batch, accumulate = gpt_setup(ctx, "d12")
    compile_model = not ctx.dry_run  # compiling costs minutes on a small CPU; the plumbing is the same
    steps = 2 if ctx.dry_run else 3
    speed = train_tokens_per_s(ctx, config, batch, accumulate, steps, compile_model)
    flops = training_flops(config, (batch, config.block_size))
    achieved = flops * speed["tokens_per_s"] / (batch * config.block_size)
    peak = peak_flops_for(ctx.device, torch.bfloat16)
    lightning_peak = None
    if ctx.device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        lightning_peak = get_available_flops(ctx.device, torch.bfloat16)
    mfu = achieved / peak if peak else None
    figures = {
        "config": "configs/gpt2/d12.yaml" + (" (tiny sizes: dry run)" if ctx.dry_run else ""),
        "batch": batch,
        "block_size": config.block_size,
        "accumulate_grad_batches": accumulate,
        "optimizer_steps": steps,
        "precision": ctx.precision,
        "compile": compile_model,
        **speed,
        "flops_per_micro_batch": flops,
        "model_tflops_per_s": achieved / 1e12,
        "peak_flops": peak,
        "peak_source": "callbacks.throughput.PEAK_FLOPS (dense bf16)",
        "lightning_peak_flops": lightning_peak,
        "mfu": mfu,
    }
    figures["goal_met"] = None if ctx.dry_run or mfu is None else mfu >= 0.45
    mfu_text = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a (no peak for this device)"
    figures["headline"] = f"{mfu_text}, {speed['tokens_per_s']:,.0f} tokens/s"
    return figures


def run_d12_fast_vs_d12(ctx: Context) -> dict[str, Any]:
    """d12_fast against d12, each as its config sets it (compile off), interleaved rounds, median tokens/s."""
    rounds = 1 if ctx.dry_run else 2
    steps = 2
    runs: dict[str, list[float]] = {"d12": [], "d12_fast": []}
    for _ in range(rounds):
        for name in runs:
            config, batch, accumulate = gpt_setup(ctx, name)
            runs[name].append(
                train_tokens_per_s(ctx, config, batch, accumulate, steps, False)["tokens_per_s"]
            )
    base, fast = statistics.median(runs["d12"]), statistics.median(runs["d12_fast"])
    ratio = fast / base
    return {
        "precision": ctx.precision,
        "compile": False,
        "rounds": rounds,
        "tokens_per_s": runs,
        "d12_tokens_per_s": base,
        "d12_fast_tokens_per_s": fast,
        "speedup": ratio,
        "goal_met": None if ctx.dry_run else ratio >= 1.3,
        "headline": f"{ratio:.2f}x ({fast:,.0f} vs {base:,.0f} tokens/s)",
    }


def run_npt_layer(ctx: Context) -> dict[str, Any]:
    """benchmarks/npt_layer.py's variants; the goal compares each NPT training mode with its dense match."""
    from benchmarks import npt_layer

    args = argparse.Namespace(
        device=ctx.device.type,
        shape="small" if ctx.dry_run else "llama8b",
        mode="single",
        dtype="float32" if ctx.dry_run else "bfloat16",
        repeats=2 if ctx.dry_run else 10,
        warmup=1 if ctx.dry_run else 3,
    )
    res = npt_layer.run(args)
    ms = {name: row["ms"] for name, row in res["variants"].items()}
    teacher = ms["npt_teacher_forced"] / ms["original_bwd_input"]
    free = ms["npt_free_running"] / ms["original_finetune"]
    worst = max(teacher, free)
    return {
        "shape": args.shape,
        "k_times_r": res["k"] * res["r"],
        "dtype": args.dtype,
        "ms": ms,
        "peak_mib": {name: row["peak_mib"] for name, row in res["variants"].items()},
        "teacher_forced_vs_frozen_bwd": teacher,
        "free_running_vs_finetune": free,
        "goal_met": None if ctx.dry_run else worst <= 1.5,
        "headline": f"teacher-forced {teacher:.2f}x, free-running {free:.2f}x of dense fwd+bwd",
    }


def _run_python(script: Path, args: tuple[str, ...], timeout: float, **kwargs: Any) -> str:
    """Run `python SCRIPT ARGS` (kwargs: cwd, env); its output (stdout + stderr), printed; RuntimeError with
    the tail on failure."""
    done = subprocess.run(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    print(done.stdout[-4000:], flush=True)
    if done.returncode != 0:
        shown = " ".join(args[:5])
        raise RuntimeError(
            f"{script.relative_to(ROOT)} {shown} ... exited {done.returncode}:\n{done.stdout[-3000:]}"
        )
    return done.stdout


def train_py(cwd: Path, *args: str, timeout: float = 600) -> str:
    """Run `python train.py ARGS` in cwd; its output (stdout + stderr); RuntimeError with the tail on failure.
    LMC_DEBUG=1: an error ends with its traceback, not train.py's short user message."""
    cwd.mkdir(parents=True, exist_ok=True)
    return _run_python(ROOT / "train.py", args, timeout, cwd=cwd, env={**os.environ, "LMC_DEBUG": "1"})


def data_args(ctx: Context, block_size: int, batch_size: int) -> list[str]:
    """train.py data options: the suite's random-token file, tokenizer 'bytes', no workers."""
    return [
        f"--data.init_args.sources={ctx.tokens}",
        "--data.init_args.tokenizer=bytes",
        f"--data.init_args.block_size={block_size}",
        f"--data.init_args.batch_size={batch_size}",
        "--data.init_args.num_workers=0",
        f"--data.init_args.cache_dir={ctx.workdir / 'data_cache'}",
    ]


def _step(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def fit_and_resume(ctx: Context, preset: Path, steps: int = 4) -> dict[str, Any]:
    """train.py fit of configs/gpt2/tiny.yaml on `preset` for `steps` steps, then resumed from its last.ckpt to
    2 x steps; checks the step it resumed at and the step it finished at."""
    run = ctx.workdir / f"fit_{preset.stem}"
    common = [
        "fit",
        "--config",
        str(CONFIGS / "gpt2" / "tiny.yaml"),
        "--config",
        str(preset),
        *data_args(ctx, 128, 8),
        f"--trainer.val_check_interval={steps}",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.warmup_steps=2",
        "--model.init_args.sample_tokens=0",
    ]
    if preset.parent.name == "trainer" and "cpu" not in preset.stem:
        common.append("--trainer.devices=1")
    started = time.perf_counter()
    train_py(run, *common, f"--trainer.max_steps={steps}")
    first_s = time.perf_counter() - started
    last = sorted(run.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    if not last:
        raise RuntimeError(f"no last.ckpt under {run}/lightning_logs after the first fit")
    last_ckpt = last[-1]
    size = (
        sum(p.stat().st_size for p in last_ckpt.rglob("*") if p.is_file())
        if last_ckpt.is_dir()
        else last_ckpt.stat().st_size
    )
    started = time.perf_counter()
    out = train_py(run, *common, f"--trainer.max_steps={2 * steps}", f"--ckpt_path={last_ckpt}")
    resume_s = time.perf_counter() - started
    resumed_at = _step(r"resuming from .* at step (\d+)", out)
    finished_at = _step(r"run (?:finished|stopped) at step (\d+)", out)
    if resumed_at != steps or finished_at != 2 * steps:
        raise RuntimeError(
            f"resume: expected to continue at step {steps} and finish at {2 * steps}; the run said "
            f"resumed at {resumed_at}, finished at {finished_at}"
        )
    return {
        "preset": str(preset.relative_to(ROOT)),
        "model": "configs/gpt2/tiny.yaml",
        "first_fit_s": first_s,
        "resumed_fit_s": resume_s,
        "last_ckpt": str(last_ckpt.relative_to(run)),
        "checkpoint_is_directory": last_ckpt.is_dir(),
        "checkpoint_mib": size / 2**20,
        "resumed_at_step": resumed_at,
        "finished_at_step": finished_at,
    }


def run_deepspeed(ctx: Context, stage: int) -> dict[str, Any]:
    """ZeRO `stage` fit + resume, then the fp32 conversion of its last checkpoint loaded into the module."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from lightning_modules.gpt import GPTLightningModule

    figures = fit_and_resume(ctx, CONFIGS / "trainer" / f"deepspeed_stage{stage}.yaml")
    last = ctx.workdir / f"fit_deepspeed_stage{stage}" / figures["last_ckpt"]
    single = ctx.workdir / f"zero{stage}_fp32.ckpt"
    started = time.perf_counter()
    convert_zero_checkpoint_to_fp32_state_dict(str(last), str(single))
    module = GPTLightningModule.load_from_checkpoint(single, map_location="cpu")
    out = module.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=4, temperature=0)
    if out.shape != (1, 5):
        raise RuntimeError(f"the converted model generated shape {tuple(out.shape)}, expected (1, 5)")
    finite = all(torch.isfinite(p).all() for p in module.parameters())
    if not finite:
        raise RuntimeError("the fp32 conversion holds non-finite weights")
    figures.update(
        conversion_s=time.perf_counter() - started,
        fp32_ckpt_mib=single.stat().st_size / 2**20,
        goal_met=True,
        headline=f"resumed at {figures['resumed_at_step']}, finished at {figures['finished_at_step']}; fp32 loads",
    )
    return figures


def run_fsdp(ctx: Context) -> dict[str, Any]:
    """FSDP (sharded checkpoints) fit, checkpoint and resume."""
    figures = fit_and_resume(ctx, CONFIGS / "trainer" / "fsdp.yaml")
    figures.update(
        goal_met=True,
        headline=f"resumed at {figures['resumed_at_step']}, finished at {figures['finished_at_step']}",
    )
    return figures


def _script(name: str, *args: str, timeout: float = 600) -> None:
    """Run benchmarks/<name>.py ARGS; RuntimeError with the tail of its output on failure."""
    _run_python(ROOT / "benchmarks" / f"{name}.py", args, timeout)


def run_spd_speed(ctx: Context) -> dict[str, Any]:
    """benchmarks/spd_speed.py on the device: step ms and peak memory of ours and the naive reference."""
    out = ctx.workdir / "spd_speed.json"
    args = ["--device", ctx.device.type, "--rounds", "1", "--out", str(out)]
    if ctx.dry_run:
        args += ["--configs", "tms_5-2", "--steps", "2", "--warmup", "1"]
    else:  # both configs (TMS 5-2 and the tiny LM)
        args += ["--steps", "10", "--warmup", "3"]
    _script("spd_speed", *args)
    res = json.loads(out.read_text())["results"]
    rows = {
        name: {
            impl: {"step_ms": row[impl]["step_ms"], "peak_mib": row[impl]["peak_mib"]}
            for impl in ("naive", "ours", "ours_compile")
            if impl in row
        }
        | {"speedup": row["speedup"], "max_loss_rel_diff": max(row["loss_rel_diff"].values())}
        for name, row in res["configs"].items()
    }
    return {
        "steps": res["steps"],
        "configs": rows,
        "goal_met": None,
        "headline": ", ".join(f"{n} {r['speedup']:.2f}x vs naive" for n, r in rows.items()),
    }


def run_checkpoint_stall(ctx: Context) -> dict[str, Any]:
    """benchmarks/checkpoint_stall.py on the device: the stall of each checkpoint IO, one round."""
    out, where = ctx.workdir / "checkpoint_stall.json", ctx.workdir / "stall"
    where.mkdir(parents=True, exist_ok=True)
    args = ["--device", ctx.device.type, "--rounds", "1", "--write_repeats", "1", "--every", "4"]
    # --fsync_dirs given as text: without it the script keys its JSON by a Path, which json cannot write
    args += ["--dir", str(where), "--fsync_dirs", str(where), "--json", str(out)]
    if ctx.dry_run:
        args += ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--vocab", "512", "--seq", "16"]
        args += ["--batch", "2", "--steps", "8"]
    else:
        args += ["--precision", "bf16-mixed", "--steps", "12"]
    _script("checkpoint_stall", *args)
    res = json.loads(out.read_text())["results"]
    stall = {
        name: {k: row[k] for k in ("stall_s", "save_step_s", "plain_step_s", "ckpt_mb")}
        for name, row in res["stall"].items()
    }
    ours = stall.get("ours AsyncAtomicCheckpointIO", {}).get("stall_s")
    sync = stall.get("lightning TorchCheckpointIO (sync)", {}).get("stall_s")
    head = f"async atomic stall {ours:.3f} s vs Lightning sync {sync:.3f} s" if ours is not None else ""
    return {"stall": stall, "goal_met": None, "headline": head}


def compare_backends(ctx: Context, backend: str, reference: str = "sdpa", steps: int = 10) -> dict[str, Any]:
    """A 4-layer d12-wide GPT with attn_backend `backend` vs `reference`, same weights and batch, bf16 autocast
    on CUDA: the first loss of each (must agree within 2e-2) and fwd+bwd tokens/s (median after 2 warm-ups)."""
    import torch.nn.functional as F

    from lightning_modules.gpt import GPT

    config, _, _ = gpt_setup(ctx, "d12")
    config = dataclasses.replace(config, n_layer=min(4, config.n_layer))
    batch, device = (2 if ctx.dry_run else 8), ctx.device
    torch.manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), device=device)
    models = {}
    for name in (reference, backend):
        torch.manual_seed(0)
        models[name] = GPT(dataclasses.replace(config, attn_backend=name)).to(device)

    def step(model: torch.nn.Module) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        return loss.item()

    losses = {name: step(m) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():  # interleaved
            sync(device)
            t0 = time.perf_counter()
            step(model)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    tps = {name: batch * config.block_size / statistics.median(t[2:]) for name, t in times.items()}
    diff = abs(losses[backend] - losses[reference])
    if diff > 2e-2:
        raise RuntimeError(f"{backend} loss {losses[backend]:.4f} vs {reference} {losses[reference]:.4f}")
    ratio = tps[backend] / tps[reference]
    return {
        "n_layer": config.n_layer,
        "batch": batch,
        "block_size": config.block_size,
        "losses": losses,
        "loss_abs_diff": diff,
        "tokens_per_s": tps,
        "speedup_vs_reference": ratio,
        "goal_met": None,
        "headline": f"loss diff {diff:.1e}, {ratio:.2f}x {reference} tokens/s",
    }


def run_flash_attn(ctx: Context) -> dict[str, Any]:
    """attn_backend flash_attn (the flash-attn package) against PyTorch's sdpa."""
    return compare_backends(ctx, "flash_attn")


def run_bnb_npt(ctx: Context) -> dict[str, Any]:
    """configs/npt/llama.yaml on a saved tiny Llama loaded in 8 bits (load_in_8bit), a few steps via train.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = read_yaml(CONFIGS / "npt" / "llama.yaml")
    target = ctx.workdir / "llama_tiny"
    fields = {**cfg["model"]["init_args"]["target_config"], "vocab_size": 4096}
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(target)
    steps = 4
    out = train_py(
        ctx.workdir / "bnb_npt",
        "fit",
        "--config",
        str(CONFIGS / "npt" / "llama.yaml"),
        f"--model.init_args.target_path={target}",
        "--model.init_args.load_in_8bit=true",
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        "--trainer.precision=bf16-mixed",
        "--trainer.accumulate_grad_batches=1",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.warmup_steps=2",
        *data_args(ctx, 128, 2),
    )
    finished = _step(r"run (?:finished|stopped) at step (\d+)", out)
    if finished != steps:
        raise RuntimeError(f"expected the 8-bit NPT fit to finish at step {steps}; it said {finished}")
    return {
        "target": fields,
        "steps": finished,
        "goal_met": None,
        "headline": f"8-bit fit finished at {finished}",
    }


def run_pytest_gpu(ctx: Context) -> dict[str, Any]:
    """tests/test_gpu.py (skipped test by test without CUDA); counts of passed / failed / skipped."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfEs",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    print(done.stdout[-6000:], flush=True)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", done.stdout)}
    if done.returncode != 0:
        raise RuntimeError(f"pytest exited {done.returncode} ({counts}):\n{done.stdout[-3000:]}")
    return {
        "counts": counts,
        "goal_met": None if ctx.dry_run else counts.get("passed", 0) > 0 and not counts.get("failed"),
        "headline": ", ".join(f"{n} {w}" for w, n in counts.items()),
    }


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "d12_mfu": run_d12_mfu,
    "d12_fast_vs_d12": run_d12_fast_vs_d12,
    "npt_layer": run_npt_layer,
    "deepspeed_stage2": lambda ctx: run_deepspeed(ctx, 2),
    "deepspeed_stage3": lambda ctx: run_deepspeed(ctx, 3),
    "fsdp": run_fsdp,
    "spd_speed": run_spd_speed,
    "checkpoint_stall": run_checkpoint_stall,
    "flash_attn": run_flash_attn,
    "bnb_npt": run_bnb_npt,
    "pytest_gpu": run_pytest_gpu,
}


def child_main(name: str, ctx: Context, inject: str | None) -> None:
    """Run one check in this (child) process and write its figures to <workdir>/<name>.result.json."""
    if inject == "fail":
        raise RuntimeError(f"injected failure in {name}")
    if inject == "timeout":
        time.sleep(3600)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    figures = RUNNERS[name](ctx)
    (ctx.workdir / f"{name}.result.json").write_text(json.dumps(figures, indent=2, default=str))


# ================================================================================== the suite (the parent)
def write_tokens(path: Path, n: int = 400_000) -> Path:
    """A nanoGPT-style .bin of random uint16 tokens below 256 (tokenizer 'bytes'): data without a download."""
    import numpy as np

    rng = np.random.default_rng(0)
    rng.integers(0, 256, size=n, dtype=np.uint16).tofile(path)
    return path


def ensure_packages(wheels: Path, site: Path) -> tuple[dict[str, str], list[str]]:
    """Install each missing INSTALLABLE package from `wheels` offline; returns {module: what happened} and the
    extra import paths (a --target folder, when the interpreter's site-packages cannot be written)."""
    status: dict[str, str] = {}
    extra: list[str] = []
    for module, requirement in INSTALLABLE.items():
        if importlib.util.find_spec(module) is not None:
            status[module] = "present"
            continue
        if not wheels.is_dir():
            status[module] = f"missing (no wheels folder {wheels})"
            continue
        base = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
        done = subprocess.run([*base, requirement], capture_output=True, text=True)
        how = "installed from the wheels folder"
        if done.returncode != 0:  # e.g. a read-only site-packages: install beside the suite instead
            done = subprocess.run([*base, "--target", str(site), requirement], capture_output=True, text=True)
            how = f"installed from the wheels folder into {site}"
            if done.returncode == 0 and str(site) not in sys.path:
                sys.path.insert(0, str(site))
                extra.append(str(site))
        importlib.invalidate_caches()
        ok = done.returncode == 0 and importlib.util.find_spec(module) is not None
        status[module] = how if ok else f"install failed: {(done.stderr or done.stdout).strip()[-400:]}"
        print(f"{module}: {status[module]}", flush=True)
    return status, extra


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the checks depend on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def skip_reason(check: Check, dry_run: bool, selected: set[str] | None) -> str | None:
    """Why `check` does not run here (None: it runs)."""
    if selected is not None and check.name not in selected:
        return "not selected (--only)"
    if check.needs_cuda and dry_run:
        return "needs CUDA (dry run on CPU)"
    if check.needs_cuda and not torch.cuda.is_available():
        return "needs CUDA; none is visible"
    for module in check.needs:
        if importlib.util.find_spec(module) is None:
            how = NOT_OFFLINE.get(module, f"{INSTALLABLE.get(module, module)} (not in the wheels folder)")
            return f"the {module} package is missing: install {how}"
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    """End the check's process group (its own subprocesses too): SIGTERM, then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, chars: int = 2500) -> str:
    """The last `chars` characters of a log file."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_check(
    check: Check, limit: float, args: argparse.Namespace, workdir: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Run one check in a subprocess with a time limit; its record (status, seconds, figures or error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--workdir", str(workdir)]
    cmd += ["--dry-run"] if args.dry_run else []
    inject = args.inject.get(check.name)
    cmd += ["--inject", f"{check.name}={inject}"] if inject else []
    log = workdir / f"{check.name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        except BaseException:
            _kill_group(proc)
            raise
    seconds = time.perf_counter() - started
    result = workdir / f"{check.name}.result.json"
    record: dict[str, Any] = {"seconds": round(seconds, 1), "limit_s": limit}
    if rc is None:
        record.update(status="timeout", error=f"no result within {limit:.0f} s\n{tail(log)}")
    elif rc != 0 or not result.exists():
        record.update(status="failed", error=f"exit {rc}\n{tail(log)}")
    else:
        figures = json.loads(result.read_text())
        record.update(status="ok", goal_met=figures.pop("goal_met", None), figures=figures)
    return record


def append_log(path: Path, name: str, log: Path, record: dict[str, Any], chars: int = 200_000) -> None:
    """Append one check's status and the last `chars` characters of its output to the suite's log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"\n===== {name}: {record['status']} {record.get('reason', '')}\n")
        f.write(tail(log, chars))


def summary_table(results: dict[str, Any]) -> list[str]:
    """The suite's results as a markdown table: check, status, seconds, goal, met, what it measured."""
    lines = ["| check | status | s | goal | met | result |", "|---|---|---:|---|---|---|"]
    for name, rec in results["checks"].items():
        met = {True: "yes", False: "no", None: "-"}[rec.get("goal_met")]
        if rec["status"] == "ok":
            note = rec["figures"].get("headline", "")
        elif rec["status"] == "skipped":
            note = rec["reason"]
        else:
            error = [ln.strip() for ln in rec["error"].splitlines() if ln.strip()]
            note = error[-1][:120].replace("|", "/")  # the exception's message, usually
        seconds = f"{rec['seconds']:.0f}" if rec.get("seconds") is not None else "-"
        lines.append(f"| {name} | {rec['status']} | {seconds} | {rec.get('goal') or '-'} | {met} | {note} |")
    return lines


def parse_pairs(items: list[str], what: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    """NAME=VALUE items into {NAME: convert(VALUE)}, NAME a known check."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in BY_NAME:
            raise SystemExit(f"{what} {item!r}: expected NAME=VALUE with NAME one of {list(BY_NAME)}")
        out[name] = convert(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, CUDA checks skipped")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/gpu_suite.json; "
                   "dry run: a temporary file)")  # fmt: skip
    p.add_argument("--only", nargs="+", choices=list(BY_NAME), default=None, help="run these checks only")
    p.add_argument("--limit", nargs="*", default=[], metavar="NAME=S", help="override a check's time limit")
    p.add_argument(
        "--budget", type=float, default=None, help=f"seconds for all checks (GPU {SUITE_BUDGET_S:.0f})"
    )
    p.add_argument(
        "--wheels", default=DEFAULT_WHEELS, help="offline wheels folder (relative to the repo root)"
    )
    p.add_argument("--no-install", action="store_true", help="never pip install (missing packages: skipped)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the checks' files and logs here")
    p.add_argument("--log", type=Path, default=None, help="also write every check's output to this one file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one check
    p.add_argument("--inject", nargs="*", default=[], help=argparse.SUPPRESS)  # tests: NAME=fail|timeout
    args = p.parse_args(argv)
    args.limit = parse_pairs(args.limit, "--limit", float)
    args.inject = parse_pairs(args.inject, "--inject", str)
    if any(v not in ("fail", "timeout") for v in args.inject.values()):
        raise SystemExit("--inject values: fail or timeout")
    return args


def default_out(args: argparse.Namespace) -> Path:
    """Where the JSON goes: --out, the committed results file, or (dry run) a temporary file."""
    committed = RESULTS_DIR / "gpu_suite.json"
    if args.dry_run:
        if args.out is not None and args.out.resolve() == committed.resolve():
            raise SystemExit(f"--dry-run never writes {committed}: give another --out")
        if args.out is None:
            fd, name = tempfile.mkstemp(prefix="gpu_suite_dry_run_", suffix=".json")
            os.close(fd)
            return Path(name)
    return args.out or committed


def suite_main(args: argparse.Namespace) -> int:
    """Run every check, write the JSON after each one, print the summary table; 1 if any failed."""
    suite_start = time.perf_counter()  # the budget counts the offline install too
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run on a GPU machine, or use --dry-run on CPU")
    out = default_out(args)
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else SUITE_BUDGET_S)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    workdir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata()
    wheels = Path(args.wheels) if Path(args.wheels).is_absolute() else ROOT / args.wheels
    packages, extra_paths = (
        ({m: "present" if importlib.util.find_spec(m) else "missing" for m in INSTALLABLE}, [])
        if args.no_install or args.dry_run
        else ensure_packages(wheels, workdir / "site")
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *extra_paths, *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU plumbing, also on a GPU machine
    write_tokens(workdir / "tokens.bin")
    results: dict[str, Any] = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "device": meta.get("gpu") if not args.dry_run else meta["cpu"],
        "budget_s": budget,
        "packages": packages,
        "versions": versions(),
        "checks": {},
    }
    selected = set(args.only) if args.only else None
    for check in CHECKS:
        record: dict[str, Any] = {"what": check.what, "goal": check.goal}
        left = budget - (time.perf_counter() - suite_start)
        reason = None if check.name in args.inject else skip_reason(check, args.dry_run, selected)
        if reason is None and left < MIN_START_S:
            reason = f"the suite's budget ({budget:.0f} s) was spent"
        if reason is not None:
            record.update(status="skipped", reason=reason, seconds=None)
        else:
            limit = min(
                args.limit.get(check.name, check.dry_limit_s if args.dry_run else check.limit_s), left
            )
            print(
                f"[{time.perf_counter() - suite_start:5.0f} s] {check.name} (limit {limit:.0f} s) ...",
                flush=True,
            )
            record.update(run_check(check, limit, args, workdir, env))
            if record["status"] != "ok":
                print(f"{check.name} {record['status']}:\n{record['error'][-1500:]}", flush=True)
        print(f"{check.name}: {record['status']} {record.get('figures', {}).get('headline', '')}", flush=True)
        results["checks"][check.name] = record
        if args.log is not None:
            append_log(args.log, check.name, workdir / f"{check.name}.log", record)
        results["total_s"] = round(time.perf_counter() - suite_start, 1)
        write_results("gpu_suite", meta, results, out=out)
    print("\n" + "\n".join(summary_table(results)))
    kept = f"; files and logs: {workdir}" if args.workdir is not None else ""
    print(f"\ntotal {results['total_s']:.0f} s; JSON: {out}{kept}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return int(any(r["status"] in ("failed", "timeout") for r in results["checks"].values()))


def main(argv: list[str] | None = None) -> int:
    """The suite, or (internal) one check in a child process."""
    args = parse_args(argv)
    if args.child:
        workdir = args.workdir
        child_main(
            args.child, Context(args.dry_run, workdir, workdir / "tokens.bin"), args.inject.get(args.child)
        )
        return 0
    return suite_main(args)


if __name__ == "__main__":
    sys.exit(main())
