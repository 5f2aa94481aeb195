"""Every YAML under configs/ instantiates through train.py's CLI (nothing is run)."""

from pathlib import Path

import pytest

from train import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHOD_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("trainer", "callbacks"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
BASE = CONFIGS / "gpt2" / "tiny.yaml"


def _instantiate(tmp_path: Path, *configs: Path, extra: tuple[str, ...] = ()):
    args = [arg for config in configs for arg in ("--config", str(config))]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"] + list(extra)
    return cli_main(args, run=False)


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_method_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _instantiate(tmp_path, config, extra=("--trainer.accelerator", "cpu"))
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes_with_a_method_config(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import yaml

    wanted = yaml.safe_load(preset.read_text())["trainer"]
    # GPU presets are instantiated on CPU here; every other setting of the preset must survive.
    cli = _instantiate(
        tmp_path, BASE, preset, extra=("--trainer.accelerator", "cpu", "--trainer.devices", "1")
    )
    if "precision" in wanted:
        assert str(wanted["precision"]).split("-")[0] in cli.trainer.precision
    assert cli.trainer.max_steps == yaml.safe_load(BASE.read_text())["trainer"]["max_steps"]
