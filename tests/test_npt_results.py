"""NPT metrics and baselines: equiv_rel, the dropped-attention baseline, perplexities, npt_results.json,
the validation history, modulation norms, the sequential schedule, bf16 storage and the linear ablation."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.npt.components import NPComponent
from lightning_modules.npt.convert import convert, load_target
from lightning_modules.npt.module import NPTLightningModule, recovered_fraction, update_relative_mse
from lightning_modules.npt.storage import frozen_bytes
from tests.helpers.npt import TINY_GPT, npt_trainer, tiny_npt_module, token_loader


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second BLAS thread only adds contention (conftest restores the count)."""
    torch.set_num_threads(1)
    yield


def _module(**kwargs) -> NPTLightningModule:
    return tiny_npt_module(**kwargs)


def _loader(n: int = 32, seq: int = 16, batch: int = 8) -> DataLoader:
    return token_loader(n, seq, batch)


def _trainer(tmp_path: Path, steps: int, **kwargs) -> pl.Trainer:
    return npt_trainer(tmp_path, steps, **{"limit_val_batches": 2, **kwargs})


def _zero_modulation(module: NPTLightningModule) -> None:
    with torch.no_grad():
        for layer in module.npt.npt_layers:
            layer.np.W_a_up.zero_()
            layer.np.W_b_up.zero_()


# ---------------------------------------------------------------------------------------------- metrics
def test_update_relative_mse_divides_by_what_the_layer_adds() -> None:
    h = torch.full((2, 3, 4), 10.0)
    t = h + 2.0  # the layer adds 2 everywhere: mean square 4
    assert update_relative_mse(t + 1.0, t, h).item() == pytest.approx(1.0 / 4.0)
    assert update_relative_mse(t, t, h).item() == 0.0


def test_recovered_fraction() -> None:
    assert recovered_fraction(120.0, 100.0, 100.0) == pytest.approx(1.0)
    assert recovered_fraction(120.0, 120.0, 100.0) == pytest.approx(0.0)
    assert recovered_fraction(120.0, 104.0, 100.0) == pytest.approx(0.8)
    assert torch.isnan(torch.tensor(recovered_fraction(100.0, 101.0, 100.0)))


def test_losses_report_equiv_rel_per_layer() -> None:
    module = _module()
    x = next(iter(_loader()))[0]
    out = module.losses(x, teacher_forced=True)
    assert out["run"] == [1, 2] and len(out["layers_rel"]) == 2
    layer = module.npt.layers[2]
    y, t, h = layer.io["output"], layer.io["teacher_output"], layer.io["input"]
    manual = (y - t).square().mean() / (t - h).square().mean()
    assert out["layers_rel"][1].item() == pytest.approx(manual.item(), rel=1e-5)
    # the reference normalisation is larger: what a layer adds is a fraction of the residual stream
    assert all(r > e for r, e in zip(out["layers_rel"], out["layers"]))


def test_dropped_layer_is_the_npt_layer_with_zero_modulation() -> None:
    module = _module()
    x = next(iter(_loader()))[0]
    with torch.no_grad(), module.npt.mode("dropped"):
        dropped = module.npt(x)
    _zero_modulation(module)
    with torch.no_grad():
        npt = module.npt(x)
        with module.npt.original():
            original = module.npt(x)
    torch.testing.assert_close(npt, dropped, rtol=1e-5, atol=1e-5)
    assert (original - dropped).abs().max() > 1e-3  # dropping the attention changes the model


def test_validation_logs_three_perplexities_and_writes_results(tmp_path) -> None:
    module = _module()
    trainer = _trainer(tmp_path, 4, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(module, _loader(), _loader())
    m = trainer.callback_metrics
    for name in ("ppl_original", "ppl_npt", "ppl_attention_dropped", "recovered", "equiv_rel"):
        assert f"val/{name}" in m, name
    assert {"val/equiv_rel_layer1", "val/equiv_rel_layer2", "val/layer1", "train/layer1_rel"} <= set(m)
    assert "val/layer1_rel" not in m  # one name per figure: val/equiv_rel_layer1
    expected = recovered_fraction(
        float(m["val/ppl_attention_dropped"]), float(m["val/ppl_npt"]), float(m["val/ppl_original"])
    )
    assert float(m["val/recovered"]) == pytest.approx(expected, rel=1e-4, nan_ok=True)  # NaN: no cost
    # history: one point per validation (steps 2 and 4), for every perplexity and per-layer equiv_rel
    for name in ("ppl_original", "ppl_npt", "ppl_attention_dropped", "equiv_rel/layer1", "equiv_rel/layer2"):
        assert [s for s, _ in module.val_history[name]] == [2, 4], name
    results = json.loads((tmp_path / "npt_results.json").read_text())
    assert set(results["layers"]) == {"1", "2"} and "equiv_rel" in results["layers"]["1"]
    for name in ("equiv_rel", "ppl_original", "ppl_npt", "ppl_attention_dropped", "recovered"):
        assert isinstance(results[name], float), name
    assert results["history"]["ppl_npt"][0][0] == 2 and len(results["history"]["ppl_npt"]) == 2
    assert results["recovered"] == pytest.approx(
        recovered_fraction(results["ppl_attention_dropped"], results["ppl_npt"], results["ppl_original"]),
        nan_ok=True,
    )


def test_val_history_survives_a_checkpoint(tmp_path) -> None:
    module = _module()
    module.val_history = {"ppl_npt": [(10, 5.0), (20, 4.0)]}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    fresh = _module()
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.val_history == {"ppl_npt": [(10, 5.0), (20, 4.0)]}


def test_modulation_norms_per_token_and_zero_without_modulation() -> None:
    module = _module()
    x = next(iter(_loader()))[0]
    norms = module.modulation_norms(x)
    assert set(norms) == {1, 2} and all(n.shape == x.shape for n in norms.values())
    assert all((n > 0).all() for n in norms.values())
    _zero_modulation(module)
    assert all(n.abs().max() == 0 for n in module.modulation_norms(x).values())


def test_validation_keeps_the_first_batch_norms_from_its_own_pass() -> None:
    """The histogram's norms come from the validation pass itself (no second forward), equal to a fresh
    free-running pass on the same tokens, and only the first batch's are kept."""
    module = _module()
    module.eval()
    batches = iter(_loader())
    x, y = next(batches)
    module._eval_batch(x, y, keep_norms=True)
    kept = module._figure_norms
    module.npt.clear()
    fresh = module.modulation_norms(x)
    assert set(kept) == set(fresh) == {1, 2}
    for i in fresh:
        torch.testing.assert_close(kept[i], fresh[i])
    x2, y2 = next(batches)
    module._eval_batch(x2, y2)
    assert module._figure_norms is kept


# ---------------------------------------------------------------------------------------------- sequential
def test_sequential_needs_matching_max_steps(tmp_path) -> None:
    with pytest.raises(ValueError, match="steps_per_layer"):
        _module(schedule="sequential")
    module = _module(schedule="sequential", steps_per_layer=3)
    with pytest.raises(ValueError, match="max_steps to 6"):
        _trainer(tmp_path, 5).fit(module, _loader())


def test_sequential_trains_one_layer_at_a_time_and_restarts_the_lr(tmp_path) -> None:
    module = _module(schedule="sequential", steps_per_layer=3, warmup_steps=1, optimizer=torch.optim.AdamW)

    def snapshot() -> dict[int, torch.Tensor]:
        return {i: torch.cat([p.detach().flatten().clone() for p in layer.np.parameters()])
                for i, layer in zip(module.npt.indices, module.npt.npt_layers)}  # fmt: skip

    seen: list[dict[int, torch.Tensor]] = []
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(snapshot())
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, 6, callbacks=[Record()]).fit(module, _loader(n=64))
    seen.append(snapshot())
    assert [module.active_layer(s) for s in range(6)] == [1, 1, 1, 2, 2, 2]
    assert not torch.equal(seen[0][1], seen[3][1]) and torch.equal(seen[0][2], seen[3][2])  # layer 1 only
    assert torch.equal(seen[3][1], seen[6][1]) and not torch.equal(seen[3][2], seen[6][2])  # then layer 2
    assert lrs[3] == pytest.approx(lrs[0]) and lrs[2] < lrs[1]  # warmup + cosine again for layer 2


def test_sequential_losses_cover_the_active_layer_only() -> None:
    module = _module(schedule="sequential", steps_per_layer=2)
    x = next(iter(_loader()))[0]
    out = module.losses(x, teacher_forced=True, active=2)
    assert out["run"] == [2]
    out["loss"].backward()
    assert all(p.grad is None for p in module.npt.layers[1].np.parameters())
    module.npt.clear()
    out = module.losses(x, teacher_forced=False, active=2)  # free-running: layer 1 runs as NPT, frozen
    assert out["run"] == [1, 2] and out["equiv"] == out["layers"][1]


def test_identity_init_of_the_first_component() -> None:
    comp = NPComponent(32, 64, rank=8, num_ranks=3, init="identity", seed=0)
    w = comp.W_a_up[0].detach()
    assert w[torch.arange(8), torch.arange(8)].mean() == pytest.approx(1.0, abs=0.1)
    off = w.clone()
    off[torch.arange(8), torch.arange(8)] = 0.0
    assert off.std() == pytest.approx(0.1, rel=0.2)
    plain = NPComponent(32, 64, rank=8, num_ranks=3, seed=0)
    torch.testing.assert_close(comp.W_a_up[1:], plain.W_a_up[1:])  # the other components keep their draw


# ---------------------------------------------------------------------------------------------- bf16 storage
@pytest.mark.parametrize("family", ["gpt", "gpt2"])
def test_bf16_storage_halves_frozen_memory_and_stays_close(family: str) -> None:
    config = TINY_GPT if family == "gpt" else dict(n_layer=3, n_head=2, n_embd=32, n_positions=32)
    torch.manual_seed(0)
    fp32 = _module(target_family=family, target_config=config)
    torch.manual_seed(0)
    bf16 = _module(target_family=family, target_config=config, frozen_dtype="bfloat16")
    assert frozen_bytes(bf16) * 2 == frozen_bytes(fp32)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in bf16.npt.np_parameters())
    x = next(iter(_loader()))[0]
    a, b = fp32.losses(x, teacher_forced=False), bf16.losses(x, teacher_forced=False)
    # stated tolerance: bf16-rounded weights move the logits by under 2% of their scale
    scale = a["teacher"].abs().max()
    assert (a["teacher"] - b["teacher"]).abs().max() < 0.02 * scale
    assert (a["logits"] - b["logits"]).abs().max() < 0.02 * scale
    b["loss"].backward()
    assert all(p.grad is not None for p in bf16.npt.np_parameters())
    assert bf16.npt.layer_stats()[2]["modulation_gap"].isfinite()  # exact patch reads the cast weight


# ---------------------------------------------------------------------------------------------- linear ablation
@pytest.mark.parametrize("mode", ["single", "dual", "triple"])
def test_linear_modulation_same_parameters_zero_init_and_gradients(mode: str) -> None:
    def count(kind: str) -> int:
        return sum(p.numel() for p in NPComponent(16, 40, 4, 3, mode, modulation=kind).parameters())

    assert count("linear") == count("quadratic")
    family = "gpt" if mode == "single" else "llama"
    config = TINY_GPT if mode == "single" else dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    module = _module(target_family=family, target_config=config, np_mode=mode, modulation="linear")
    x = next(iter(_loader()))[0]
    out = module.losses(x, teacher_forced=False)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in module.npt.np_parameters())
    module.npt.clear()
    with torch.no_grad():
        for p in module.npt.np_parameters():
            if p is not None and p.shape[-2] == module.hparams.rank:  # every up matrix (k, r, n)
                p.zero_()
        with module.npt.mode("dropped"):
            dropped = module.npt(x)
        torch.testing.assert_close(module.npt(x), dropped, rtol=1e-5, atol=1e-5)


def test_linear_is_linear_and_quadratic_is_quadratic_in_the_attention_output() -> None:
    torch.manual_seed(0)
    for kind, power in (("linear", 1), ("quadratic", 2)):
        model, _ = load_target(None, "gpt", TINY_GPT)
        layer = convert(model, [1], rank=4, num_ranks=2, seed=0, modulation=kind).npt_layers[0]
        a, u = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
        with torch.no_grad():
            torch.testing.assert_close(
                layer.in_modulation(2 * a, u), 2**power * layer.in_modulation(a, u), rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(modulation="cubic"), "modulation"),
        (dict(np_init="zeros"), "np_init"),
        (dict(schedule="random"), "schedule"),
        (dict(schedule="sequential", steps_per_layer=0), "steps_per_layer"),
        (dict(frozen_dtype="int8"), "frozen_dtype"),
        (dict(frozen_dtype="bfloat16", target_dtype="bfloat16"), "frozen_dtype"),
        (dict(final_eval_batches=0), "final_eval_batches"),
    ],
)
def test_new_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_fit_logs_the_npt_figures_to_tensorboard_and_saves_pngs(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = _module()
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = _trainer(tmp_path, 4, val_check_interval=2, check_val_every_n_epoch=None, logger=logger)
    trainer.fit(module, _loader(), _loader())
    run = Path(logger.log_dir)
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    for name in ("equivalence_error", "perplexity", "modulation_norm"):
        images = events.Images(f"figures/{name}")
        assert {im.step for im in images} == {2, 4}, name  # each validation (the end of fit is step 4 too)
        assert images[-1].width >= 640 and images[-1].height >= 480
        assert (run / "figures" / f"{name}.png").is_file()  # beside npt_results.json
    assert (run / "npt_results.json").is_file()
