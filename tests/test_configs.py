"""Every YAML under configs/ instantiates through train.py's CLI (nothing is run)."""

from pathlib import Path

import pytest

from train import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESET_DIRS = ("trainer", "callbacks", "loggers", "variants")  # variants: overlays on a method config
METHOD_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in PRESET_DIRS)
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


def _strategy_config(preset: Path) -> dict | None:
    import yaml

    strategy = yaml.safe_load(preset.read_text())["trainer"].get("strategy")
    return strategy if isinstance(strategy, dict) else None


def _build_strategy(config: dict):
    """Instantiate a strategy from its YAML the way LightningCLI does, without a Trainer (no GPU needed)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate_classes(parser.parse_object({"strategy": config})).strategy


SHARDED = [
    p
    for p in TRAINER_PRESETS
    if (_strategy_config(p) or {}).get("class_path", "").endswith(("DeepSpeedStrategy", "FSDPStrategy"))
]
PLAIN = [p for p in TRAINER_PRESETS if p not in SHARDED]


@pytest.mark.parametrize("preset", PLAIN, ids=lambda p: p.name)
def test_trainer_preset_composes_with_a_method_config(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import yaml

    wanted = yaml.safe_load(preset.read_text())["trainer"]
    # GPU presets are instantiated on CPU here; every other setting of the preset must survive.
    extra = (
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(wanted.get("devices", 1)).replace("auto", "1"),
    )
    cli = _instantiate(tmp_path, BASE, preset, extra=extra)
    if "precision" in wanted:
        on_cpu = {"16-mixed": "bf16-mixed"}  # Lightning runs float16 autocast as bfloat16 on CPU
        assert cli.trainer.precision == on_cpu.get(wanted["precision"], str(wanted["precision"]))
    strategy = _strategy_config(preset)
    if strategy:
        assert type(cli.trainer.strategy).__name__ == strategy["class_path"].rsplit(".", 1)[-1]
        assert cli.trainer.strategy._process_group_backend == strategy["init_args"]["process_group_backend"]
    assert cli.trainer.max_steps == yaml.safe_load(BASE.read_text())["trainer"]["max_steps"]


def test_deepspeed_presets_build_with_expected_zero_settings():
    pytest.importorskip("deepspeed")
    stages = {}
    for preset in SHARDED:
        config = _strategy_config(preset)
        if config["class_path"].endswith("DeepSpeedStrategy"):
            strategy = _build_strategy(config)
            zero = strategy.config["zero_optimization"]
            stages[preset.name] = (zero["stage"], "offload_optimizer" in zero, "offload_param" in zero)
    assert stages == {
        "deepspeed_stage2.yaml": (2, False, False),
        "deepspeed_stage3.yaml": (3, False, False),
        "deepspeed_stage3_offload.yaml": (3, True, True),
    }


def test_fsdp_preset_wraps_and_checkpoints_transformer_blocks():
    from lightning_modules.gpt.model import Block

    strategy = _build_strategy(_strategy_config(CONFIGS / "trainer" / "fsdp.yaml"))
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}  # one FSDP unit per block
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy._state_dict_type == "sharded"


CALLBACK_PRESETS = sorted((CONFIGS / "callbacks").glob("*.yaml"))


@pytest.mark.parametrize("preset", CALLBACK_PRESETS, ids=lambda p: p.name)
def test_callback_preset_appends_to_a_method_config(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import yaml

    wanted = yaml.safe_load(preset.read_text())["trainer"]
    cli = _instantiate(tmp_path, BASE, preset, extra=("--trainer.accelerator", "cpu"))
    callback_names = {type(c).__name__ for c in cli.trainer.callbacks}
    forced = {"BestCheckpoint", "PeriodicCheckpoint", "LearningRateMonitor", "ExactResume", "RunReport"}
    assert forced <= callback_names  # train.py's always-on callbacks are kept
    for entry in wanted.get("callbacks+", []):
        assert entry["class_path"].rsplit(".", 1)[-1] in callback_names
    for entry in wanted.get("plugins", []):
        assert type(cli.trainer.strategy.checkpoint_io).__name__ == entry["class_path"].rsplit(".", 1)[-1]


def test_callback_presets_compose_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _instantiate(tmp_path, BASE, *CALLBACK_PRESETS, extra=("--trainer.accelerator", "cpu"))
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"SkipNonFiniteSteps", "StepWindowProfiler", "TokenThroughputMonitor", "ExactResume"} <= names
    assert "Float32MatmulPrecision" in names
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AsyncAtomicCheckpointIO"


LOGGER_PRESETS = sorted((CONFIGS / "loggers").glob("*.yaml"))


@pytest.mark.parametrize("preset", LOGGER_PRESETS, ids=lambda p: p.name)
def test_logger_preset_replaces_the_default_logger(preset, tmp_path, monkeypatch):
    import yaml

    wanted = yaml.safe_load(preset.read_text())["trainer"]["logger"]
    if wanted["class_path"].endswith("WandbLogger"):
        pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
        monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    args = ["--config", str(BASE), "--config", str(preset), "--trainer.default_root_dir", str(root)]
    cli = cli_main([*args, "--trainer.accelerator", "cpu"], run=False)
    logger = cli.trainer.logger
    assert type(logger).__name__ == wanted["class_path"].rsplit(".", 1)[-1]
    assert Path(logger.save_dir) == root  # placed under trainer.default_root_dir by train.py


def test_deepspeed_preset_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    from train import require_strategy_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r'pip install -e "\.\[deepspeed\]"'):
        require_strategy_packages({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy"})
    require_strategy_packages({"class_path": "lightning.pytorch.strategies.DDPStrategy"})  # no error
