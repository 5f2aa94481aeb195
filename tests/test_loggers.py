"""configs/loggers/: where each logger writes, and that a resumed fit continues its run (CSV rows kept, the
same W&B run). W&B runs offline and is skipped without the `wandb` extra."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from tests.helpers.text import make_text
from train import cli_main, continue_wandb_run, place_logger

ROOT = Path(__file__).resolve().parents[1]
LOGGERS = ROOT / "configs" / "loggers"


def fit(tmp_path: Path, preset: str, steps: int, *extra: str):
    """A few steps of a tiny GPT on bytes of a small text file, logging every step, validating every 3."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(make_text(600, seed=1))
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "gpt2" / "tiny.yaml"),
        "--config",
        str(LOGGERS / preset),
    ]
    args += ["--trainer.default_root_dir", str(tmp_path / "root"), "--trainer.max_steps", str(steps)]
    args += ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]
    args += ["--data.init_args.sources", str(corpus), "--data.init_args.tokenizer", "bytes"]
    args += ["--data.init_args.block_size", "16", "--data.init_args.batch_size", "2"]
    args += ["--data.init_args.num_workers", "0", "--data.init_args.cache_dir", str(tmp_path / "cache")]
    args += ["--model.init_args.config.n_layer", "1", "--model.init_args.sample_tokens", "4"]
    return cli_main([*args, *extra])


def test_csv_resumed_fit_appends_to_its_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = fit(tmp_path, "csv.yaml", 3)
    run = Path(first.trainer.logger.log_dir)
    assert run == tmp_path / "root" / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()

    fit(tmp_path, "csv.yaml", 5, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no new run directory
    with (run / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    steps = sorted(int(r["step"]) for r in rows if r.get("train/loss"))
    assert steps == [0, 1, 2, 3, 4]  # the first fit's rows are still there, the resumed ones follow
    assert any(r.get("val/loss") for r in rows)


def test_place_logger_puts_csv_and_tensorboard_in_the_checkpoints_run(tmp_path: Path) -> None:
    run = tmp_path / "elsewhere" / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    for class_path in ("callbacks.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"):
        init = {"save_dir": ".", "name": "lightning_logs", "version": None}
        config = {
            "trainer": {"logger": {"class_path": class_path, "init_args": init}, "default_root_dir": "r"}
        }
        place_logger(config, "fit")
        assert init["save_dir"] == "r" and init["version"] is None  # a fresh run: under default_root_dir
        place_logger({**config, "ckpt_path": str(run / "checkpoints" / "last.ckpt")}, "fit")
        assert (init["save_dir"], init["name"], init["version"]) == (
            str(tmp_path / "elsewhere"),
            "lightning_logs",
            "version_3",
        )


def test_wandb_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r'pip install -e "\.\[wandb\]"'):
        continue_wandb_run({"project": None}, None)


def test_wandb_resume_continues_the_run_of_its_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    init = {"project": None, "id": None, "version": None, "save_dir": "root"}
    continue_wandb_run(init, Path("/runs/root/other_project/abc123/checkpoints/last.ckpt"))
    assert init["id"] is None  # not this project's checkpoint
    continue_wandb_run(init, Path("/runs/root/lightning_logs/abc123/checkpoints/last.ckpt"))
    assert (init["id"], init["save_dir"]) == ("abc123", "/runs/root")


def test_wandb_offline_fit_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip(
        "wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')"
    )
    monkeypatch.chdir(tmp_path)
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    try:
        first = fit(tmp_path, "wandb.yaml", 3)
        run_id = first.trainer.logger.version
        root = tmp_path / "root"
        assert list((root / "wandb").glob(f"offline-run-*-{run_id}"))  # W&B's files under default_root_dir
        ckpt = root / "lightning_logs" / run_id / "checkpoints" / "last.ckpt"
        assert ckpt.is_file()
        wandb.finish()
        resumed = fit(tmp_path, "wandb.yaml", 5, "--ckpt_path", str(ckpt))
        assert resumed.trainer.logger.version == run_id and resumed.trainer.global_step == 5
    finally:
        wandb.finish()
