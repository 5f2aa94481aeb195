"""Run train.py in a subprocess with the tiny config shrunk to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "gpt2" / "tiny.yaml"
# Shrink the main job to seconds: few steps, a small slice of the embedded corpus, a small BPE.
FAST = [
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.max_chars=150000",
    "--data.init_args.bpe_vocab_size=512",
    "--data.init_args.batch_size=4",
    "--data.init_args.block_size=32",
    "--data.init_args.num_workers=0",
    "--model.init_args.warmup_steps=2",
    "--model.init_args.sample_tokens=8",
]


def env() -> dict[str, str]:
    """Subprocess environment: offline, the project importable, one thread per process."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def run_train(cwd: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python train.py *args` in cwd; raise with its output when it fails and check is set."""
    result = subprocess.run(
        train_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env()
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
