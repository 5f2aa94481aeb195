"""NPTLightningModule: losses, logging, frozen base, a short fit, checkpoints, bad input, train.py end to end."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.npt.module import NPTLightningModule, relative_mse
from tests.helpers.npt import TINY_GPT, VOCAB, npt_trainer, tiny_npt_module, token_loader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second BLAS thread only adds contention (conftest restores the count)."""
    torch.set_num_threads(1)
    yield


def _module(**kwargs) -> NPTLightningModule:
    return tiny_npt_module(**kwargs)


def _loader(n: int = 64, seq: int = 16, batch: int = 8) -> DataLoader:
    return token_loader(n, seq, batch)


def _trainer(tmp_path: Path, steps: int, **kwargs) -> pl.Trainer:
    return npt_trainer(tmp_path, steps, **kwargs)


def test_relative_mse_normalises_by_target_mean_square() -> None:
    t = torch.full((2, 3, 4), 2.0)
    assert relative_mse(t + 1.0, t).item() == pytest.approx(1.0 / 4.0)


@pytest.mark.parametrize("fidelity", ["kl", "mse"])
def test_losses_are_finite_and_zero_for_the_original(fidelity: str) -> None:
    module = _module(fidelity=fidelity)
    x = next(iter(_loader()))[0]
    out = module.losses(x, teacher_forced=True)
    assert {"loss", "equiv", "fidelity", "reg", "layers"} <= set(out) and len(out["layers"]) == 2
    assert all(torch.isfinite(out[k]) for k in ("loss", "equiv", "fidelity", "reg"))
    assert out["loss"].requires_grad
    module.npt.clear()
    with module.npt.original():  # NPT layers in original mode: no difference to the teacher
        teacher = module.npt.teacher_forward(x)
        assert module.fidelity(module.npt(x), teacher).abs().item() < 1e-6


def test_training_step_freezes_base_and_trains_np(tmp_path) -> None:
    module = _module(reg_weight=0.1)
    base = {k: v.clone() for k, v in module.state_dict().items() if ".np." not in k}
    np_before = {n: p.detach().clone() for n, p in module.npt.np_named_parameters()}
    assert all(not p.requires_grad for n, p in module.named_parameters() if ".np." not in n)
    grads = {}

    class GradSpy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads.update({n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None})
            groups = [p for g in optimizer.param_groups for p in g["params"]]
            assert {id(p) for p in groups} == {id(p) for p in pl_module.npt.np_parameters()}

    _trainer(tmp_path, 2, callbacks=[GradSpy()], limit_val_batches=0).fit(module, _loader())
    assert grads and all(".np." in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())
    assert len(grads) == len(np_before)
    for k, v in module.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), f"frozen weight {k} changed"
    assert any(not torch.equal(p, np_before[n]) for n, p in module.npt.np_named_parameters())


def test_short_fit_reduces_equivalence_loss_and_logs(tmp_path) -> None:
    module = _module(stats_every_n_steps=5, init_scale=1.0, rank=8, num_ranks=4)
    module.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.0)
    x_val = next(iter(_loader(n=8, seq=16)))[0]

    def equiv() -> float:
        with torch.no_grad():
            out = module.losses(x_val, teacher_forced=True)
        module.npt.clear()
        return out["equiv"].item()

    start = equiv()
    np_names = {n for n, _ in module.named_parameters() if ".np." in n}
    assert len(np_names) == len(list(module.npt.np_named_parameters())) == 2 * 3  # 2 layers x 3 tensors
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer(tmp_path, 80, val_check_interval=40, limit_val_batches=2, check_val_every_n_epoch=None)
    trainer.fit(module, _loader(n=320), _loader(n=16))
    end = equiv()
    assert end < 0.5 * start, (start, end)  # ~0.35 here
    after = dict(module.named_parameters())
    assert np_names < set(after)
    for name, p in after.items():  # every NP tensor trained, every base tensor untouched
        assert torch.equal(p, before[name]) != (name in np_names), name
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    saved = torch.load(tmp_path / "fit.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == np_names
    assert all(torch.equal(saved[n], after[n]) for n in np_names)
    logged = set(trainer.logged_metrics)
    expected = {
        "train/loss", "train/equiv", "train/fidelity", "train/reg", "train/layer1", "train/layer2",
        "stats/v_a_norm", "stats/v_b_norm", "stats/modulation_norm", "stats/cos_v_a_a", "stats/modulation_gap",
        "stats/layer2/modulation_gap", "val/equiv", "val/ppl_npt", "val/ppl_original", "val_stats/modulation_gap",
    }  # fmt: skip
    assert expected <= logged, expected - logged
    assert torch.isfinite(trainer.logged_metrics["stats/modulation_gap"])
    assert trainer.logged_metrics["val/ppl_npt"] != trainer.logged_metrics["val/ppl_original"]


def test_llama_target_trains_free_running(tmp_path) -> None:
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    module = NPTLightningModule(
        target_family="llama", target_config=cfg, vocab_size=VOCAB, rank=2, num_ranks=2, np_mode="triple",
        teacher_forced=False, fidelity="mse", warmup_steps=0,
    )  # fmt: skip
    assert module.npt.indices == [1] and module.npt.model.config.vocab_size == VOCAB
    _trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None).fit(
        module, _loader(n=16), _loader(n=8)
    )


def test_checkpoint_holds_only_np_parameters_and_must_match(tmp_path) -> None:
    module = _module()
    trainer = _trainer(tmp_path, 1, limit_val_batches=0)
    trainer.fit(module, _loader(n=8))
    path = tmp_path / "npt.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(".np." in k for k in ckpt["state_dict"])
    assert ckpt["npt_layers"] == [1, 2]
    restored = NPTLightningModule.load_from_checkpoint(path)
    for (n, p), (_, q) in zip(module.npt.np_named_parameters(), restored.npt.np_named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="rank"):
        NPTLightningModule.load_from_checkpoint(path, rank=3)
    with pytest.raises(ValueError, match="layers"):
        NPTLightningModule.load_from_checkpoint(path, layers="0:2")


def test_target_from_a_gpt_lightning_checkpoint(tmp_path) -> None:
    from lightning_modules.gpt import GPTConfig, GPTLightningModule

    gpt = GPTLightningModule(GPTConfig(vocab_size=VOCAB, **TINY_GPT), sample_tokens=0, warmup_steps=0)
    trainer = _trainer(tmp_path, 1, limit_val_batches=0)
    trainer.fit(gpt, _loader(n=8))
    trainer.save_checkpoint(tmp_path / "gpt.ckpt")
    module = _module(target_path=str(tmp_path / "gpt.ckpt"))
    x = next(iter(_loader(n=2)))[0]
    with torch.no_grad(), module.npt.original():
        torch.testing.assert_close(module.npt(x), gpt.model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vocab_size": 10_000, "target_path": "CKPT"}, ValueError, "embeds"),
        ({"layers": [3]}, ValueError, "out of range"),
        ({"rank": 0}, ValueError, "rank"),
        ({"num_ranks": 0}, ValueError, "num_ranks"),
        ({"fidelity": "js"}, ValueError, "fidelity"),
        ({"target_dtype": "int8"}, ValueError, "target_dtype"),
        ({"target_family": "bert"}, ValueError, "family"),
        ({"target_path": "/nonexistent/model"}, FileNotFoundError, "does not exist"),
        ({"np_mode": "dual"}, ValueError, "non-gated"),
        ({"target_path": "CKPT", "target_config": {"n_embd": 64}}, ValueError, "n_embd"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str, tmp_path) -> None:
    if kwargs.get("target_path") == "CKPT":
        from lightning_modules.gpt import GPT, GPTConfig

        gpt = GPT(GPTConfig(vocab_size=VOCAB, **TINY_GPT))
        state = {f"model.{k}": v for k, v in gpt.state_dict().items()}
        torch.save({"gpt_architecture": gpt.config.architecture(), "state_dict": state}, tmp_path / "t.ckpt")
        kwargs = {**kwargs, "target_path": str(tmp_path / "t.ckpt")}
        kwargs.setdefault("target_config", None)
    with pytest.raises(error, match=match):
        _module(**kwargs)


def test_setup_checks_block_size_and_precision(tmp_path) -> None:
    class Data(pl.LightningDataModule):
        block_size = 64

    module = _module()
    trainer = _trainer(tmp_path, 1)
    trainer.datamodule = Data()  # what LightningCLI would attach
    module.trainer = trainer
    with pytest.raises(ValueError, match="block_size=64"):
        module.setup("fit")
    half = _module(target_dtype="bfloat16")
    half.trainer = _trainer(tmp_path, 1)
    with pytest.raises(ValueError, match="mixed precision"):
        half.setup("fit")
    assert copy.deepcopy(_module()).npt.indices == [1, 2]


FAST = [
    "--trainer.max_steps=5",
    "--trainer.val_check_interval=5",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.max_chars=150000",
    "--data.init_args.bpe_vocab_size=512",
    "--data.init_args.batch_size=2",
    "--data.init_args.block_size=32",
    "--data.init_args.num_workers=0",
    "--model.init_args.warmup_steps=2",
]


def test_train_cli_fit_writes_np_only_checkpoint(tmp_path) -> None:
    config = str(ROOT / "configs" / "npt" / "gpt_tiny.yaml")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", config, *FAST],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5
    assert state["hyper_parameters"]["vocab_size"] == 512  # linked from the data
    # The same module before training (the NP init is seeded by np_seed, not the global seed): the
    # checkpoint holds exactly its NP tensors, each moved away from its initial value.
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    initial = {n: p for n, p in NPTLightningModule(**hparams).named_parameters() if ".np." in n}
    assert len(initial) == 2 * 3 and set(state["state_dict"]) == set(initial)  # layers 2, 3 x 3 tensors
    assert all(not torch.equal(state["state_dict"][n], p) for n, p in initial.items())


def test_validation_logs_each_key_from_one_place(tmp_path) -> None:
    """val/equiv_rel (the checkpoint monitor of the NPT configs) has one definition: the epoch's
    torchmetrics mean, equal to the mean of its per-layer values; validation steps do not log it too."""
    module = _module()
    logged_by: dict[str, set[str]] = {}
    log = module.log

    def spy(name: str, *args, **kwargs) -> None:
        logged_by.setdefault(name, set()).add(hook[0])
        log(name, *args, **kwargs)

    hook = ["other"]
    module.log = spy
    for hook_name in ("validation_step", "on_validation_epoch_end"):
        original = getattr(module, hook_name)

        def wrapped(*args, _original=original, _name=hook_name, **kwargs):
            hook[0] = _name
            try:
                return _original(*args, **kwargs)
            finally:
                hook[0] = "other"

        setattr(module, hook_name, wrapped)
    trainer = _trainer(tmp_path, 2, limit_val_batches=3)
    trainer.validate(module, _loader(n=24))
    twice = {k: v for k, v in logged_by.items() if len(v) > 1}
    assert not twice, twice
    assert logged_by["val/equiv_rel"] == {"on_validation_epoch_end"}
    metrics = trainer.callback_metrics
    layers = [metrics[f"val/equiv_rel_layer{i}"] for i in module.npt.indices]
    assert len(layers) == 2 and metrics["val/equiv_rel"].item() == pytest.approx(
        torch.stack(layers).mean().item()
    )
    assert not any(k.startswith("val/layer") and k.endswith("_rel") for k in metrics)
