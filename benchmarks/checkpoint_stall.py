"""How long a checkpoint stalls training: ours (atomic sync, atomic async) vs Lightning's built-ins
(TorchCheckpointIO, AsyncCheckpointIO), side by side in one run, interleaved, medians.

The stall is (time of a step that saves a checkpoint) - (median time of a step that doesn't), measured
under a real Trainer with ModelCheckpoint(every_n_train_steps=k).

    python benchmarks/checkpoint_stall.py                       # CPU, a ~40M-parameter GPT
    python benchmarks/checkpoint_stall.py --device cuda --n_layer 12 --n_embd 768
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from torch.utils.data import DataLoader

from callbacks import AsyncAtomicCheckpointIO, AtomicCheckpointIO
from lightning_modules.gpt import GPTConfig, GPTLightningModule

PLUGINS = {
    "lightning TorchCheckpointIO (sync)": lambda: TorchCheckpointIO(),
    "ours AtomicCheckpointIO (sync)": lambda: AtomicCheckpointIO(),
    "lightning AsyncCheckpointIO": lambda: AsyncCheckpointIO(),
    "ours AsyncAtomicCheckpointIO": lambda: AsyncAtomicCheckpointIO(),
}


class GapTimer(pl.Callback):
    """Wall time from one step's start to the next step's start (includes ModelCheckpoint's save)."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now


def run_once(plugin_name: str, args, batches: list, checkpoint_every: int) -> dict[str, Any]:
    config = GPTConfig(
        block_size=args.seq,
        vocab_size=args.vocab,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    module = GPTLightningModule(config, optimizer=partial(torch.optim.AdamW, lr=1e-4), sample_tokens=0)
    timer = GapTimer()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ModelCheckpoint(
            dirpath=tmp, every_n_train_steps=checkpoint_every, save_top_k=2, monitor="step", mode="max"
        )
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            max_steps=len(batches),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, ckpt],
            plugins=[PLUGINS[plugin_name]()],
            limit_val_batches=0,
            precision=args.precision,
        )
        start = time.perf_counter()
        trainer.fit(module, DataLoader(batches, batch_size=None))
        total = time.perf_counter() - start
        size_mb = max(p.stat().st_size for p in Path(tmp).glob("*.ckpt")) / 2**20
    # gap i runs from step i's start to step i+1's start; step i (0-based) saved when (i+1) % k == 0
    saving = [g for i, g in enumerate(timer.gaps) if (i + 1) % checkpoint_every == 0]
    plain = [g for i, g in enumerate(timer.gaps) if (i + 1) % checkpoint_every != 0 and i >= 2]
    return {
        "save_step_s": statistics.median(saving),
        "plain_step_s": statistics.median(plain),
        "stall_s": statistics.median(saving) - statistics.median(plain),
        "fit_s": total,
        "ckpt_mb": size_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--n_layer", type=int, default=8)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every k steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/checkpoint_stall.json")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps, args.batch, args.seq + 1), generator=g)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in PLUGINS}
    for _ in range(args.rounds):
        for name in PLUGINS:  # interleaved
            results[name].append(run_once(name, args, batches, args.every))
    summary = {}
    base = None
    print(
        "\n| checkpoint IO | step with save (s) | plain step (s) | stall (s) | stall vs Lightning sync | ckpt MB |"
    )
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        base = base or row["stall_s"]
        row["stall_vs_lightning_sync"] = row["stall_s"] / base if base > 0 else None
        summary[name] = row
        ratio = (
            f"{row['stall_vs_lightning_sync']:.2f}x" if row["stall_vs_lightning_sync"] is not None else "n/a"
        )
        print(
            f"| {name} | {row['save_step_s']:.3f} | {row['plain_step_s']:.3f} | {row['stall_s']:.3f} | {ratio} | "
            f"{row['ckpt_mb']:.0f} |"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "threads": torch.get_num_threads(),
                "args": vars(args),
                "results": summary,
                "raw": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
