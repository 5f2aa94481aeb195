"""Scaling out on CPU: 2-process DDP (gloo) through train.py against one process with the same global batch."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_modules.spd.targets import save_toy_target
from lightning_modules.spd.toy_models import TMSModel
from tests.helpers.cli import FAST, ROOT, TINY, run_train
from tests.helpers.fault_injection import read_params, read_record, record_yaml

DDP_CPU = ROOT / "configs" / "trainer" / "ddp_cpu.yaml"


def the_only_run_dir(cwd: Path) -> Path:
    """A DDP fit wrote one run directory, one TensorBoard event file and its checkpoints (rank 0 only)."""
    runs = list((cwd / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 1
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    return runs[0]


def assert_same_parameters(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, rtol: float
) -> None:
    """Every parameter tensor matches its namesake within atol + rtol * |expected|, elementwise."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        torch.testing.assert_close(
            actual[name], want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_no_needless_warnings(output: str) -> None:
    """Lightning's warnings that do not apply to our modules stay quiet: figures reduced by torchmetrics
    (no sync_dist advice) and frozen targets kept in eval mode on purpose."""
    assert "sync_dist=True" not in output
    assert "in eval mode at the start of training" not in output


def typical_change(out_dir: Path) -> float:
    """Median |change| of the parameter elements over the fit (rank 0): what a tolerance must be far below."""
    start, end = read_params(out_dir, 0, "start"), read_params(out_dir, 0, "end")
    return torch.cat([(end[n] - start[n]).abs().flatten() for n in start]).median().item()


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = [*FAST, "--trainer.max_steps=6", "--model.init_args.lr_decay_steps=6"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    # global batch 8: one process x 8, or two ranks x 4 (the sharded sampler splits the same 8 windows)
    run_train(
        single,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(record_yaml(single)),
        *common,
        "--data.init_args.batch_size=8",
    )
    result = run_train(
        ddp,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(DDP_CPU),
        "--config",
        str(record_yaml(ddp)),
        *common,
        "--data.init_args.batch_size=4",
        timeout=900,
    )
    one, rank0, rank1 = (
        read_record(single / "record"),
        read_record(ddp / "record", 0),
        read_record(ddp / "record", 1),
    )
    params = read_params(ddp / "record", 0)
    assert_same_parameters(read_params(ddp / "record", 1), params, atol=0, rtol=0)  # identical replicas
    # and they follow the single-process run, float reduction order aside
    assert_same_parameters(params, read_params(single / "record"), atol=5e-5, rtol=1e-4)  # seen: 4e-6
    assert typical_change(single / "record") > 20 * 5e-5  # six steps moved the weights far beyond it
    mean_first_loss = (rank0["losses"][1] + rank1["losses"][1]) / 2
    assert abs(mean_first_loss - one["losses"][1]) < 1e-4  # the two halves of the same global batch
    # one run directory, one set of TensorBoard events, checkpoints written once (rank 0)
    the_only_run_dir(ddp)
    assert_no_needless_warnings(result.stdout + result.stderr)


NPT_FAST = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=4",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.max_chars=150000",
    "--data.init_args.bpe_vocab_size=512",
    "--data.init_args.batch_size=2",
    "--data.init_args.block_size=32",
    "--data.init_args.num_workers=0",
    "--model.init_args.warmup_steps=2",
]


def test_ddp_two_processes_fit_npt(tmp_path):
    config = ROOT / "configs" / "npt" / "gpt_tiny.yaml"
    result = run_train(
        tmp_path,
        "fit",
        "--config",
        str(config),
        "--config",
        str(DDP_CPU),
        "--config",
        str(record_yaml(tmp_path)),
        *NPT_FAST,
        timeout=900,
    )
    rank0, rank1 = read_record(tmp_path / "record", 0), read_record(tmp_path / "record", 1)
    assert rank0["finite"] and rank0["losses"] != rank1["losses"]  # each rank read different windows
    # validation figures are reduced over ranks: every rank logs (and monitors) the same values
    assert {"val/loss", "val/equiv_rel", "val_stats/modulation_norm"} <= rank0["val_metrics"].keys()
    assert rank0["val_metrics"].keys() == rank1["val_metrics"].keys()
    for name, value in rank0["val_metrics"].items():
        assert rank1["val_metrics"][name] == pytest.approx(value, rel=1e-6), name
    # identical replicas: every tensor, frozen base and trained NP components alike
    assert_same_parameters(read_params(tmp_path / "record", 1), read_params(tmp_path / "record", 0), 0, 0)
    start, end = read_params(tmp_path / "record", 0, "start"), read_params(tmp_path / "record", 0, "end")
    assert all(torch.equal(end[n], start[n]) != (".np." in n) for n in start)  # only NP tensors trained
    the_only_run_dir(tmp_path)
    assert_no_needless_warnings(result.stdout + result.stderr)


SPD_TMS = ROOT / "configs" / "spd" / "tms_5-2.yaml"


def test_ddp_two_processes_fit_spd_toy_config_like_one_process(tmp_path):
    """The SPD TMS config on 2 ranks x 8 examples follows a one-process run at batch 16.

    The parity run uses the deterministic terms (importance minimality, CI-masked and unmasked recon,
    faithfulness): the stochastic masks are drawn per rank, so stochastic terms differ by design."""
    target = save_toy_target(tmp_path / "tms.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    deterministic = (
        "{importance_minimality: 0.003, ci_masked_recon: 1.0, unmasked_recon: 1.0, faithfulness: 1.0}"
    )
    common = [
        f"--model.init_args.target={target}",
        f"--model.init_args.objective.loss_coeffs={deterministic}",
        "--model.init_args.faithfulness_warmup.steps=3",
        "--trainer.max_steps=5",
        "--trainer.val_check_interval=5",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.val_batches=1",
    ]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    run_train(
        single, "fit", "--config", str(SPD_TMS), "--config", str(record_yaml(single)), *common,
        "--data.init_args.batch_size=16",
    )  # fmt: skip
    result = run_train(
        ddp, "fit", "--config", str(SPD_TMS), "--config", str(DDP_CPU), "--config", str(record_yaml(ddp)),
        *common, "--data.init_args.batch_size=8", timeout=900,
    )  # fmt: skip
    one = read_record(single / "record")
    rank0, rank1 = read_record(ddp / "record", 0), read_record(ddp / "record", 1)
    assert rank0["finite"] and rank0["losses"][1] != rank1["losses"][1]  # each rank took its own half
    params = read_params(ddp / "record", 0)
    assert_same_parameters(read_params(ddp / "record", 1), params, atol=0, rtol=0)  # identical replicas
    assert_same_parameters(params, read_params(single / "record"), atol=1e-6, rtol=1e-5)
    assert typical_change(single / "record") > 20 * 1e-6
    # the global loss is the mean of the two halves (every deterministic term is a batch mean)
    assert abs((rank0["losses"][1] + rank1["losses"][1]) / 2 - one["losses"][1]) < 1e-5 * (
        1 + abs(one["losses"][1])
    )
    run = the_only_run_dir(ddp)
    results = json.loads((run / "spd_results.json").read_text())  # written once, by rank 0
    assert set(results["modules"]) == {"linear1", "linear2"}
    assert_no_needless_warnings(result.stdout + result.stderr)


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "user_error"])
def test_train_main_destroys_the_process_group_it_joined(monkeypatch, tmp_path, fails):
    """A gloo group left to interpreter finalisation can abort a finished rank; main() destroys it first."""
    import train

    def joins_a_group() -> None:
        store = tmp_path / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        if fails:
            raise ValueError("model.init_args.lr=-1 must be positive")

    monkeypatch.setattr(train, "cli_main", joins_a_group)
    monkeypatch.setattr(sys, "argv", ["train.py", "fit"])
    assert train.main() == (2 if fails else 0)
    assert not dist.is_initialized()
