"""train.py as a user meets it: short errors with suggestions, --debug, no empty run directories, short class
names, periodic checkpoints, the end-of-run report, default_root_dir and resuming in the run's directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules.common.user_errors import describe_parser_error
from tests.helpers.cli import FAST, ROOT, TINY, run_train

MAX_ERROR_LINES = 6  # the message (up to ~5 lines) and the --debug hint


def fails_briefly(cwd: Path, *args: str) -> str:
    """Run train.py expecting a user error: exit status 2, a short stderr without a traceback."""
    result = run_train(cwd, *args, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("error:") :].strip().splitlines()
    assert len(error) <= MAX_ERROR_LINES, error
    assert "--debug" in error[-1]
    return "\n".join(error)


def test_config_key_typo_names_the_key_and_suggests_the_field(tmp_path):
    error = fails_briefly(tmp_path, "fit", "--config", str(TINY), "--model.init_args.config.n_layers", "6")
    assert "unknown key 'n_layers'" in error and "did you mean 'n_layer'?" in error
    assert not (tmp_path / "lightning_logs").exists()


def test_non_numeric_learning_rate_says_a_float_is_expected(tmp_path):
    error = fails_briefly(
        tmp_path, "fit", "--config", str(TINY), "--model.init_args.optimizer.init_args.lr", "abc"
    )
    assert "model.init_args.optimizer.init_args.lr = 'abc': expected float" in error
    assert "dot import path" not in error


def test_a_setting_the_class_refuses_is_its_own_message(tmp_path):
    """A value the LightningModule's __init__ rejects: its message alone, not jsonargparse's dump of every
    setting given (an SPD recipe with a repeated member seed)."""
    spd = ROOT / "configs" / "spd" / "tms_5-2.yaml"
    error = fails_briefly(tmp_path, "fit", "--config", str(spd), "--model.init_args.member_seeds", "[10, 10]")
    assert error.startswith("error: member_seeds repeats [10]: each member needs its own seed")
    assert "Namespace" not in error and "NoneType" not in error


def test_unknown_trainer_option_suggests_the_close_one(tmp_path):
    error = fails_briefly(tmp_path, "fit", "--config", str(TINY), "--trainer.max_stepz", "5")
    assert "--trainer.max_stepz" in error and "trainer.max_steps" in error


def test_missing_data_fails_short_and_leaves_no_run_directory(tmp_path):
    error = fails_briefly(
        tmp_path, "fit", "--config", str(TINY), *FAST, "--data.init_args.sources", "nope/*.txt"
    )
    assert "nope/*.txt" in error and "matches no file" in error
    assert not list(tmp_path.glob("lightning_logs/version_*"))


def test_block_size_beyond_the_model_fails_in_setup_and_leaves_no_run_directory(tmp_path):
    error = fails_briefly(
        tmp_path, "fit", "--config", str(TINY), *FAST, "--model.init_args.config.block_size", "16"
    )
    assert "block_size=32 exceeds the model's positions (16)" in error
    assert not list(tmp_path.glob("lightning_logs/version_*"))


def test_corrupt_checkpoint_empty_data_and_a_gpu_only_strategy_fail_briefly(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    error = fails_briefly(tmp_path, "fit", "--config", str(TINY), *FAST, "--ckpt_path", "bad.ckpt")
    assert "'bad.ckpt'" in error and "truncated or corrupted" in error
    (tmp_path / "empty.txt").write_text("")
    error = fails_briefly(
        tmp_path, "fit", "--config", str(TINY), *FAST, "--data.init_args.sources", "empty.txt"
    )
    assert "empty.txt" in error and "no text" in error
    deepspeed = str(TINY.parents[1] / "trainer" / "deepspeed_stage2.yaml")
    if not torch.cuda.is_available():
        error = fails_briefly(tmp_path, "fit", "--config", str(TINY), "--config", deepspeed)
        assert "CUDA" in error and "ddp_cpu.yaml" in error
    assert not list(tmp_path.glob("lightning_logs/version_*"))


def test_debug_shows_the_traceback(tmp_path):
    result = run_train(
        tmp_path, "fit", "--config", str(TINY), *FAST, "--data.init_args.sources", "nope/*.txt", "--debug",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_monitored_checkpoint_with_a_step_trigger_is_rejected_with_the_alternative(tmp_path):
    error = fails_briefly(tmp_path, "fit", "--config", str(TINY), "--checkpoint.every_n_train_steps", "20")
    assert "--periodic_checkpoint.every_n_train_steps" in error


def test_help_lists_the_collection_and_short_names_work(tmp_path):
    out = run_train(tmp_path, "fit", "--help").stdout
    for name in ("GPTLightningModule", "NPTLightningModule", "SPDLightningModule", "TextDataModule"):
        assert name in out
    spd_help = run_train(tmp_path, "fit", "--model.help", "SPDLightningModule").stdout
    assert "--model.target_module_patterns" in spd_help


@pytest.fixture(scope="module")
def periodic_run(tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("periodic")
    result = run_train(
        cwd, "fit", "--config", str(TINY), *FAST, "--trainer.max_steps=7", "--periodic_checkpoint.every_n_train_steps=2",
        "--periodic_checkpoint.keep=2", "--trainer.default_root_dir=out",
    )  # fmt: skip
    return cwd, result.stdout


def test_default_root_dir_holds_logs_and_checkpoints(periodic_run):
    cwd, _ = periodic_run
    assert not (cwd / "lightning_logs").exists()
    assert (cwd / "out" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_periodic_checkpoints_keep_the_newest_by_step_and_the_final_state(periodic_run):
    cwd, _ = periodic_run
    checkpoints = cwd / "out" / "lightning_logs" / "version_0" / "checkpoints"
    periodic = sorted(p.name for p in checkpoints.glob("periodic-*.ckpt"))
    assert periodic == ["periodic-step6.ckpt", "periodic-step7.ckpt"]  # every 2 steps, keep 2, + the end
    state = torch.load(checkpoints / "periodic-step7.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 7


def test_end_of_fit_report_names_the_run_files_and_the_figures(periodic_run):
    _, stdout = periodic_run
    report = stdout[stdout.index("run finished at step 7") :]
    assert "val/loss" in report and "tokens/s" in report
    for label in (
        "run directory",
        "best checkpoint",
        "last checkpoint",
        "newest periodic checkpoint",
        "samples.txt",
    ):
        assert label in report
    assert "out/lightning_logs/version_0/samples.txt" in report


def test_resume_continues_in_the_run_directory_and_says_from_which_step(periodic_run):
    cwd, _ = periodic_run
    run = cwd / "out" / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "periodic-step6.ckpt"
    result = run_train(
        cwd, "fit", "--config", str(TINY), *FAST, "--trainer.max_steps=9", f"--ckpt_path={ckpt}"
    )
    assert f"resuming from {ckpt} at step 6" in result.stdout + result.stderr
    assert not (cwd / "out" / "lightning_logs" / "version_1").exists()
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the resumed curves continue in the same run


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Parser key \"model\":\n  - Problem with given class_path 'lightning_modules.gpt.GPTConfig':\n"
            "      Option 'n_embed' is not accepted\n  Given value: NestedArg(key='config.n_embed', val='6')",
            "did you mean 'n_embd'?",
        ),
        ("unrecognized arguments: --trainer.max_epoch 3", "did you mean 'trainer.max_epochs'?"),
    ],
)
def test_parser_errors_are_summarised(message, expected):
    options = ["--trainer.max_epochs", "--trainer.max_steps"]
    assert expected in describe_parser_error(message, options)


def test_progress_bar_counts_optimizer_steps_and_shows_rate_not_version(caplog):
    import logging

    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks.console import QuietModelSummary, StepProgressBar

    bar = StepProgressBar()
    trainer = Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        callbacks=[bar, QuietModelSummary()], limit_val_batches=0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(BoringModel())
    assert bar.train_progress_bar.total == 6 and bar.train_progress_bar.n == 6  # step / max_steps, one bar
    assert bar.train_progress_bar.desc.startswith("step")
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert "v_num" not in metrics and "ex/s" in metrics
    summary = "\n".join(r.getMessage() for r in caplog.records)
    assert "Total params" in summary and "FLOPs" not in summary
