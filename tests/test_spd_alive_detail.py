"""benchmarks/spd_alive_detail.py on a short TMS 5-2 run: alive components split into the features' own
and the others, with how the others fire."""

import pytest
import torch

from benchmarks.spd_alive_detail import alive_detail, component_weight_norms
from lightning_modules.spd.components import LinearComponents
from lightning_modules.spd.targets import save_toy_target
from lightning_modules.spd.toy_models import TMSModel
from tests.helpers.cli import ROOT, run_train

SPD_TMS = ROOT / "configs" / "spd" / "tms_5-2.yaml"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    target = save_toy_target(run / "tms.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    run_train(
        run, "fit", "--config", str(SPD_TMS), f"--model.init_args.target={target}",
        "--model.init_args.faithfulness_warmup.steps=3", "--trainer.max_steps=4",
        "--trainer.val_check_interval=4", "--data.init_args.batch_size=64", "--data.init_args.val_batches=1",
    )  # fmt: skip
    return run


def test_every_component_alive_at_a_negative_threshold(short_run):
    # every CI exceeds -1: all 20 components of each module are alive, the others being the 20 minus the
    # features' own, each firing on every input
    row = alive_detail(short_run, examples=256, seed=0, threshold=-1.0)
    assert row["global_step"] == 4 and row["examples"] == 256
    for m in row["modules"].values():
        assert m["alive"] == 20
        assert 1 <= m["features_own"] <= 5
        assert len(m["extra"]) == 20 - m["features_own"]
        assert all(e["inputs"] == 256 and e["rate"] == 1.0 for e in m["extra"])


def test_the_others_are_not_the_features_own_and_fire_above_the_threshold(short_run):
    row = alive_detail(short_run, examples=512, seed=1, threshold=0.1)
    assert set(row["modules"]) == {"linear1", "linear2"}
    for m in row["modules"].values():
        assert len(m["extra"]) <= m["alive"] <= 20
        for e in m["extra"]:
            assert e["max_ci"] > 0.1
            assert 1 <= e["inputs"] <= 512 and e["rate"] == e["inputs"] / 512
            assert e["mean_features_on"] >= 0


def test_evaluating_in_chunks_changes_nothing(short_run):
    # the same drawn inputs, evaluated 512 at once or 100 at a time (the last chunk short)
    whole = alive_detail(short_run, examples=512, seed=2, threshold=0.05, chunk=512)
    chunked = alive_detail(short_run, examples=512, seed=2, threshold=0.05, chunk=100)
    assert whole["modules"].keys() == chunked["modules"].keys()
    assert any(m["extra"] for m in whole["modules"].values())  # something to compare
    for name, m in whole["modules"].items():
        c = chunked["modules"][name]
        assert (m["alive"], m["features_own"]) == (c["alive"], c["features_own"])
        assert [e["component"] for e in m["extra"]] == [e["component"] for e in c["extra"]]
        for a, b in zip(m["extra"], c["extra"]):
            assert a["inputs"] == b["inputs"] and a["max_ci"] == b["max_ci"]
            assert a["mean_features_on"] == pytest.approx(b["mean_features_on"])


def test_weight_norms_are_each_components_rank_one_weight():
    # |V[:, c] U[c, :]|_F of each rank-one weight, against the product formed in full
    comp = LinearComponents(7, 5, C=4)
    with torch.no_grad():
        comp.U[2].mul_(1e-3)  # a component holding almost no weight
    norms = component_weight_norms(comp)
    full = torch.stack([torch.outer(comp.V[:, c], comp.U[c]).norm() for c in range(4)])
    torch.testing.assert_close(norms, full)
    assert norms[2] < 1e-2 * norms[[0, 1, 3]].min()


def test_rows_record_the_weight_the_others_hold(short_run):
    row = alive_detail(short_run, examples=256, seed=0, threshold=-1.0)
    for m in row["modules"].values():
        assert m["own_min_weight_norm"] > 0
        assert all(e["weight_norm"] >= 0 for e in m["extra"])
