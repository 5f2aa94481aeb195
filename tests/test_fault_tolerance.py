"""Fault tests through train.py in subprocesses (tiny configs, CPU): NaN skipping (also under 2-process
DDP), kill -9 during async checkpointing, corrupted checkpoints, exact resume."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from callbacks.checkpoint_io import load_checkpoint_file
from tests.helpers.cli import FAST, ROOT, TINY, env, run_train, train_cmd, write_yaml
from tests.helpers.fault_injection import read_record, record_yaml

NAN_SKIP = ROOT / "configs" / "callbacks" / "nan_skip.yaml"
ASYNC = ROOT / "configs" / "callbacks" / "async_checkpoint.yaml"


def fault_yaml(tmp_path: Path, poison_steps: list[int], rank: int | None = None) -> Path:
    rank_line = "" if rank is None else f"\n        rank: {rank}"
    return write_yaml(
        tmp_path / "faults.yaml",
        f"""trainer:
  callbacks+:
    - class_path: tests.helpers.fault_injection.PoisonGradients
      init_args:
        steps: {poison_steps}{rank_line}
    - class_path: tests.helpers.fault_injection.RecordTraining
      init_args:
        out_dir: {tmp_path / "record"}
""",
    )


def test_nan_steps_are_skipped_through_train_py(tmp_path):
    faults = fault_yaml(tmp_path, [2, 4])
    run_train(
        tmp_path,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(NAN_SKIP),
        "--config",
        str(faults),
        *FAST,
        "--trainer.max_steps=8",
    )
    record = read_record(tmp_path / "record")
    assert record["finite"]
    checksums = record["checksums"]
    # The optimizer step at global step 2 (and 4) was skipped: weights after it equal those before it.
    assert checksums[3] == checksums[2] and checksums[5] == checksums[4]
    assert checksums[2] != checksums[1] and checksums[4] != checksums[3]  # other steps do train
    ckpt = load_checkpoint_file(
        next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("last.ckpt"))
    )
    skip_state = next(v for k, v in ckpt["callbacks"].items() if "SkipNonFiniteSteps" in k)
    assert skip_state["skipped_steps"] == 2


def test_ddp_nan_on_one_rank_skips_on_both_without_hanging(tmp_path):
    faults = fault_yaml(tmp_path, [3], rank=1)
    run_train(
        tmp_path,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(NAN_SKIP),
        "--config",
        str(faults),
        *FAST,
        "--trainer.max_steps=6",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        timeout=900,
    )
    rank0, rank1 = read_record(tmp_path / "record", 0), read_record(tmp_path / "record", 1)
    for record in (rank0, rank1):
        assert record["finite"]
        assert record["checksums"][4] == record["checksums"][3]  # both ranks skipped step 3
    assert rank0["checksums"] == rank1["checksums"]  # identical weights on both ranks throughout
    assert rank0["losses"] != rank1["losses"]  # and they did read different data


def test_kill_9_during_async_checkpointing_leaves_loadable_checkpoints(tmp_path):
    args = [
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(ASYNC),
        *FAST,
        "--trainer.max_steps=100000",
        "--trainer.limit_val_batches=0",
        "--checkpoint.monitor=step",
        "--checkpoint.mode=max",
        "--checkpoint.every_n_train_steps=1",
        "--checkpoint.save_top_k=2",
    ]
    proc = subprocess.Popen(
        train_cmd(*args),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt_dir = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpt_dir.glob("*.ckpt"))) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    time.sleep(1.5)  # let it write (and prune) a few more, then kill it mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    visible = sorted(ckpt_dir.glob("*.ckpt"))
    assert visible
    for path in visible:  # every visible checkpoint is complete
        state = load_checkpoint_file(path, weights_only=False)
        assert "state_dict" in state
    last = ckpt_dir / "last.ckpt"
    step = load_checkpoint_file(last)["global_step"]
    run_train(
        tmp_path,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(ASYNC),
        *FAST,
        f"--trainer.max_steps={step + 3}",
        "--trainer.limit_val_batches=0",
        *[a for a in args if a.startswith("--checkpoint.")],  # the same checkpoint settings as the run
        f"--ckpt_path={last}",
    )
    # the resumed fit continues in the run's own directory
    assert not (tmp_path / "lightning_logs" / "version_1").exists()
    assert load_checkpoint_file(last)["global_step"] == step + 3, sorted(p.name for p in ckpt_dir.iterdir())
    # A write cut off by the kill can only leave a hidden temporary, never a file named *.ckpt.
    leftovers = [p.name for p in ckpt_dir.iterdir() if not p.name.endswith(".ckpt")]
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    result = run_train(tmp_path, "fit", "--config", str(TINY), *FAST, f"--ckpt_path={broken}", check=False)
    assert result.returncode != 0
    assert "broken.ckpt" in result.stderr and "truncated or corrupted" in result.stderr
    assert "UnpicklingError" not in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, num_workers):
    """Dropout on and validation in between, so model, optimizer, schedule, data order and RNG all matter."""
    common = [
        "--config",
        str(TINY),
        *FAST,
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=4",
        f"--data.init_args.num_workers={num_workers}",
        "--model.init_args.config.resid_dropout=0.1",
        "--model.init_args.config.embd_dropout=0.1",
        "--checkpoint.every_n_train_steps=5",
        "--checkpoint.save_top_k=-1",
        "--checkpoint.monitor=null",
        "--checkpoint.filename=ckpt-{step}",
        "--model.init_args.lr_decay_steps=12",  # a real interruption keeps the 12-step schedule
    ]
    full = tmp_path / "full"
    part = tmp_path / "part"
    full.mkdir(), part.mkdir()

    run_train(full, "fit", *common, "--config", str(record_yaml(full)))
    # the same run, "interrupted" after step 5 (max_steps=5), then resumed from its step-5 checkpoint
    run_train(part, "fit", *common, "--config", str(record_yaml(part)), "--trainer.max_steps=5")
    ckpt = next((part / "lightning_logs" / "version_0" / "checkpoints").glob("ckpt-5.ckpt"))
    run_train(part, "fit", *common, "--config", str(record_yaml(part)), f"--ckpt_path={ckpt}")
    uninterrupted, resumed = read_record(full / "record"), read_record(part / "record")
    assert set(resumed["losses"]) == set(range(6, 13))  # the resumed process recorded steps 6..12
    for step in range(6, 13):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
        assert resumed["checksums"][step] == uninterrupted["checksums"][step], step
