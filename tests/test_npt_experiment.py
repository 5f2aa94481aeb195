"""benchmarks/npt_experiment.py: the variants' command lines, and (slow) the recipe's acceptance on the
trained tiny GPT."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.npt_experiment import MAX_PPL_INCREASE, MIN_RECOVERED, VARIANTS, command

ROOT = Path(__file__).resolve().parents[1]
# the main job's checkpoint (configs/gpt2/tiny.yaml, 1200 steps): NPT_TARGET_CKPT or the README's path
TARGET = Path(os.environ.get("NPT_TARGET_CKPT", ROOT / "lightning_logs/version_0/checkpoints/last.ckpt"))


def _args(**kw) -> argparse.Namespace:
    base = dict(target=Path("t.ckpt"), seed=3, np_seed=4, steps=10, threads=1, extra=[])
    return argparse.Namespace(**{**base, **kw})


def test_variant_command_lines(tmp_path) -> None:
    assert set(VARIANTS) == {"joint_quadratic", "joint_linear", "sequential_quadratic", "sequential_linear"}
    joint = command("joint_linear", _args(), tmp_path)
    assert joint[joint.index("--model.init_args.modulation") + 1] == "linear"
    assert "--model.init_args.steps_per_layer" not in joint
    seq = command("sequential_quadratic", _args(extra=["--trainer.limit_val_batches", "1"]), tmp_path)
    assert seq[seq.index("--model.init_args.steps_per_layer") + 1] == "5"  # 2 layers x 5 = 10 steps
    assert seq[seq.index("--seed_everything") + 1] == "3" and seq[-2:] == ["--trainer.limit_val_batches", "1"]


@pytest.mark.slow
@pytest.mark.result
@pytest.mark.skipif(not TARGET.is_file(), reason=f"no main-job checkpoint at {TARGET} (set NPT_TARGET_CKPT)")
def test_recipe_reaches_the_acceptance(tmp_path) -> None:
    """Joint quadratic on the trained tiny GPT: NPT ppl within 5% of the original, >= 80% recovered."""
    cmd = command("joint_quadratic", _args(target=TARGET, seed=2024, np_seed=7, steps=2000), tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "joint_quadratic").glob("lightning_logs/version_*/npt_results.json")
    res = json.loads(path.read_text())
    assert res["ppl_npt"] <= (1 + MAX_PPL_INCREASE) * res["ppl_original"], res
    assert res["recovered"] >= MIN_RECOVERED, res
    assert sys.executable in cmd  # the run used this interpreter
