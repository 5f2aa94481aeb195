"""How long a checkpoint stalls training, and what its write costs on disk: ours (atomic sync, atomic
async) vs Lightning's built-ins (TorchCheckpointIO, AsyncCheckpointIO), side by side, interleaved, medians.

Part 1, the stall: (time of a step that saves a checkpoint) - (median time of a step that doesn't), under a
real Trainer with ModelCheckpoint(every_n_train_steps=k), checkpoints written under --dir.

Part 2, the write itself, for the same checkpoint on each of --fsync_dirs (its filesystem type recorded):
wall time and peak-RSS growth of one save by each writer, and our atomic write split into its steps
(serialise + write, fsync of the file, rename, fsync of the directory), so the cost of durability is
measured rather than assumed. Lightning's writer stages its temporary file in $TMPDIR; whether that is the
checkpoint's filesystem (a rename) or another one (a copy onto the final name) is recorded too.

    python benchmarks/checkpoint_stall.py                       # CPU, a ~40M-parameter GPT
    python benchmarks/checkpoint_stall.py --n_layer 4 --n_head 4 --n_embd 256 --vocab 8192 \
        --fsync_dirs /tmp /dev/shm
    python benchmarks/checkpoint_stall.py --device cuda --n_layer 12 --n_embd 768
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/checkpoint_stall.py

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.proc_memory import proc_status_bytes, reset_peak_rss  # noqa: E402
from benchmarks.results import run_metadata, write_results  # noqa: E402
from callbacks import AsyncAtomicCheckpointIO, AtomicCheckpointIO  # noqa: E402
from callbacks.checkpoint_io import _fsync_dir  # noqa: E402
from lightning_modules.gpt import GPTConfig, GPTLightningModule  # noqa: E402

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


def build_module(args: argparse.Namespace) -> GPTLightningModule:
    """The benchmark's GPT (sizes from the command line), AdamW at a small LR."""
    config = GPTConfig(
        block_size=args.seq,
        vocab_size=args.vocab,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    return GPTLightningModule(config, optimizer=partial(torch.optim.AdamW, lr=1e-4), sample_tokens=0)


def run_once(plugin_name: str, args, batches: list, checkpoint_every: int) -> dict[str, Any]:
    """One fit with checkpoints every `checkpoint_every` steps through one plugin: step times and stall."""
    module = build_module(args)
    timer = GapTimer()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
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


def filesystem_of(path: Path) -> dict[str, str]:
    """Mount point, device and type of the filesystem holding `path` (Linux /proc/mounts)."""
    path = path.resolve()
    best = {"mount": "/", "device": "?", "type": "?"}
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        device, mount, fstype = line.split()[:3]
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best["mount"]):
            best = {"mount": mount, "device": device, "type": fstype}
    return best


def a_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """A checkpoint-shaped dict of the benchmark's model: weights plus AdamW state after one step."""
    module = build_module(args)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    module.loss(module(x), x).backward()
    opt.step()
    return {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def steps_of_atomic_write(checkpoint: dict[str, Any], path: Path) -> dict[str, float]:
    """Our atomic write step by step (as callbacks.checkpoint_io.atomic_torch_save does it), each timed."""
    tmp = path.with_name(f".{path.name}.bench.tmp")
    out: dict[str, float] = {}
    with open(tmp, "wb") as f:
        out["write_s"] = _timed(lambda: (torch.save(checkpoint, f), f.flush()))
        out["fsync_s"] = _timed(lambda: os.fsync(f.fileno()))
    out["rename_s"] = _timed(lambda: os.replace(tmp, path))
    out["dir_fsync_s"] = _timed(lambda: _fsync_dir(path.parent))
    return out


def _save_no_fsync(checkpoint: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.bench.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


WRITERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "torch.save in place (no temporary, no fsync)": lambda c, p: torch.save(c, p),
    "temporary + rename, no fsync": _save_no_fsync,
    "ours AtomicCheckpointIO (temporary beside the target + fsync + rename + directory fsync)": (
        lambda c, p: AtomicCheckpointIO().save_checkpoint(c, p)
    ),
    "lightning TorchCheckpointIO (in-memory buffer, fsspec transaction: temporary in $TMPDIR, move)": (
        lambda c, p: TorchCheckpointIO().save_checkpoint(c, p)
    ),
}


def write_costs(checkpoint: dict[str, Any], directory: Path, repeats: int) -> dict[str, Any]:
    """Median wall time and peak-RSS growth of one save per writer, and our write's steps, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        target = Path(tmp) / "bench.ckpt"
        times: dict[str, list[float]] = {name: [] for name in WRITERS}
        peaks: dict[str, list[float]] = {name: [] for name in WRITERS}
        steps: list[dict[str, float]] = []
        for _ in range(repeats):  # interleaved
            for name, writer in WRITERS.items():
                base = reset_peak_rss()
                times[name].append(_timed(lambda w=writer: w(checkpoint, target)))
                peaks[name].append((proc_status_bytes("VmHWM") - base) / 2**20)
            steps.append(steps_of_atomic_write(checkpoint, target))
        size_mb = target.stat().st_size / 2**20
    return {
        "directory": str(directory),
        "filesystem": filesystem_of(directory),
        "tmpdir": str(tmpdir),
        "tmpdir_filesystem": filesystem_of(tmpdir),
        "tmpdir_same_filesystem": os.stat(directory).st_dev == os.stat(tmpdir).st_dev,
        "ckpt_mb": size_mb,
        "repeats": repeats,
        "writers": {
            name: {
                "save_s": statistics.median(times[name]),
                "peak_rss_growth_mib": statistics.median(peaks[name]),
            }
            for name in WRITERS
        },
        "atomic_steps": {k: statistics.median(s[k] for s in steps) for k in steps[0]},
        "raw": {"save_s": times, "peak_rss_growth_mib": peaks, "atomic_steps": steps},
    }


def main() -> None:
    """Parse arguments, run both parts interleaved, print the tables and write JSON."""
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
    parser.add_argument("--dir", default=None, help="where part 1 writes checkpoints (default: $TMPDIR)")
    parser.add_argument(
        "--fsync_dirs", nargs="*", default=None, help="directories part 2 writes in (default: --dir)"
    )
    parser.add_argument("--write_repeats", type=int, default=5, help="saves per writer in part 2")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/checkpoint_stall.json")
    args = parser.parse_args()
    meta = run_metadata()
    stall_dir = Path(args.dir or tempfile.gettempdir())
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps, args.batch, args.seq + 1), generator=g)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in PLUGINS}
    for _ in range(args.rounds):
        for name in PLUGINS:  # interleaved
            results[name].append(run_once(name, args, batches, args.every))
    summary = {}
    base = None
    print(f"\npart 1: checkpoints in {stall_dir} ({filesystem_of(stall_dir)['type']})")
    print(
        "\n| checkpoint IO | step with save (s) | plain step (s) | stall (s) | stall vs Lightning sync | ckpt MiB |"
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
    checkpoint = a_checkpoint(args)
    writes = {
        str(d): write_costs(checkpoint, Path(d), args.write_repeats) for d in args.fsync_dirs or [stall_dir]
    }
    for directory, res in writes.items():
        print(
            f"\npart 2: one save of a {res['ckpt_mb']:.0f} MiB checkpoint in {directory} "
            f"({res['filesystem']['type']}); $TMPDIR {res['tmpdir']} "
            f"{'same' if res['tmpdir_same_filesystem'] else 'another'} filesystem"
        )
        print("| writer | save (s) | peak RSS growth (MiB) |\n|---|---|---|")
        for name, row in res["writers"].items():
            print(f"| {name} | {row['save_s']:.3f} | {row['peak_rss_growth_mib']:.0f} |")
        print("ours, step by step (s): " + ", ".join(f"{k} {v:.4f}" for k, v in res["atomic_steps"].items()))
    results_out = {
        "args": vars(args),
        "stall_dir": str(stall_dir),
        "stall_filesystem": filesystem_of(stall_dir),
        "threads": torch.get_num_threads(),
        "stall": summary,
        "stall_raw": results,
        "writes": writes,
    }
    write_results("checkpoint_stall", meta, results_out, out=args.json)


if __name__ == "__main__":
    main()
