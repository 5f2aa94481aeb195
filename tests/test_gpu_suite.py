"""benchmarks/gpu_suite.py's plumbing on CPU: the dry run records every check with a status, says why the CUDA
checks are skipped, and a check that fails or runs out of time is recorded while the rest still run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from benchmarks.results import RESULTS_DIR

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
CUDA_ONLY = ["deepspeed_stage2", "deepspeed_stage3", "fsdp", "flash_attn", "bnb_npt"]


def dry_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the suite's dry run in a subprocess; (the process, the results of its JSON)."""
    committed = RESULTS_DIR / "gpu_suite.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    out = tmp_path / "suite.json"
    cmd = [sys.executable, str(SUITE), "--dry-run", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert after == before  # a dry run never writes the committed results
    payload = json.loads(out.read_text())
    assert payload["meta"]["command"].startswith("python benchmarks/gpu_suite.py --dry-run")
    results = payload["results"]
    assert results["mode"] == "dry-run"
    assert list(results["checks"]) == [c.name for c in gpu_suite.CHECKS]  # every check, in order
    for name, rec in results["checks"].items():
        assert rec["status"] in ("ok", "failed", "timeout", "skipped"), (name, rec)
        assert f"| {name} | {rec['status']} |" in done.stdout  # the summary table
    for name in CUDA_ONLY:
        assert results["checks"][name]["reason"] == "needs CUDA (dry run on CPU)"
    return done, results["checks"]


def assert_ran(checks: dict, names: list[str]) -> None:
    """Each named check ran to the end on CPU, with figures and no goal judged (tiny shapes)."""
    for name in names:
        rec = checks[name]
        assert rec["status"] == "ok", (name, rec.get("error", "")[-2000:])
        assert rec["figures"]["headline"] and rec["goal_met"] is None
    if "d12_mfu" in names:
        mfu = checks["d12_mfu"]["figures"]
        assert mfu["tokens_per_s"] > 0 and mfu["flops_per_micro_batch"] > 0
        assert mfu["mfu"] is None  # no peak FLOP/s for a CPU
    if "pytest_gpu" in names:
        assert checks["pytest_gpu"]["figures"]["counts"].get("skipped", 0) >= 1  # no CUDA: every test skips


def test_dry_run_records_every_check_and_survives_a_failure_and_a_timeout(tmp_path):
    # the two slowest CPU checks stand in for a crash and a hang (the full dry run: the slow test below)
    log = tmp_path / "suite.log"
    done, checks = dry_run(
        tmp_path,
        *["--inject", "spd_speed=fail", "checkpoint_stall=timeout", "--limit", "checkpoint_stall=3"],
        *["--log", str(log)],
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # a check failed, not the suite
    failed = checks["spd_speed"]
    assert failed["status"] == "failed" and "injected failure in spd_speed" in failed["error"]
    timed_out = checks["checkpoint_stall"]
    assert timed_out["status"] == "timeout" and 3 <= timed_out["seconds"] < 30, timed_out
    text = log.read_text()  # every check's output in one file
    assert "===== spd_speed: failed" in text and "RuntimeError: injected failure in spd_speed" in text
    assert "===== deepspeed_stage2: skipped needs CUDA" in text and "===== pytest_gpu: ok" in text
    # before the failure, between it and the timeout, and after both
    assert_ran(checks, ["d12_mfu", "d12_fast_vs_d12", "npt_layer", "pytest_gpu"])


@pytest.mark.slow
def test_whole_dry_run_passes_on_cpu(tmp_path):
    done, checks = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_ran(
        checks, ["d12_mfu", "d12_fast_vs_d12", "npt_layer", "spd_speed", "checkpoint_stall", "pytest_gpu"]
    )
    assert checks["npt_layer"]["figures"]["teacher_forced_vs_frozen_bwd"] > 0
    assert checks["spd_speed"]["figures"]["configs"]["tms_5-2"]["max_loss_rel_diff"] < 1e-4


def test_dry_run_defaults_to_a_temporary_file_and_refuses_the_committed_one(tmp_path):
    args = gpu_suite.parse_args(["--dry-run"])
    out = gpu_suite.default_out(args)
    try:
        assert out.parent != RESULTS_DIR and out.name.startswith("gpu_suite_dry_run_")
    finally:
        out.unlink()
    with pytest.raises(SystemExit, match="never writes"):
        gpu_suite.default_out(
            gpu_suite.parse_args(["--dry-run", "--out", str(RESULTS_DIR / "gpu_suite.json")])
        )
    assert gpu_suite.default_out(gpu_suite.parse_args([])) == RESULTS_DIR / "gpu_suite.json"


def test_bad_check_names_and_injections_are_refused():
    with pytest.raises(SystemExit, match="NAME one of"):
        gpu_suite.parse_args(["--limit", "nope=3"])
    with pytest.raises(SystemExit, match="fail or timeout"):
        gpu_suite.parse_args(["--inject", "fsdp=crash"])
    assert gpu_suite.parse_args(["--limit", "fsdp=7"]).limit == {"fsdp": 7.0}


def test_a_missing_package_is_skipped_with_how_to_get_it(monkeypatch):
    real = gpu_suite.importlib.util.find_spec
    monkeypatch.setattr(
        gpu_suite.importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real(name)
    )
    monkeypatch.setattr(gpu_suite.torch.cuda, "is_available", lambda: True)
    reason = gpu_suite.skip_reason(gpu_suite.BY_NAME["deepspeed_stage2"], dry_run=False, selected=None)
    assert reason == "the deepspeed package is missing: install deepspeed (not in the wheels folder)"
    assert gpu_suite.skip_reason(gpu_suite.BY_NAME["fsdp"], dry_run=False, selected={"d12_mfu"}) == (
        "not selected (--only)"
    )
    flash = gpu_suite.skip_reason(gpu_suite.BY_NAME["flash_attn"], dry_run=False, selected=None)
    assert flash is None or "flash-attn" in flash


def test_offline_install_without_a_wheels_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "INSTALLABLE", {"surely_not_a_module_xyz": "surely-not-a-module-xyz"})
    status, extra = gpu_suite.ensure_packages(tmp_path / "no_wheels", tmp_path / "site")
    assert status == {"surely_not_a_module_xyz": f"missing (no wheels folder {tmp_path / 'no_wheels'})"}
    assert extra == []
