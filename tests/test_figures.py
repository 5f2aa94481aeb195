"""Figures: every figure function returns a labelled, titled, readable matplotlib Figure (heatmaps with a
colour bar); a short SPD fit logs them to TensorBoard and writes PNGs; the re-render commands write PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from datamodules.sparse_features import SparseFeatureDataModule
from lightning_modules.common.plotting import log_figures, new_figure, save_figures
from lightning_modules.spd import figures as spd_fig
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.module import SPDLightningModule
from lightning_modules.spd.targets import save_toy_target
from lightning_modules.spd.toy_models import TMSModel, train_toy_model
from tests.helpers.trainers import quiet_trainer


def check_figure(fig: Figure, heatmap: bool = False) -> None:
    """Title, axis labels on every plotting axes, >= 640x480 pixels, a colour bar when heatmap."""
    width, height = fig.get_size_inches() * fig.dpi
    assert width >= 640 and height >= 480, (width, height)
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert plots
    suptitle = fig.get_suptitle()
    for ax in plots:
        assert ax.get_xlabel() and ax.get_ylabel(), ax
        assert ax.get_title() or suptitle, ax
    if heatmap:
        assert colorbars and all(cb.get_ylabel() for cb in colorbars)
        (image,) = plots[0].get_images()
        assert image.colorbar is not None and image.get_clim() in ((0.0, 1.0), (-1.0, 1.0))
    plt.close(fig)


def test_new_figure_is_at_least_640_by_480_outside_pyplot():
    before = plt.get_fignums()
    fig, ax = new_figure(size=(2, 2))
    assert tuple(fig.get_size_inches() * fig.dpi) >= (640, 480)
    assert plt.get_fignums() == before  # not in pyplot's registry: nothing to leak between validations
    assert log_figures([object()], {"x": fig}, step=0) == 0  # no TensorBoard logger: skipped


# ----------------------------------------------------------------------------- SPD


@pytest.fixture(scope="module")
def tms_model() -> TMSModel:
    torch.manual_seed(1)
    model = TMSModel(5, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_toy_model(model, steps=60, batch=256, seed=1)
    finally:
        torch.set_num_threads(threads)
    return model


def test_spd_figure_functions_label_everything(tms_model):
    cm = ComponentModel(tms_model, {"linear1": 8, "linear2": 8})
    counts = torch.tensor([1000.0, 30, 2, 0, 5] * 10)
    check_figure(spd_fig.ci_histogram_figure("linear1", counts, step=3))
    check_figure(spd_fig.component_density_figure("linear1", torch.rand(8) ** 4, 0.1, step=3))
    check_figure(spd_fig.single_feature_ci_figure("linear1", torch.rand(5, 8)), heatmap=True)
    check_figure(spd_fig.feature_cosine_figure("linear1", torch.rand(5, 8) * 2 - 1), heatmap=True)
    toys = spd_fig.toy_figures(cm, step=0)
    assert set(toys) == {f"{kind}/{name}" for kind in ("single_feature_ci", "feature_cosine", "tms_plane")
                         for name in ("linear1", "linear2")}  # fmt: skip
    for tag, fig in toys.items():
        check_figure(fig, heatmap=not tag.startswith("tms_plane"))
    l0 = {"transformer.h.0.mlp.c_fc": 3.5, "transformer.h.0.attn.c_proj": 0.02}
    check_figure(spd_fig.l0_figure(l0, {"transformer.h.0.mlp.c_fc": 6, "transformer.h.0.attn.c_proj": 4}))
    metrics = {"lm/ce_target": 3.0} | {f"lm/ce_{k}": 3.0 + i for i, k in enumerate(spd_fig.MASK_KINDS)}
    metrics |= {f"lm/kl_{k}": 10.0 ** (i - 3) for i, k in enumerate(spd_fig.MASK_KINDS)}
    fig = spd_fig.lm_mask_figure(metrics)
    assert fig.axes[1].get_yscale() == "log"  # KLs spanning decades
    check_figure(fig)


def test_tms_plane_draws_each_feature_and_its_component(tms_model):
    W = tms_model.linear1.weight.detach()  # (2, 5)
    V, U = torch.eye(5, 8), torch.zeros(8, 2)
    U[:5] = W.t()  # component j reproduces feature j exactly
    ci = torch.eye(5, 8)
    fig = spd_fig.tms_plane_figure("linear1", W, V, U, ci)
    lines = fig.axes[0].get_lines()
    ends = torch.tensor(np.array([line.get_xydata()[-1] for line in lines if len(line.get_xydata()) == 2]))
    for j in range(5):  # target (solid) and component (dashed) arrows end at the same point
        assert int(torch.isclose(ends, W[:, j].double(), atol=1e-6).all(1).sum()) == 2
    check_figure(fig)


def _tms_target(tmp_path: Path, tms_model: TMSModel) -> Path:
    return save_toy_target(tmp_path / "tms.pt", tms_model, "tms", {"n_features": 5, "n_hidden": 2})


DATA_ARGS = dict(n_features=5, feature_prob=0.05, batch_size=64, steps_per_epoch=50, val_batches=1)


def test_spd_fit_logs_figures_to_tensorboard_and_rerenders_from_checkpoint(tms_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = SPDLightningModule(
        target=str(_tms_target(tmp_path, tms_model)),
        target_module_patterns={"linear1": 8},
        objective={"loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 3e-3}},
        faithfulness_warmup={"steps": 2},
        cpu_threads=1,
    )
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=Path(logger.log_dir) / "checkpoints", save_last=True)],
    )
    trainer.fit(module, SparseFeatureDataModule(**DATA_ARGS))
    run = Path(trainer.log_dir)
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    kinds = ("ci_histogram", "component_density", "single_feature_ci", "feature_cosine", "tms_plane")
    for kind in kinds:
        images = events.Images(f"figures/{kind}/linear1")
        assert {im.step for im in images} >= {2, 4}  # each validation, and the end of fit
        assert images[-1].width >= 640 and images[-1].height >= 480
        assert (run / "figures" / kind / "linear1.png").is_file()  # beside spd_results.json
    assert (run / "spd_results.json").is_file()

    # re-render from the checkpoint: without config.yaml only the data-free figures ...
    paths = spd_fig.rerender(run, tmp_path / "data_free")
    assert {p.relative_to(tmp_path / "data_free").parts[0] for p in paths} == set(kinds[2:])
    # ... with the run's data section (what LightningCLI saves) all of them, through the command line
    data = {"class_path": "datamodules.sparse_features.SparseFeatureDataModule", "init_args": DATA_ARGS}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    assert spd_fig.main([str(run), "--out", str(tmp_path / "all"), "--batches", "1"]) == 0
    written = sorted(p.relative_to(tmp_path / "all").as_posix() for p in (tmp_path / "all").rglob("*.png"))
    assert written == sorted(f"{kind}/linear1.png" for kind in kinds)
    assert plt.get_fignums() == []  # nothing left open


@pytest.mark.parametrize("schedule", ["end", "off"])
def test_spd_figure_schedule_end_draws_once_and_off_draws_none(schedule, tms_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = SPDLightningModule(
        target=str(_tms_target(tmp_path, tms_model)),
        target_module_patterns={"linear1": 8},
        objective={"loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 3e-3}},
        evaluation={"figures": schedule},
        cpu_threads=1,
    )
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = quiet_trainer(
        tmp_path, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        logger=logger,
    )  # fmt: skip
    trainer.fit(module, SparseFeatureDataModule(**DATA_ARGS))
    run = Path(trainer.log_dir)
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    steps = {im.step for tag in events.Tags()["images"] for im in events.Images(tag)}
    assert steps == ({4} if schedule == "end" else set())  # step 2's validation drew nothing
    assert (run / "figures").is_dir() == (schedule == "end")
    assert (run / "spd_results.json").is_file()


def test_spd_figure_schedule_rejects_unknown_values():
    from lightning_modules.spd.config import EvalConfig

    with pytest.raises(ValueError, match="valid: \\['all', 'end', 'off'\\]"):
        EvalConfig(figures="sometimes")


def test_spd_rerender_of_a_language_model_run_draws_l0_and_mask_figures(tmp_path):
    from lightning_modules.gpt.config import GPTConfig

    module = SPDLightningModule(
        target=None,
        random_target=GPTConfig(block_size=16, vocab_size=48, n_layer=1, n_head=2, n_embd=8),
        vocab_size=48,
        target_module_patterns={"transformer.h.0.mlp.c_fc": 6},
        objective={
            "loss_coeffs": {"stochastic_recon": 1.0, "importance_minimality": 1e-3},
            "output_loss_type": "kl",
        },
        faithfulness_warmup={"steps": 0},
    )
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = quiet_trainer(
        tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=logger,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=Path(logger.log_dir) / "checkpoints", save_last=True)],
    )  # fmt: skip
    trainer.fit(module, TokenData(vocab_size=48, seq=8))
    run = Path(trainer.log_dir)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {
                    "class_path": "tests.test_figures.TokenData",
                    "init_args": {"vocab_size": 48, "seq": 8},
                }
            }
        )
    )
    paths = spd_fig.rerender(run, tmp_path / "out", batches=1)
    names = {p.relative_to(tmp_path / "out").as_posix() for p in paths}
    name = "transformer.h.0.mlp.c_fc"
    assert names == {"l0.png", "lm_masks.png", f"ci_histogram/{name}.png", f"component_density/{name}.png"}


def test_rerender_commands_name_what_is_missing(tmp_path, capsys):
    from lightning_modules.npt import figures as npt_fig

    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        spd_fig.rerender(tmp_path)
    assert spd_fig.main([str(tmp_path)]) == 2 and "last.ckpt" in capsys.readouterr().err
    assert npt_fig.main([str(tmp_path)]) == 2 and "npt_results.json" in capsys.readouterr().err


def test_save_figures_mirrors_tags_as_directories(tmp_path):
    fig, _ = new_figure()
    (path,) = save_figures({"a/b.c": fig}, tmp_path)
    assert path == tmp_path / "a" / "b.c.png" and path.stat().st_size > 0


# ----------------------------------------------------------------------------- NPT


def synthetic_history(layers: tuple[int, ...] = (1, 2), steps: tuple[int, ...] = (10, 20, 30)) -> dict:
    history: dict[str, list[tuple[int, float]]] = {}
    for i in layers:
        history[f"equiv_rel/layer{i}"] = [(s, 0.5 / (s * (i + 1))) for s in steps]
    history["equiv_rel"] = [(s, 0.3 / s) for s in steps]
    history["ppl_original"] = [(s, 30.0) for s in steps]
    history["ppl_npt"] = [(s, 30.0 + 300 / s) for s in steps]
    history["ppl_attention_dropped"] = [(s, 4000.0) for s in steps]
    return history


def test_npt_figure_functions_label_everything():
    from lightning_modules.npt import figures as npt_fig

    history = synthetic_history()
    fig = npt_fig.equivalence_error_figure(history, step=30)
    assert fig.axes[0].get_yscale() == "log"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "layer 1",
        "layer 2",
        "mean over layers",
    ]
    check_figure(fig)
    fig = npt_fig.perplexity_figure(history)
    assert len(fig.axes[0].get_lines()) == 3 and fig.axes[0].get_yscale() == "log"
    check_figure(fig)
    norms = {1: torch.rand(2, 16) * 1e-3, 2: torch.rand(2, 16)}
    check_figure(npt_fig.modulation_norm_figure(norms))


class TokenData(pl.LightningDataModule):
    """Random (x, y) token batches; importable, so a run's config.yaml can name it."""

    def __init__(self, vocab_size: int = 64, seq: int = 16, n: int = 32) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        tokens = torch.randint(0, vocab_size, (n, seq + 1), generator=torch.Generator().manual_seed(0))
        self.data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=8)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=8)


def test_npt_rerender_draws_history_and_modulation_norms(tmp_path):
    from lightning_modules.npt import figures as npt_fig
    from lightning_modules.npt.module import NPTLightningModule

    torch.set_num_threads(1)
    module = NPTLightningModule(
        target_config=dict(block_size=32, n_layer=3, n_head=2, n_embd=32), vocab_size=64, layers="1:3", rank=4,
        num_ranks=2,
    )  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=Path(logger.log_dir) / "checkpoints", save_last=True)],
    )
    trainer.fit(module, TokenData())
    run = Path(trainer.log_dir)
    history = json.loads((run / "npt_results.json").read_text())["history"]
    assert [s for s, _ in history["ppl_npt"]] == [2, 4]
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"class_path": "tests.test_figures.TokenData"}}))
    assert npt_fig.main([str(run), "--norms"]) == 0
    written = {p.name for p in (run / "figures").glob("*.png")}
    assert written == {"equivalence_error.png", "perplexity.png", "modulation_norm.png"}


# ----------------------------------------------------------------------------- GPT


@pytest.mark.parametrize(
    "switches",
    [{}, {"rope": True, "n_kv_head": 1, "qk_norm": True, "sliding_window": 3}],
    ids=["base", "mixed"],
)
def test_attention_patterns_reproduce_the_sdpa_output(switches):
    from lightning_modules.gpt.config import GPTConfig
    from lightning_modules.gpt.figures import attention_patterns
    from lightning_modules.gpt.model import GPT

    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=16, **switches)
    model = GPT(config).eval()
    idx = torch.randint(0, 32, (2, 10))
    heads = [(1, h) for h in range(4)]
    attn = model.transformer.h[1].attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][:1])),
        attn.c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0][:1])),
    ]
    patterns = attention_patterns(model, idx, heads)
    for hook in hooks:
        hook.remove()
    kv, d = config.n_kv_head, config.head_size
    v = attn.c_attn(seen["x"])[..., -kv * d :].view(10, kv, d).transpose(0, 1)  # (kv, s, d)
    for (_, h), p in patterns.items():
        assert torch.allclose(p.sum(-1), torch.ones(10)) and p.triu(1).abs().max() == 0  # causal rows
        y_h = p @ v[h // (4 // kv)]  # (s, d)
        assert torch.allclose(y_h, seen["y"][0, :, h * d : (h + 1) * d], atol=1e-5)


def test_gpt_validation_logs_the_attention_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_modules.gpt.config import GPTConfig
    from lightning_modules.gpt.figures import validation_attention_figure
    from lightning_modules.gpt.module import GPTLightningModule

    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
    module = GPTLightningModule(
        config, vocab_size=64, warmup_steps=0, sample_tokens=0, attention_figures=True
    )
    check_figure(
        validation_attention_figure(module.model, torch.randint(0, 64, (1, 16)), lambda t: f"t{t}"), True
    )
    trainer = quiet_trainer(
        tmp_path, max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, logger=TensorBoardLogger(tmp_path, name="logs"),
    )  # fmt: skip
    trainer.fit(module, TokenData(vocab_size=64, seq=16))
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0}).Reload()
    (image,) = events.Images("figures/attention")
    assert image.step == 2 and image.width >= 640


# ----------------------------------------------------------------------------- benchmark plots


def test_benchmark_plots_draw_every_results_file_and_the_docs_have_them(tmp_path):
    from benchmarks import plots

    stems = set(plots.plotted())
    assert {
        "muon_vs_adamw",
        "spd_speed_cpu",
        "npt_component_small_cpu",
        "npt_component_sweep_cpu",
        "gpt_speed_tiny_cpu",
    } <= stems
    assert plots.plotted()["npt_component_sweep_cpu"] is plots.plot_npt_component_sweep
    assert plots.plotted()["npt_component_small_cpu"] is plots.plot_npt_component
    for stem, plotter in plots.plotted().items():
        check_figure(plotter(json.loads((plots.RESULTS_DIR / f"{stem}.json").read_text())))
    assert plots.main(["--out", str(tmp_path)]) == 0
    assert {p.stem for p in tmp_path.glob("*.png")} == stems
    assert plots.missing() == [], "run `python -m benchmarks.plots` and commit docs/img"
    docs = (plots.REPO_ROOT / "docs" / "benchmarks.md").read_text()
    for stem in stems:
        assert f"(img/{stem}.png)" in docs
