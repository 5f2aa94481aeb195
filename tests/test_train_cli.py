"""train.py end to end in a subprocess: fit, validate, test, predict, --print_config, bad keys."""

from pathlib import Path

import pytest
import torch

from tests.helpers.cli import FAST, TINY, run_train


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("fit")
    result = run_train(cwd, "fit", "--config", str(TINY), *FAST)
    (cwd / "output.txt").write_text(result.stdout + result.stderr)
    return cwd


def test_fit_writes_events_checkpoints_config_and_sample(fitted_run):
    run_dir = fitted_run / "lightning_logs" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (run_dir / "config.yaml").is_file(), "resolved config not saved in the log directory"
    checkpoints = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in checkpoints) and len(checkpoints) >= 2
    samples = (run_dir / "samples.txt").read_text()
    assert "=== step 3 ===" in samples and "=== step 6 ===" in samples
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert state["hyper_parameters"]["config"]["vocab_size"] == 512  # linked from the data


def test_fit_prints_no_notice_a_user_cannot_act_on(fitted_run):
    output = (fitted_run / "output.txt").read_text()
    assert "run directory" in output  # what a run does print
    for noise in (
        "LeafSpec",
        "💡 Tip:",
        "Trainer already configured with model summary callbacks",
        "Warning",
    ):
        assert noise not in output, noise


def test_tensorboard_has_losses_lr_and_sample(fitted_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = fitted_run / "lightning_logs" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "train/tokens_seen"} <= scalars
    assert any(tag.startswith("lr-") for tag in scalars)
    assert any("samples" in tag for tag in events.Tags()["tensors"])


def test_validate_test_and_predict_from_checkpoint(fitted_run):
    ckpt = fitted_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    for command in ("validate", "test", "predict"):
        result = run_train(fitted_run, command, "--config", str(TINY), *FAST, f"--ckpt_path={ckpt}")
        assert result.returncode == 0


def test_resume_names_the_settings_the_checkpoint_overrides(fitted_run, tmp_path):
    """LightningCLI restores a checkpoint's model hyper-parameters over the config on --ckpt_path; a changed
    setting is named (given -> kept) instead of being dropped silently, and an unchanged resume says nothing."""
    ckpt = tmp_path / "step6.ckpt"  # a copy: the resumed fits must not write into the shared run
    ckpt.write_bytes((fitted_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").read_bytes())
    common = ["--config", str(TINY), *FAST, f"--ckpt_path={ckpt}"]  # at max_steps already: ends at once
    changed = run_train(tmp_path, "fit", *common, "--model.init_args.warmup_steps=7")
    assert "model.warmup_steps: 7 -> 2" in changed.stderr, changed.stderr  # FAST's 2 is the one that runs
    same = run_train(tmp_path, "fit", *common)
    assert "hyper-parameters replace" not in same.stderr


def test_several_configs_compose_in_order(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    warmup_steps: 7\ntrainer:\n  max_steps: 3\n")
    out = run_train(
        tmp_path, "fit", "--config", str(TINY), "--config", str(override), "--print_config"
    ).stdout
    assert "warmup_steps: 7" in out and "max_steps: 3" in out


def test_unknown_config_key_is_rejected(tmp_path):
    result = run_train(
        tmp_path, "fit", "--config", str(TINY), "--model.init_args.config.n_layerz=3", check=False
    )
    assert result.returncode != 0
    assert "n_layerz" in result.stderr
