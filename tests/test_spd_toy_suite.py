"""The toy-suite recipes (configs/spd/tms_*, resid_mlp*) agree with their targets, and the suite's verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import spd_toy_suite
from benchmarks.spd_toy_suite import CRITERIA, VARIANTS, Machine, base_suite, judge, parse_seeds

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "spd"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("suite", sorted(CRITERIA))
def test_recipe_matches_its_target(suite):
    """Same n_features in the target, its data and the decomposition's data; C covers the features; the
    decomposition reads the file the target writes (a variant: its base's recipe)."""
    target, spd = _load(f"{base_suite(suite)}_target"), _load(base_suite(suite))
    n = target["model"]["init_args"]["model_kwargs"]["n_features"]
    assert target["data"]["init_args"]["n_features"] == n
    assert spd["data"]["init_args"]["n_features"] == n
    assert spd["data"]["init_args"]["feature_prob"] == target["data"]["init_args"]["feature_prob"]
    assert spd["model"]["init_args"]["target"] == target["model"]["init_args"]["save_path"]
    assert all(c >= n for c in spd["model"]["init_args"]["target_module_patterns"].values())
    assert CRITERIA[suite].alive == n


@pytest.mark.parametrize(
    ("suite", "d_embed", "d_mlp", "n_layers", "n_features", "C", "steps"),
    [("resid_mlp1", 1000, 50, 1, 100, 100, 20_000), ("resid_mlp2", 1000, 25, 2, 100, 400, 25_000),
     ("resid_mlp3", 1000, 17, 3, 102, 500, 50_000)],
)  # fmt: skip
def test_resid_mlp_recipes_have_the_reference_sizes(suite, d_embed, d_mlp, n_layers, n_features, C, steps):
    """goodfire-ai/spd 3f0bb61's resid_mlp{1,2,3} sizes, C and step counts."""
    kwargs = _load(f"{suite}_target")["model"]["init_args"]["model_kwargs"]
    assert (kwargs["d_embed"], kwargs["d_mlp"], kwargs["n_layers"], kwargs["n_features"]) == (
        d_embed, d_mlp, n_layers, n_features,
    )  # fmt: skip
    spd = _load(suite)
    assert set(spd["model"]["init_args"]["target_module_patterns"].values()) == {C}
    assert spd["trainer"]["max_steps"] == steps


# goodfire-ai/spd 3f0bb61, spd/experiments/resid_mlp/resid_mlp{1,2,3}_config.yaml: the loss terms (ours by
# their names here), importance p, CI function, lr and faithfulness warm-up weight decay; the 2-layer's PGD
# term is PGDReconSubsetLoss (routed to uniform k-subsets), one step of size 1, sources shared by the batch
REFERENCE_RECIPES = {
    "resid_mlp1": ({"importance_minimality": 1e-5, "stochastic_recon_layerwise": 1.0, "stochastic_recon": 1.0},
                   2.0, "mlp", [16], 2e-3, 0.1),
    "resid_mlp2": ({"importance_minimality": 1e-4, "stochastic_recon_subset": 2.0, "pgd_recon_subset": 2.0},
                   2.0, "shared_mlp", [256], 3e-4, 0.0),
    "resid_mlp3": ({"importance_minimality": 1e-5, "stochastic_recon_layerwise": 1.0, "stochastic_recon": 1.0},
                   2.0, "mlp", [128], 1e-3, 0.1),
}  # fmt: skip


@pytest.mark.parametrize("suite", sorted(REFERENCE_RECIPES))
def test_resid_mlp_recipes_have_the_reference_objective(suite):
    """The shipped ResidMLP recipes' loss terms and settings are the reference's (no term swapped for a
    near relative, such as an all-modules PGD term for its subset one)."""
    coeffs, p, ci_type, hidden, lr, warmup_wd = REFERENCE_RECIPES[suite]
    init = _load(suite)["model"]["init_args"]
    objective = init["objective"]
    assert {k: v for k, v in objective["loss_coeffs"].items() if v > 0} == coeffs
    assert objective["importance_p"] == p and objective["importance_p_end"] is None
    assert (init["components"]["ci_fn_type"], init["components"]["ci_fn_hidden_dims"]) == (ci_type, hidden)
    assert init["optimizer"]["init_args"]["lr"] == lr and init["min_lr_ratio"] == 1.0  # constant
    assert init["faithfulness_warmup"] == {"steps": 200, "lr": 0.01, "weight_decay": warmup_wd}
    if "pgd_recon_subset" in coeffs:
        pgd = objective["pgd"]
        assert {k: pgd[k] for k in ("n_steps", "step_size", "init", "mask_scope")} == {
            "n_steps": 1, "step_size": 1.0, "init": "random", "mask_scope": "shared_across_batch"
        }  # fmt: skip
        # its evaluation's PGDReconLoss: 20 steps of 0.1 on one batch, all modules, one shared source
        multibatch = (pgd["multibatch_n_batches"], pgd["multibatch_n_steps"], pgd["multibatch_step_size"])
        assert multibatch == (1, 20, 0.1)
        assert pgd["multibatch_routings"] == ["all"]
        assert objective.get("subset_routing", "uniform_k_subset") == "uniform_k_subset"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_overlays_its_base_recipe(variant, tmp_path, monkeypatch):
    """A variant suite runs train.py on its base config with its overlay after it: the overlay's keys win
    and the base's other settings stay (the overlay sets only what it changes)."""
    from train import cli_main

    files = spd_toy_suite.suite_configs(variant)
    assert files == [CONFIGS / f"{VARIANTS[variant]}.yaml", CONFIGS / "variants" / f"{variant}.yaml"]
    assert spd_toy_suite.config_args(variant) == ["--config", str(files[0]), "--config", str(files[1])]
    assert spd_toy_suite.config_steps(variant) == spd_toy_suite.config_steps(VARIANTS[variant])
    monkeypatch.chdir(tmp_path)
    args = [*spd_toy_suite.config_args(variant), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false"]  # fmt: skip
    objective = cli_main(args, run=False).model.hparams["objective"]
    overlay = yaml.safe_load(files[1].read_text())["model"]["init_args"]["objective"]
    base = _load(VARIANTS[variant])["model"]["init_args"]["objective"]
    for key, value in {**base, **overlay}.items():
        if isinstance(value, dict):
            assert {k: objective[key][k] for k in value} == value, key
        else:
            assert objective[key] == value, key


def test_parse_seeds():
    assert parse_seeds("10-12,21") == [10, 11, 12, 21]
    assert parse_seeds("3") == [3]


def _results(alive: float, mmcs: float, err: float) -> dict:
    row = {"alive_components": alive, "mmcs": mmcs, "identity_ci_error": err}
    return {"modules": {"linear1": dict(row), "linear2": dict(row)}}


def test_judge_names_each_failed_criterion():
    assert judge("tms_5-2", _results(5.0, 0.999, 0.0), 100.0) == (True, [])
    passed, failures = judge("tms_5-2", _results(6.0, 0.98, 1.0), 700.0)
    assert not passed
    text = "; ".join(failures)
    assert "6 alive (want 5)" in text and "MMCS 0.98" in text and "identity CI error 1.0" in text
    assert "wall 700 s" in text


def test_judge_checks_only_mlp_in_for_resid_mlp():
    dense = {"alive_components": 100.0, "mmcs": 0.5, "identity_ci_error": 37.0}
    ok = {"alive_components": 100.0, "mmcs": 0.999, "identity_ci_error": 0.0}
    results = {"modules": {"layers.0.mlp_in": ok, "layers.0.mlp_out": dense}}
    assert judge("resid_mlp1", results, 1e4) == (True, [])


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_run_train_puts_the_shipped_config_on_the_chosen_machine(accelerator, tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, cwd, stdout, stderr, env):
        seen.update(cmd=cmd, env=env)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(spd_toy_suite.subprocess, "run", fake_run)
    rc, _ = spd_toy_suite.run_train(["--config", "x.yaml"], tmp_path / "log", Machine(3, accelerator))
    cmd = seen["cmd"]
    assert rc == 0 and cmd[cmd.index("fit") + 1 : cmd.index("fit") + 3] == ["--config", "x.yaml"]
    # the override comes after --config, so it wins over the shipped `accelerator: cpu`
    assert cmd[cmd.index("--trainer.accelerator") + 1] == accelerator
    assert cmd.index("--trainer.accelerator") > cmd.index("--config")
    assert seen["env"]["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("figures", [None, "end"])
def test_decompose_overrides_figures_only_when_asked(figures, tmp_path, monkeypatch):
    seen = {}

    def fake_run_train(args, log, machine, append=False):
        seen["args"] = args
        return 1, 0.5  # a failed run: decompose returns its row without reading results

    monkeypatch.setattr(spd_toy_suite, "run_train", fake_run_train)
    row = spd_toy_suite.decompose("tms_5-2", 3, {"path": "t.pt"}, tmp_path, Machine(), None, figures)
    args = seen["args"]
    if figures is None:
        assert "--model.init_args.evaluation.figures" not in args and "figures" not in row
    else:
        assert args[args.index("--model.init_args.evaluation.figures") + 1] == "end"
        assert row["figures"] == "end"
    assert row["ran"] is False and row["failures"] == ["train.py exited 1"]


def test_target_only_trains_the_target_and_writes_no_results(tmp_path, monkeypatch):
    calls = []

    def fake_ensure_target(suite, work, machine, max_steps=None):
        calls.append((suite, work))
        return {"path": str(work / "targets" / f"{suite}.pt"), "checks": {"mse": 0.1}}

    monkeypatch.setattr(spd_toy_suite, "ensure_target", fake_ensure_target)
    out = tmp_path / "results.json"
    argv = ["--suite", "tms_40-10_anneal", "--target-only", "--work", str(tmp_path), "--out", str(out)]
    assert spd_toy_suite.main(argv) == 0
    assert calls == [("tms_40-10", tmp_path)] and not out.exists()


def test_resume_continues_a_stopped_run_and_keeps_a_finished_one(tmp_path, monkeypatch):
    calls = []

    def fake_run_train(args, log, machine, append=False):
        calls.append((args, append))
        return 1, 2.0  # failed: decompose returns before reading results

    monkeypatch.setattr(spd_toy_suite, "run_train", fake_run_train)
    run = tmp_path / "runs" / "tms_5-2_seed3" / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 1000}, run / "checkpoints" / "last.ckpt")

    def decompose(resume: bool) -> dict:
        return spd_toy_suite.decompose(
            "tms_5-2", 3, {"path": "t.pt"}, tmp_path, Machine(), None, resume=resume
        )

    assert "resumed_from_step" not in decompose(resume=False)  # without --resume: a fresh run
    assert "--ckpt_path" not in calls[-1][0] and calls[-1][1] is False
    row = decompose(resume=True)  # stopped (no spd_results.json): continued from last.ckpt, log appended
    args, append = calls[-1]
    assert args[args.index("--ckpt_path") + 1] == str(run / "checkpoints" / "last.ckpt") and append
    assert row["resumed_from_step"] == 1000

    (run / "spd_results.json").write_text("{}")  # finished: nothing to continue
    decompose(resume=True)
    assert "--ckpt_path" not in calls[-1][0]
    steps = spd_toy_suite.config_steps("tms_5-2")
    saved = {"suite": "tms_5-2", "seed": 3, "steps": steps, "ran": True, "passed": True}
    (run.parents[1] / "suite_row.json").write_text(json.dumps(saved))  # its row saved: kept, not rerun
    n = len(calls)
    assert decompose(resume=True) == saved and len(calls) == n
    (run.parents[1] / "suite_row.json").write_text(json.dumps({**saved, "steps": 5}))  # a shortened run
    assert decompose(resume=True)["steps"] == steps and len(calls) == n + 1  # run again, not kept


def test_time_steps_reports_no_estimate_when_the_difference_is_noise(tmp_path, monkeypatch):
    walls = iter([138.4, 135.2, 10.0, 14.0])  # the second pair: 4 s for 2 more steps
    monkeypatch.setattr(spd_toy_suite, "run_train", lambda args, log, machine: (0, next(walls)))
    target, machine = {"path": "t.pt"}, Machine(threads=1, accelerator="cpu")
    noisy = spd_toy_suite.time_steps("resid_mlp3", target, tmp_path, machine, steps=1)
    assert noisy["step_s"] is None and noisy["estimated_run_s"] is None and "more" in noisy["note"]
    timed = spd_toy_suite.time_steps("resid_mlp3", target, tmp_path, machine, steps=2)
    assert timed["step_s"] == 2.0 and timed["estimated_run_s"] == 2.0 * 50000


def test_members_run_the_seeds_as_one_ensemble_with_a_row_each(tmp_path):
    """--members: one train.py run (member_seeds) gives each seed its row, results and CI margins."""
    from lightning_modules.spd.targets import save_toy_target
    from lightning_modules.spd.toy_models import TMSModel

    torch.manual_seed(0)
    target = save_toy_target(tmp_path / "t.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    rows = spd_toy_suite.decompose_members(
        "tms_5-2", [3, 4], {"path": str(target)}, tmp_path, Machine(), max_steps=6, figures="off"
    )
    assert [r["seed"] for r in rows] == [3, 4]
    for row in rows:
        assert row["ran"] and row["members"] == [3, 4] and row["steps"] == 6
        assert row["wall_s"] == pytest.approx(row["ensemble_wall_s"] / 2, abs=0.1)
        assert set(row["modules"]) == {"linear1", "linear2"}
        assert set(row["ci_margins"]) == {"linear1", "linear2"}
    assert rows[0]["modules"] != rows[1]["modules"]  # two decompositions, not one copied
    again = spd_toy_suite.decompose_members(
        "tms_5-2", [3, 4], {"path": "missing.pt"}, tmp_path, Machine(), max_steps=6, resume=True
    )
    assert again == rows  # finished: kept with --resume, not run again (its target is not even read)


def test_tf32_adds_the_callback_preset():
    args = Machine(tf32=True).trainer_args()
    assert args[args.index("--config") + 1].endswith("configs/callbacks/tf32.yaml")
    assert "--config" not in Machine().trainer_args() and Machine(tf32=True).tags() == {"tf32": True}
