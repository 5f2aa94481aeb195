"""The README's main job, measured: `python train.py fit --config configs/gpt2/tiny.yaml` run in a fresh
temporary directory (so the BPE tokenizer and the token cache are built, as on a first run), then its
TensorBoard events, resolved config and last checkpoint are read back into benchmarks/results/main_job.json.

    python benchmarks/main_job.py                                  # about 5-10 minutes on 2 CPU cores
    python -m benchmarks.main_job --out /tmp/smoke.json --trainer.max_steps 20 --trainer.val_check_interval 10

Arguments the script does not know are passed to train.py as overrides. Recorded: wall time from command
to exit, median step time and tokens/s (from the wall-clock stamps of the train/loss events), val/loss and
val/ppl at every validation, the two reference losses (the unigram entropy of the validation tokens, i.e.
a model that ignores context, and ln(vocab), a uniform guess) and the parameter counts.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/main_job.py

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.results import REPO_ROOT, run_metadata, write_results  # noqa: E402

CONFIG = "configs/gpt2/tiny.yaml"


def run_job(workdir: Path, overrides: list[str]) -> tuple[float, Path]:
    """Run train.py in `workdir` (its lightning_logs/ and data_cache/ land there); returns (wall s, log)."""
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "fit",
        "--config",
        str(REPO_ROOT / CONFIG),
        *overrides,
    ]
    log_path = workdir / "train.log"
    print("running:", " ".join(cmd), f"(in {workdir}, output in {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"train.py exited with {done.returncode}:\n{tail}")
    return wall, log_path


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar tag of the run's TensorBoard events as [(step, value, wall_time)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def median_step_seconds(
    events: list[tuple[int, float, float]], validation_steps: list[int]
) -> tuple[float, bool]:
    """Median wall seconds per optimizer step between consecutive logged steps, leaving out the intervals
    that contain a validation (it runs right after the step it is stamped with); the flag is False when
    every interval held one (short runs validating as often as they log), so none could be left out."""
    intervals = [
        ((t1 - t0) / (s1 - s0), any(s0 <= v < s1 for v in validation_steps))
        for (s0, _, t0), (s1, _, t1) in zip(events, events[1:], strict=False)
        if s1 > s0
    ]
    if not intervals:
        raise ValueError("fewer than two logged training steps: cannot time a step")
    clean = [seconds for seconds, validated in intervals if not validated]
    return statistics.median(clean or [seconds for seconds, _ in intervals]), bool(clean)


def data_statistics(data_args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Vocabulary, split sizes and the validation split's unigram entropy, from the run's token cache."""
    from datamodules import TextDataModule

    args = dict(data_args)
    cache = Path(args.get("cache_dir") or "data_cache")
    args["cache_dir"] = str(cache if cache.is_absolute() else workdir / cache)
    dm = TextDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return {
        "vocab_size": dm.vocab_size,
        "train_tokens": len(dm.train_dataset.tokens),
        "val_tokens": len(dm.val_dataset.tokens),
        "unigram_entropy_val": dm.unigram_entropy("val"),
        "ln_vocab": math.log(dm.vocab_size),
        "cache_reused": dm.cache_hit,
    }


def parameter_counts(checkpoint: Path) -> dict[str, int]:
    """Parameters of the trained model (tied embeddings counted once) and of its embedding tables."""
    from lightning_modules.gpt import GPT, GPTConfig

    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**hparams["config"]))
    total = model.num_parameters(include_embeddings=True)
    return {"total": total, "embedding": total - model.num_parameters(include_embeddings=False)}


def summarise(workdir: Path, wall: float) -> dict[str, Any]:
    """Read the finished run in `workdir` into the results dict."""
    runs = sorted((workdir / "lightning_logs").glob("version_*"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one run under {workdir / 'lightning_logs'}, found {runs}")
    run_dir = runs[0]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data_args = config["data"]["init_args"]
    trainer = config["trainer"]
    scalars = read_scalars(run_dir)
    val_steps = [step for step, _, _ in scalars.get("val/loss", [])]
    step_s, without_validation = median_step_seconds(scalars["train/loss"], val_steps)
    tokens_per_step = (
        data_args["batch_size"] * data_args["block_size"] * (trainer.get("accumulate_grad_batches") or 1)
    )
    ppl = {step: value for step, value, _ in scalars.get("val/ppl", [])}
    validations = [
        # Lightning stamps metrics with the 0-based index of the last optimizer step: +1 is steps done
        {"step": step + 1, "val_loss": value, "val_ppl": ppl.get(step, math.exp(value))}
        for step, value, _ in scalars.get("val/loss", [])
    ]
    samples = run_dir / "samples.txt"
    last_sample = samples.read_text().rsplit("=== step", 1)[-1] if samples.exists() else None
    return {
        "config": CONFIG,
        "wall_s": wall,
        "max_steps": trainer.get("max_steps"),
        "tokens_per_step": tokens_per_step,
        "median_step_s": step_s,
        "step_time_without_validation": without_validation,
        "tokens_per_s": tokens_per_step / step_s,
        "final_train_loss": scalars["train/loss"][-1][1],
        "validations": validations,
        "data": data_statistics(data_args, workdir),
        "parameters": parameter_counts(run_dir / "checkpoints" / "last.ckpt"),
        "last_sample": last_sample,
    }


def main() -> None:
    """Run the main job, read it back, print a summary and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="run here (kept) instead of a temporary dir"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/main_job.json")
    args, overrides = parser.parse_known_args()
    meta = run_metadata()
    with tempfile.TemporaryDirectory(prefix="main_job_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        wall, _ = run_job(workdir, overrides)
        results = summarise(workdir, wall)
    results["overrides"] = overrides
    results["fresh_workdir"] = args.workdir is None  # a first run: tokenizer and token cache built
    losses = " / ".join(f"{v['val_loss']:.2f}" for v in results["validations"])
    print(
        f"wall {wall:.0f} s, median step {results['median_step_s']:.3f} s "
        f"({results['tokens_per_s']:.0f} tokens/s), "
        f"val loss {losses}, unigram entropy {results['data']['unigram_entropy_val']:.2f}, "
        f"ln(vocab) {results['data']['ln_vocab']:.2f}"
    )
    write_results("main_job", meta, results, out=args.out)


if __name__ == "__main__":
    main()
