"""benchmarks/spd_run_progress.py reads a stopped run's TensorBoard events: steps, step time, alive counts."""

from __future__ import annotations

import json

from torch.utils.tensorboard import SummaryWriter

from benchmarks import spd_run_progress


def write_events(run_dir, loss_points, alive_points) -> None:
    """train/loss at (step, wall time) and val/alive_components/m at (step, count), as Lightning stamps them."""
    writer = SummaryWriter(str(run_dir))
    for step, wall in loss_points:
        writer.add_scalar("train/loss", 1.0, step, walltime=wall)
    for step, count in alive_points:
        writer.add_scalar("val/alive_components/layers.0.mlp_in", count, step, walltime=0.0)
    writer.close()


def test_progress_of_a_stopped_run(tmp_path):
    run = tmp_path / "resid_mlp2_seed10"
    # 50 steps take 2 s, but the two intervals holding the validations after steps 99 and 149 take 7 s
    loss = [(49, 10.0), (99, 12.0), (149, 19.0), (199, 26.0), (249, 28.0)]
    write_events(run / "lightning_logs" / "version_0", loss, [(99, 120), (149, 101)])
    row = spd_run_progress.run_progress(run)
    assert row["run"] == "resid_mlp2_seed10" and row["last_step"] == 250
    assert row["median_step_ms"] == 40.0  # 2 s / 50 steps; with the validations counted it would be 90
    assert row["train_wall_s"] == 18.0
    assert row["alive_components"] == {"layers.0.mlp_in": [[100, 120.0], [150, 101.0]]}


def test_results_file_carries_the_given_machine(tmp_path, monkeypatch):
    run = tmp_path / "r"
    write_events(run, [(0, 100.0), (9, 101.0)], [(9, 5)])
    monkeypatch.setattr(spd_run_progress, "RESULTS_DIR", tmp_path)
    argv = [str(run), "--name", "x", "--commit", "abc", "--cpu", "c", "--cores", "16", "--gpu", "g",
            "--torch", "t", "--command", "cmd"]  # fmt: skip
    assert spd_run_progress.main(argv) == 0
    payload = json.loads((tmp_path / "x.json").read_text())
    assert payload["meta"]["gpu"] == "g" and payload["meta"]["date"].startswith("1970-01-01T00:01:41")
    assert payload["meta"]["load_before"] is None and "last_wall_time" not in payload["results"]["runs"][0]
