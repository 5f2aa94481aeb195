"""SPDLightningModule, ToyTargetLightningModule, SparseFeatureDataModule, target loading and the configs
end to end through train.py (tiny sizes, CPU, float32)."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from datamodules.sparse_features import SparseFeatureDataModule
from lightning_modules.common.seeds import mixed_seed
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.spd.config import GROUPS, LOSS_NAMES
from lightning_modules.spd.module import SPDLightningModule
from lightning_modules.spd.targets import load_target, save_toy_target
from lightning_modules.spd.toy_models import ResidMLP, TMSModel, train_toy_model
from lightning_modules.spd.toy_target import ToyTargetLightningModule
from tests.helpers.cli import ROOT, run_train
from tests.helpers.fault_injection import read_record, record_yaml
from tests.helpers.trainers import quiet_trainer

SPD_CONFIGS = ROOT / "configs" / "spd"
ALL_LOSSES = {name: 1.0 for name in LOSS_NAMES} | {"importance_minimality": 3e-3}


@pytest.fixture(scope="module")
def tms_target(tmp_path_factory) -> Path:
    """A briefly trained TMS 5-2 target file."""
    torch.manual_seed(2)
    model = TMSModel(5, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: far faster on one thread
    try:
        train_toy_model(model, steps=100, batch=256, seed=2)
    finally:
        torch.set_num_threads(threads)
    return save_toy_target(
        tmp_path_factory.mktemp("target") / "tms.pt", model, "tms", {"n_features": 5, "n_hidden": 2}
    )


def merged(kwargs: dict, overrides: dict) -> dict:
    """kwargs with overrides applied; a settings group's dict (components, objective, ...) is merged."""
    out = dict(kwargs)
    for key, value in overrides.items():
        out[key] = out.get(key, {}) | value if key in GROUPS else value
    return out


def spd_module(target: Path | str | None, **overrides) -> SPDLightningModule:
    kwargs = dict(
        target=str(target) if target is not None else None,
        target_module_patterns={"linear1": 8, "linear2": 8},
        components={"tied_components": {"linear2": "linear1"}},
        objective={"loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 3e-3}},
        faithfulness_warmup={"steps": 3},
    )
    return SPDLightningModule(**merged(kwargs, overrides))


def fit(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    tmp_path: Path,
    steps: int = 4,
    ckpt_path: Path | None = None,
) -> pl.Trainer:
    """Fit a few steps (validation every 2), logging to TensorBoard under tmp_path."""
    trainer = quiet_trainer(
        tmp_path,
        max_steps=steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="logs"),
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return trainer


def toy_data(n_features: int = 5, **kw) -> SparseFeatureDataModule:
    return SparseFeatureDataModule(
        n_features, 0.05, batch_size=kw.pop("batch_size", 64), steps_per_epoch=50, val_batches=1, **kw
    )


def event_tags(log_dir: str) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0}).Reload().Tags()


# ----------------------------------------------------------------------------- toy fit


def test_fit_logs_every_loss_figures_and_writes_results(tms_target, tmp_path):
    module = spd_module(
        tms_target,
        objective={
            "loss_coeffs": ALL_LOSSES,
            "pgd": {"n_steps": 1, "step_size": 0.1, "multibatch_n_batches": 2, "multibatch_n_steps": 2},
        },
    )
    module.objective.pgd.multibatch_routings = ["all", "subset"]
    trainer = fit(module, toy_data(), tmp_path)
    tags = event_tags(trainer.log_dir)
    scalars, images = set(tags["scalars"]), set(tags["images"])
    assert {f"train/loss/{name}" for name in LOSS_NAMES} <= scalars
    for name in ("linear1", "linear2"):
        l0s = {f"train/l0_ci_gt_0/{name}", f"val/l0_ci_gt_0/{name}", f"val/l0_ci_gt_0.1/{name}"}
        assert {*l0s, f"val/alive_components/{name}"} <= scalars  # l0_ci_gt_0.1: the reference's L0
        assert {f"val/mmcs/{name}", f"val/identity_ci_error/{name}"} <= scalars
        for kind in ("ci_histogram", "component_density", "single_feature_ci", "feature_cosine", "tms_plane"):
            assert f"figures/{kind}/{name}" in images
            assert (Path(trainer.log_dir) / "figures" / kind / f"{name}.png").is_file()
    assert "train/faithfulness_warmup" in scalars and bool(module.warmup_done)
    results = json.loads((Path(trainer.log_dir) / "spd_results.json").read_text())
    assert results["global_step"] == 4
    for name in ("linear1", "linear2"):
        row = results["modules"][name]
        wanted = {"alive_components", "l0_ci_gt_0", "l0_ci_gt_0.1", "mmcs", "ml2r", "identity_ci_error"}
        assert wanted <= set(row)
        assert 0 <= row["alive_components"] <= 8
    assert {"recon/ci_masked", "recon/unmasked", "recon/stochastic", "target_output_sq"} <= set(
        results["metrics"]
    )
    assert all(results["metrics"][f"pgd_multibatch_recon{v}"] > 0 for v in ("", "_subset"))
    assert all(f"train/loss/{name}" in results["train"] for name in LOSS_NAMES)


def test_tied_components_share_storage_after_fit(tms_target, tmp_path):
    module = spd_module(tms_target, lr_decay_steps=1, min_lr_ratio=0.25)
    trainer = fit(module, toy_data(), tmp_path, steps=2)
    (optimizer,) = trainer.optimizers  # the default: AdamW lr 1e-3, wd 0, torch's betas, one group
    assert len(optimizer.param_groups) == 1 and optimizer.defaults["betas"] == (0.9, 0.999)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)  # decayed after lr_decay_steps
    assert module._total_steps == 2  # the importance-p schedule spans the run, not lr_decay_steps
    lin1, lin2 = module.cm.component("linear1"), module.cm.component("linear2")
    assert lin2.V.data_ptr() == lin1.U.data_ptr() and lin2.U.data_ptr() == lin1.V.data_ptr()
    torch.testing.assert_close(lin2.weight, lin1.weight.t())


def test_component_weight_decay_applies_to_the_components_alone(tms_target, tmp_path):
    module = spd_module(tms_target, component_weight_decay=0.3)
    trainer = fit(module, toy_data(), tmp_path, steps=1)
    (optimizer,) = trainer.optimizers
    components, ci_fns = optimizer.param_groups
    assert components["weight_decay"] == 0.3 and ci_fns["weight_decay"] == 0.0  # the optimizer's
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(components["params"]) == ids(module.cm.components.parameters())
    assert ids(ci_fns["params"]) == ids(module.cm.ci_fns.parameters())
    with pytest.raises(ValueError, match="component_weight_decay must be >= 0"):
        spd_module(tms_target, component_weight_decay=-0.1)


def test_resid_mlp_target_and_decomposition(tmp_path):
    data = toy_data(12, value_range=(-1.0, 1.0))
    target = ToyTargetLightningModule(
        "resid_mlp", {"n_features": 12, "d_embed": 16, "d_mlp": 6}, save_path=str(tmp_path / "resid.pt")
    )
    fit(target, data, tmp_path / "target", steps=4)
    loaded = load_target(str(tmp_path / "resid.pt"))
    assert isinstance(loaded, ResidMLP)
    torch.testing.assert_close(loaded.W_E, target.model.W_E)
    module = spd_module(
        tmp_path / "resid.pt",
        target_module_patterns={"layers.*.mlp_in": 12, "layers.*.mlp_out": 12},
        components={"tied_components": None},
        evaluation={"identity_ci_patterns": ["layers.*.mlp_in"]},
    )
    trainer = fit(module, data, tmp_path / "spd", steps=2)
    rows = json.loads((Path(trainer.log_dir) / "spd_results.json").read_text())["modules"]
    assert (
        "identity_ci_error" in rows["layers.0.mlp_in"] and "identity_ci_error" not in rows["layers.0.mlp_out"]
    )
    assert "mmcs" in rows["layers.0.mlp_in"]  # read through the embedding W_E


def test_toy_target_lightning_checkpoint_loads_as_target(tmp_path):
    target = ToyTargetLightningModule("tms", {"n_features": 5, "n_hidden": 2})
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(target, toy_data())
    (optimizer,) = trainer.optimizers  # the default: AdamW lr 5e-3, wd 0.01 on every parameter
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["lr"] == 5e-3
    trainer.save_checkpoint(tmp_path / "toy.ckpt")
    loaded = load_target(str(tmp_path / "toy.ckpt"))
    torch.testing.assert_close(loaded.linear1.weight, target.model.linear1.weight)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        ToyTargetLightningModule(warmup_steps=-1)


def test_checkpoints_leave_out_the_file_target_and_resume_from_it(tms_target, tmp_path):
    module = spd_module(tms_target)
    trainer = fit(module, toy_data(), tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "spd.ckpt")
    ckpt = torch.load(tmp_path / "spd.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("cm.target_model.")]
    assert "cm.target_model.linear1.weight" in ckpt["spd_target_fingerprint"]
    assert any(k.startswith("cm.components.") for k in ckpt["state_dict"])

    loaded = SPDLightningModule.load_from_checkpoint(tmp_path / "spd.ckpt", weights_only=True)
    torch.testing.assert_close(loaded.state_dict(), module.state_dict())  # target back from the file
    resumed = spd_module(tms_target)
    fit(resumed, toy_data(), tmp_path / "resume", steps=3, ckpt_path=tmp_path / "spd.ckpt")
    assert resumed.global_step == 3

    torch.manual_seed(5)  # another target file: the resume must refuse, naming the target
    other = save_toy_target(tmp_path / "other.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    with pytest.raises(ValueError, match="another target"):
        fit(spd_module(other), toy_data(), tmp_path / "other", steps=3, ckpt_path=tmp_path / "spd.ckpt")


def test_checkpoint_with_flat_hyper_parameters_loads_into_the_groups(tms_target, tmp_path):
    module = spd_module(
        tms_target, components={"ci_fn_hidden_dims": [5]}, evaluation={"final_eval_batches": 2}
    )
    trainer = fit(module, toy_data(), tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "spd.ckpt")
    ckpt = torch.load(tmp_path / "spd.ckpt", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["objective"]["pgd"] == {
        "n_steps": 1, "step_size": 0.1, "init": "random", "mask_scope": "unique_per_datapoint",
        "multibatch_n_batches": 0, "multibatch_n_steps": 20, "multibatch_step_size": 0.1,
        "multibatch_init": "random", "multibatch_routings": ["all"],
    }  # fmt: skip
    flat = {k: v for k, v in hparams.items() if k not in GROUPS and k != "min_lr_ratio"}
    for group in ("components", "objective", "evaluation"):
        flat.update(hparams[group])
    flat.update({f"faithfulness_warmup_{k}": v for k, v in hparams["faithfulness_warmup"].items()})
    flat["lr_final_frac"] = 0.25
    ckpt["hyper_parameters"] = flat
    torch.save(ckpt, tmp_path / "flat.ckpt")
    with pytest.warns(DeprecationWarning, match="lr_final_frac"):
        loaded = SPDLightningModule.load_from_checkpoint(tmp_path / "flat.ckpt", weights_only=True)
    assert loaded.component_cfg == module.component_cfg and loaded.component_cfg.ci_fn_hidden_dims == [5]
    assert loaded.objective == module.objective and loaded.eval_cfg.final_eval_batches == 2
    assert loaded.warmup_cfg == module.warmup_cfg and loaded.hparams.min_lr_ratio == 0.25
    assert {k: loaded.hparams[k] for k in GROUPS} == {k: hparams[k] for k in GROUPS}
    torch.testing.assert_close(loaded.state_dict(), module.state_dict())
    with pytest.raises(TypeError, match="ci_fn_typo"):
        spd_module(tms_target, ci_fn_typo="mlp")


def test_random_targets_stay_in_checkpoints(tmp_path):
    module = lm_module()
    trainer = fit(module, TokenData(), tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    state = torch.load(tmp_path / "lm.ckpt", weights_only=True)["state_dict"]
    assert "cm.target_model.lm_head.weight" in state or "cm.target_model.transformer.wte.weight" in state


# ----------------------------------------------------------------------------- LM path


class TokenData(pl.LightningDataModule):
    """Random (x, y) token batches with a vocab_size, like TextDataModule's."""

    def __init__(self, vocab_size: int = 48, seq: int = 8) -> None:
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, seq
        tokens = torch.randint(0, vocab_size, (16, seq + 1), generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(tokens[:, :-1], tokens[:, 1:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)


LM_PATTERNS = {"transformer.h.*.mlp.c_fc": 6, "transformer.h.*.attn.c_proj": 4}
TINY_GPT = GPTConfig(block_size=16, vocab_size=48, n_layer=1, n_head=2, n_embd=8)


def lm_module(**overrides) -> SPDLightningModule:
    """SPD of a random TINY_GPT (KL output loss) on TokenData's 48-token vocabulary."""
    lm = dict(
        random_target=TINY_GPT,
        vocab_size=48,
        target_module_patterns=LM_PATTERNS,
        components={"tied_components": None},
        objective={"output_loss_type": "kl"},
    )
    return spd_module(None, **merged(lm, overrides))


def test_lm_fit_logs_ce_kl_and_results(tmp_path):
    module = lm_module(
        components={"ci_fn_type": "shared_mlp"},
        objective={
            "loss_coeffs": {
                "stochastic_recon": 1.0,
                "stochastic_recon_subset": 1.0,
                "importance_minimality": 1e-3,
            }
        },
        evaluation={"ci_alive_threshold": 0.0},
    )
    trainer = fit(module, TokenData(), tmp_path)
    tags = event_tags(trainer.log_dir)
    scalars = set(tags["scalars"])
    images = set(tags["images"])
    assert {"figures/l0", "figures/lm_masks", "figures/ci_histogram/transformer.h.0.mlp.c_fc"} <= images
    for kind in ("target", "ci_masked", "unmasked", "stochastic"):
        assert f"val/lm/ce_{kind}" in scalars
    assert {"val/lm/kl_ci_masked", "val/lm/ce_unrecovered"} <= scalars
    lm = json.loads((Path(trainer.log_dir) / "spd_results.json").read_text())["lm"]
    assert {"ce_target", "ce_ci_masked", "kl_ci_masked", "kl_stochastic", "ce_unrecovered"} <= set(lm)
    assert lm["kl_unmasked"] >= 0


def test_lm_bf16_mixed_through_the_trainer(tmp_path):
    module = lm_module(objective={"loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 1e-3}})
    trainer = quiet_trainer(tmp_path, max_steps=2, precision="bf16-mixed", limit_val_batches=1)
    trainer.fit(module, TokenData())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert module.cm.component("transformer.h.0.mlp.c_fc").V.dtype == torch.float32  # weights stay fp32


def test_compiled_causal_importances_match_eager(tms_target):
    eager = spd_module(tms_target, faithfulness_warmup={"steps": 0})
    compiled = spd_module(tms_target, faithfulness_warmup={"steps": 0}, compile=True)
    eager.build()
    compiled.build()
    compiled.cm.load_state_dict(eager.cm.state_dict())
    compiled.configure_model()
    assert compiled.cm.compiled_kl and not eager.cm.compiled_kl  # the KL terms' blocks too (LMs)
    assert compiled.cm._compiled_ci is not None and eager.cm._compiled_ci is None
    x = SparseFeatureDataModule(5, 0.2, batch_size=64).val_dataloader().dataset[0]
    outs, grads = [], []
    for module in (eager, compiled):
        torch.manual_seed(0)
        outs.append(module.objective(module.cm, x, 0.5).total)
        outs[-1].backward()
        grads.append([p.grad for p in (*module.cm.components.parameters(), *module.cm.ci_fns.parameters())])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (a.abs().max().item() + 1e-12))


def test_gpt_checkpoint_target_and_vocab_check(tmp_path):
    from lightning_modules.gpt.module import GPTLightningModule

    gpt = GPTLightningModule(config=TINY_GPT)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(gpt, TokenData())
    trainer.save_checkpoint(tmp_path / "gpt.ckpt")
    module = spd_module(
        tmp_path / "gpt.ckpt",
        vocab_size=48,
        target_module_patterns=LM_PATTERNS,
        components={"tied_components": None},
    )
    assert module.build().module_names == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    too_big = spd_module(
        tmp_path / "gpt.ckpt",
        vocab_size=100,
        target_module_patterns=LM_PATTERNS,
        components={"tied_components": None},
    )
    with pytest.raises(ValueError, match="100 tokens"):
        too_big.build()


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_loss_name_and_bad_c_fail_at_init(tms_target):
    with pytest.raises(ValueError, match="valid names") as err:
        spd_module(tms_target, objective={"loss_coeffs": {"stochastic_recon": 1.0, "stochastic_reconn": 1.0}})
    assert "stochastic_reconn" in str(err.value) and "pgd_recon" in str(err.value)
    with pytest.raises(ValueError, match="C must be an int >= 1"):
        spd_module(tms_target, target_module_patterns={"linear1": 0})
    with pytest.raises(ValueError, match="target is None"):
        spd_module(None)
    with pytest.raises(ValueError, match="sampling"):
        spd_module(tms_target, objective={"sampling": "bernoulli"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"components": {"ci_fn_type": "lstm"}}, "ci_fn_type='lstm'.*shared_mlp"),
        ({"components": {"ci_fn_hidden_dims": [0]}}, r"ci_fn_hidden_dims=\[0\]"),
        ({"components": {"sigmoid_type": "relu"}}, "sigmoid_type='relu'.*leaky_hard"),
        ({"components": {"tied_components": {"linear1": "linear1"}}}, "'linear1' to itself"),
        ({"objective": {"n_mask_samples": 0}}, "n_mask_samples must be >= 1, got 0"),
        ({"objective": {"importance_p_end": -1.0}}, "importance_p_end=-1.0"),
        ({"objective": {"pgd": {"init": "gaussian"}}}, "init='gaussian'.*zeros"),
        ({"faithfulness_warmup": {"steps": -1}}, "steps must be >= 0.*-1"),
        ({"faithfulness_warmup": {"lr": 0.0}}, "lr > 0"),
        ({"evaluation": {"ci_alive_threshold": 1.0}}, r"ci_alive_threshold must be in \[0, 1\), got 1.0"),
        ({"evaluation": {"final_eval_batches": -2}}, "final_eval_batches must be >= 0, got -2"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\].*1.5"),
        ({"lr_decay_steps": 0}, "lr_decay_steps must be >= 1"),
    ],
)
def test_bad_settings_fail_at_init_naming_the_value(tms_target, overrides, message):
    with pytest.raises(ValueError, match=message):
        spd_module(tms_target, **overrides)


def test_bad_targets_fail_before_training(tms_target, tmp_path):
    with pytest.raises(ValueError, match="matched no"):
        spd_module(
            tms_target,
            target_module_patterns={"linear1": 4, "linear3": 4},
            components={"tied_components": None},
        ).build()
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        spd_module(missing).build()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        spd_module(corrupt).build()
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt"):
        spd_module(foreign).build()
    with pytest.raises(ValueError, match="tokens"):
        spd_module(tms_target, vocab_size=50).build()
    # through a Trainer: the missing file is reported at setup, before any step
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fit(spd_module(missing), toy_data(), tmp_path)


def test_n_features_mismatch_fails_at_setup(tms_target, tmp_path):
    with pytest.raises(ValueError, match="n_features"):
        fit(spd_module(tms_target), toy_data(7), tmp_path)


# ----------------------------------------------------------------------------- data and figures


def test_sparse_feature_data_is_seeded_per_epoch_and_sliced_per_rank():
    dm = SparseFeatureDataModule(6, 0.3, batch_size=32, steps_per_epoch=3, val_batches=2, seed=5)
    assert dm.vocab_size is None
    a = list(dm.train_dataloader())
    assert len(a) == 3 and a[0].shape == (32, 6)
    assert torch.equal(a[0], list(SparseFeatureDataModule(6, 0.3, 32, 3, 2, seed=5).train_dataloader())[0])
    loader = dm.train_dataloader()
    first = next(iter(loader))
    assert torch.equal(first, a[0]) and not torch.equal(next(iter(loader)), a[0])  # passes advance the epoch
    loader.sampler.set_epoch(0)  # as Lightning does before each epoch (and on resume)
    assert torch.equal(next(iter(loader)), a[0])
    assert torch.equal(list(dm.val_dataloader())[0], list(dm.val_dataloader())[0])
    # under DDP (2 ranks x 16) the ranks split the global batch of a one-process run with batch 32
    halves = []
    for rank in (0, 1):
        half = SparseFeatureDataModule(6, 0.3, batch_size=16, steps_per_epoch=3, val_batches=2, seed=5)
        half.trainer = type("FakeTrainer", (), {"global_rank": rank, "world_size": 2})()
        halves.append(next(iter(half.train_dataloader())))
    assert halves[0].shape == (16, 6) and not torch.equal(halves[0], halves[1])
    assert torch.equal(torch.cat(halves), a[0])
    x = torch.cat(a)
    assert ((x > 0).float().mean() - 0.3).abs() < 0.05 and x.max() <= 1 and x.min() >= 0
    with pytest.raises(ValueError, match="feature_prob"):
        SparseFeatureDataModule(feature_prob=0.0)


def test_mask_seeds_differ_per_rank_step_and_micro_batch():
    seeds = {mixed_seed(7, r, s, b) for r in range(4) for s in range(50) for b in range(4)}
    assert len(seeds) == 4 * 50 * 4 and all(0 <= x < 2**63 for x in seeds)
    assert mixed_seed(7, 0, 3, 1) == mixed_seed(7, 0, 3, 1) != mixed_seed(8, 0, 3, 1)


# ----------------------------------------------------------------------------- train.py end to end


def test_train_cli_target_then_decomposition(tmp_path):
    run_train(tmp_path, "fit", "--config", str(SPD_CONFIGS / "tms_5-2_target.yaml"), "--trainer.max_steps=20")
    assert (tmp_path / "spd_targets" / "tms_5-2.pt").is_file()
    run_train(
        tmp_path,
        "fit",
        "--config",
        str(SPD_CONFIGS / "tms_5-2.yaml"),
        "--config",
        str(record_yaml(tmp_path)),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--data.init_args.batch_size=128",
        "--model.init_args.faithfulness_warmup.steps=2",
    )
    results = json.loads((tmp_path / "lightning_logs" / "version_1" / "spd_results.json").read_text())
    assert results["global_step"] == 4 and set(results["modules"]) == {"linear1", "linear2"}
    # the shipped checkpoint settings save at every validation, not only at the end of fit
    assert "last.ckpt" in read_record(tmp_path / "record")["checkpoints"][3]
    last = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "epoch=0-step=4.ckpt"


def test_train_cli_rejects_checkpoints_only_at_the_end(tmp_path):
    result = run_train(
        tmp_path, "fit", "--config", str(SPD_CONFIGS / "tms_5-2.yaml"), "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=true", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "checkpoint.save_top_k=0" in result.stderr and "save_last: link" in result.stderr


def test_train_cli_missing_target_names_the_path(tmp_path):
    result = run_train(tmp_path, "fit", "--config", str(SPD_CONFIGS / "tms_5-2.yaml"), check=False)
    assert result.returncode != 0
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a user error: short, no traceback
    assert "does not exist" in result.stderr and "spd_targets/tms_5-2.pt" in result.stderr


@pytest.mark.slow
@pytest.mark.result
def test_shipped_tms_5_2_recipe_meets_acceptance(tmp_path):
    """The README commands: target, then the decomposition; per module 5 alive, MMCS >= 0.99, identity CI 0."""
    run_train(tmp_path, "fit", "--config", str(SPD_CONFIGS / "tms_5-2_target.yaml"), timeout=1800)
    checks = json.loads((tmp_path / "lightning_logs" / "version_0" / "target_checks.json").read_text())
    assert checks["passed"], checks
    run_train(tmp_path, "fit", "--config", str(SPD_CONFIGS / "tms_5-2.yaml"), timeout=3600)
    results = json.loads((tmp_path / "lightning_logs" / "version_1" / "spd_results.json").read_text())
    for name, row in results["modules"].items():
        assert row["alive_components"] == 5, (name, row)
        assert row["mmcs"] >= 0.99, (name, row)
        assert row["identity_ci_error"] == 0, (name, row)
    metrics = results["metrics"]
    assert metrics["recon/stochastic"] < 0.1 * metrics["target_output_sq"]
    assert metrics["recon/unmasked"] < 0.01 * metrics["target_output_sq"]


@pytest.mark.slow
def test_shipped_resid_mlp1_small_recipe_meets_acceptance(tmp_path):
    """The CPU-sized ResidMLP configs: mlp_in gets one component per feature (50 alive, identity CI error 0)."""
    run_train(tmp_path, "fit", "--config", str(SPD_CONFIGS / "resid_mlp1_small_target.yaml"), timeout=1800)
    run_train(tmp_path, "fit", "--config", str(SPD_CONFIGS / "resid_mlp1_small.yaml"), timeout=7200)
    results = json.loads((tmp_path / "lightning_logs" / "version_1" / "spd_results.json").read_text())
    row = results["modules"]["layers.0.mlp_in"]
    assert row["alive_components"] == 50 and row["identity_ci_error"] == 0 and row["mmcs"] >= 0.99, row
    metrics = results["metrics"]
    assert metrics["recon/stochastic"] < 0.05 * metrics["recon/zero"]


def test_language_model_targets_fuse_their_head_into_the_kl_unless_it_is_decomposed(tms_target):
    assert lm_module().build().output_head == "lm_head"
    assert lm_module(target_module_patterns=LM_PATTERNS | {"lm_head": 4}).build().output_head is None
    assert spd_module(tms_target).build().output_head is None
